"""A constant channel has M2 exactly 0 on every backend, eagerly and under ``jax.jit``, whatever its value, the
summation order or how the framework rounds a division (XLA turns ``/ n`` into ``* (1 / n)``): so the zero-variance
guard (eps = 0) fires and the output is exactly beta, as in PyTorch and MXNet."""

from __future__ import annotations

import numpy as np
import pytest

import multibn
from multibn import algorithm as alg
from multibn.backends import get_backend
from tests.helpers import arr, need, to_numpy

VALUES = [0.1, 3.3, -7.77, 20.0, 1e-3, 123456.7, -1e-30]
SHAPES = [((5, 4, 3), 1), ((15, 2), 1), ((7, 3, 11, 13), 1), ((64, 2, 1, 1), 1), ((4096, 3), 1), ((64, 56, 56, 2), -1)]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_constant_channel_has_zero_m2_and_gives_beta(backend: str, value: float, shape: tuple[int, ...],
                                                     axis: int) -> None:
    be = get_backend(backend)
    x = arr(backend, np.full(shape, value))
    c = shape[axis]
    beta = np.linspace(-1.0, 1.0, c).astype(np.float32)
    st = alg.batch_stats(be, x, alg.Layout.of(shape, axis))
    assert np.all(to_numpy(st.m2) == 0), to_numpy(st.m2)
    assert np.all(to_numpy(st.mean) == np.float32(value))
    y, _ = multibn.batch_norm(x, beta=arr(backend, beta), eps=0.0, axis=axis)
    bshape = [1] * len(shape)
    bshape[axis] = c
    np.testing.assert_array_equal(to_numpy(y), np.broadcast_to(beta.reshape(bshape), shape))


@pytest.mark.parametrize("value", VALUES)
def test_constant_channel_under_jit(value: float) -> None:
    jax = need("jax")
    import jax.numpy as jnp

    be = get_backend("jax")
    x = jnp.full((15, 4, 3), value, jnp.float32)
    st = jax.jit(lambda x: alg.batch_stats(be, x, alg.Layout.of((15, 4, 3), 1)))(x)
    assert np.all(np.asarray(st.m2) == 0)
    y = jax.jit(lambda x: multibn.batch_norm(x, beta=jnp.arange(4.0), eps=0.0, axis=1)[0])(x)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.arange(4.0).reshape(4, 1), (15, 4, 3)))
