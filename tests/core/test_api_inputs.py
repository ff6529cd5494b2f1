"""Inputs the public functions accept as well as their plain forms: big-endian float arrays, NumPy integers for
``axis`` and ``num_features``; ``device`` honoured by every array of a state, the counter included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import multibn
from tests.helpers import require, to_numpy

ROOT = Path(__file__).resolve().parents[2]


def _reference_y(x, gamma, beta, axis):
    """Training-mode BN in float64, the textbook formula."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    x = x.astype(np.float64)
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    return gamma.reshape(shape) * (x - mean) / np.sqrt(var + 1e-5) + beta.reshape(shape)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_big_endian_float_arrays_are_accepted(backend, dtype):
    require(backend)
    if backend == "jax" and dtype == ">f8":
        pytest.skip("float64 on jax needs jax_enable_x64")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 3).astype(">f4"), rng.normal(size=3).astype(">f4")
    assert not x.dtype.isnative
    y, state = multibn.batch_norm(x, gamma, beta, multibn.init_state(3), backend=backend)
    assert to_numpy(y).dtype.name == np.dtype(dtype).name
    tol = 5e-3 if dtype == ">f2" else 1e-5
    np.testing.assert_allclose(to_numpy(y), _reference_y(x, gamma, beta, 1), rtol=tol, atol=tol)
    np.testing.assert_allclose(to_numpy(state.running_mean), 0.1 * x.astype(np.float64).mean((0, 2)), rtol=1e-3,
                               atol=1e-6)


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-2), np.intp(1)])
def test_numpy_integer_axis(axis):
    x = np.random.default_rng(1).normal(size=(5, 3, 4)).astype(np.float32)
    y, _ = multibn.batch_norm(x, axis=axis)
    np.testing.assert_allclose(y, _reference_y(x, np.ones(3), np.zeros(3), 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bad", "shown"), [(1.0, "1.0"), (True, "True"), ("1", "'1'"), (np.bool_(True), None),
                                            (np.float64(1.0), None)])
def test_non_integer_axis_is_refused_naming_its_type(bad, shown):
    """A NumPy scalar's repr can look like an int (``1.0``, ``True``): the message names its type then."""
    shown = f"{type(bad).__name__} " if shown is None else shown  # np.bool_ is "bool_" in NumPy 1, "bool" in 2
    with pytest.raises(ValueError, match=f"axis must be an int .* got {shown}"):
        multibn.batch_norm(np.zeros((4, 3), np.float32), axis=bad)


def test_numpy_integer_num_features():
    state = multibn.init_state(np.int64(4))
    assert state.running_mean.shape == (4,)
    for bad in (True, 4.0, np.float32(4), 0, np.int64(-1)):
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            multibn.init_state(bad)


def test_init_state_on_jax_with_a_device_string():
    require("jax")
    import jax

    state = multibn.init_state(4, backend="jax", device="cpu")
    cpu = jax.devices("cpu")[0]
    assert all(a.devices() == {cpu} for a in state)
    _, new = multibn.batch_norm(np.ones((3, 4), np.float32), state=state, backend="jax", device="cpu")
    assert int(new.num_batches_tracked) == 1


_JAX_TWO_DEVICES = textwrap.dedent("""
    import numpy as np, jax, multibn
    d1 = jax.devices("cpu")[1]
    state = multibn.init_state(4, backend="jax", device="cpu:1")
    assert all(a.devices() == {d1} for a in state), [a.devices() for a in state]
    x = jax.device_put(np.ones((3, 4), np.float32), d1)
    y, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 0))
    assert all(a.devices() == {d1} for a in new), [a.devices() for a in new]
    y, new = multibn.batch_norm(np.ones((3, 4), np.float32), state=multibn.init_state(4), backend="jax", device=d1)
    assert all(a.devices() == {d1} for a in (y, *new)), [a.devices() for a in (y, *new)]
    print("ok")
""")


def test_jax_counter_follows_the_device():
    require("jax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-c", _JAX_TWO_DEVICES], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.mxnet
def test_mxnet_counter_follows_the_device():
    require("mxnet")
    import mxnet as mx

    ctx = mx.cpu(1)
    state = multibn.init_state(4, backend="mxnet", device=ctx)
    assert all(a.context == ctx for a in state)
    x = mx.nd.ones((3, 4), ctx=ctx)
    _, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 0))
    assert [a.context for a in new] == [ctx] * 3
    _, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 5), device=ctx)
    assert new.num_batches_tracked.context == ctx and int(new.num_batches_tracked.asscalar()) == 6
