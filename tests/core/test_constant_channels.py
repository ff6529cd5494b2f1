"""A constant channel has M2 exactly 0 on every backend, eagerly and under ``jax.jit``, whatever its value, the
summation order or how the framework rounds a division (XLA turns ``/ n`` into ``* (1 / n)``): so the zero-variance
guard (eps = 0) fires and the output is exactly beta, as in PyTorch and MXNet. Every value is a channel of one array
(seven constant channels side by side), so one call per shape covers them all."""

from __future__ import annotations

import numpy as np
import pytest

import multibn
from multibn import algorithm as alg
from multibn.backends import get_backend
from tests.helpers import arr, need, to_numpy

VALUES = [0.1, 3.3, -7.77, 20.0, 1e-3, 123456.7, -1e-30]  # one per channel: every value in one array
C = len(VALUES)
SHAPES = [((5, C, 3), 1), ((15, C), 1), ((7, C, 11, 13), 1), ((64, C, 1, 1), 1), ((4096, C), 1),
          ((64, 56, 56, C), -1)]


def per_channel(values: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """``shape`` whose channel ``c`` (on ``axis``) holds ``values[c]`` everywhere."""
    bshape = [1] * len(shape)
    bshape[axis] = C
    return np.broadcast_to(values.reshape(bshape), shape)


def constant_channels(shape: tuple[int, ...], axis: int) -> np.ndarray:
    return per_channel(np.asarray(VALUES, np.float32), shape, axis).copy()


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_constant_channel_has_zero_m2_and_gives_beta(backend: str, shape: tuple[int, ...], axis: int) -> None:
    be = get_backend(backend)
    x = arr(backend, constant_channels(shape, axis))
    beta = np.linspace(-1.0, 1.0, C).astype(np.float32)
    st = alg.batch_stats(be, x, alg.Layout.of(shape, axis))
    assert np.all(to_numpy(st.m2) == 0), to_numpy(st.m2)
    np.testing.assert_array_equal(to_numpy(st.mean), np.asarray(VALUES, np.float32))
    y, _ = multibn.batch_norm(x, beta=arr(backend, beta), eps=0.0, axis=axis)
    np.testing.assert_array_equal(to_numpy(y), per_channel(beta, shape, axis))


def test_constant_channel_under_jit() -> None:
    jax = need("jax")
    import jax.numpy as jnp

    be = get_backend("jax")
    shape = (15, C, 3)
    x = jnp.asarray(constant_channels(shape, 1))
    st = jax.jit(lambda x: alg.batch_stats(be, x, alg.Layout.of(shape, 1)))(x)
    assert np.all(np.asarray(st.m2) == 0)
    np.testing.assert_array_equal(np.asarray(st.mean), np.asarray(VALUES, np.float32))
    y = jax.jit(lambda x: multibn.batch_norm(x, beta=jnp.arange(float(C)), eps=0.0, axis=1)[0])(x)
    np.testing.assert_array_equal(np.asarray(y), per_channel(np.arange(float(C)), shape, 1))
