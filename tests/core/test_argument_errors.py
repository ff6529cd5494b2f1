"""Arguments that used to fail deep inside (issue 21, items 4 and 7): each is refused at the check stage with an
error naming the argument (and, for devices, both devices), or accepted as its plain form would be.

Devices: torch 'meta' tensors stand for another device (no GPU needed); JAX uses the second host device that
tests/conftest.py gives it. Layouts: np.matrix, torch sparse and nested tensors. NumPy float momentum and eps.
Masked arrays: ``np.ma`` input means ``mask=~np.ma.getmaskarray(x)`` in training, the output keeping x's mask.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import multibn
from multibn import BNState
from tests.helpers import host_devices, need, to_numpy

PARAMS = ("gamma", "beta", "state.running_mean", "state.running_var", "state.num_batches_tracked")


def _call_with(name: str, value: object, x: object, make: object, **kw: object):
    """batch_norm(x, ...) with the argument ``name`` replaced by ``value``, the others made by ``make(shape)``."""
    c = x.shape[1]
    args = {"gamma": make((c,)), "beta": make((c,)), "state.running_mean": make((c,)),
            "state.running_var": make((c,)), "state.num_batches_tracked": 0}
    args[name] = value
    state = BNState(args["state.running_mean"], args["state.running_var"], args["state.num_batches_tracked"])
    return multibn.batch_norm(x, args["gamma"], args["beta"], state, **kw)


# ---- devices --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("training", [True, False])
def test_torch_argument_on_another_device_is_named_with_both_devices(name: str, training: bool) -> None:
    torch = need("torch")
    x = torch.randn(4, 3)
    for _ in range(2):  # the second call: after a valid call of the same signature was kept (the plan cache)
        _call_with(name, torch.zeros(()).long() if name.endswith("tracked") else torch.ones(3), x, torch.ones,
                   training=training)
        meta = torch.zeros((), dtype=torch.long, device="meta") if name.endswith("tracked") else \
            torch.ones(3, device="meta")
        with pytest.raises(ValueError, match=re.escape(name) + r" is on device meta but x is on device cpu"):
            _call_with(name, meta, x, torch.ones, training=training)


def test_torch_x_on_another_device_than_the_parameters() -> None:
    torch = need("torch")
    with pytest.raises(ValueError, match=r"gamma is on device cpu but x is on device meta"):
        multibn.batch_norm(torch.ones(4, 3, device="meta"), torch.ones(3), torch.zeros(3))


def test_torch_dy_and_mask_on_another_device() -> None:
    torch = need("torch")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"dy is on device meta but x is on device cpu"):
        multibn.batch_norm_vjp(x, torch.ones(3), torch.zeros(3), None, torch.ones(4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"mask is on device meta but x is on device cpu"):
        multibn.batch_norm(x, mask=torch.ones(4, 1, dtype=torch.bool, device="meta"))


def test_numpy_parameters_go_to_the_device_of_x() -> None:
    """A converted NumPy gamma (backend named) lands where x is, not on the default device."""
    jax = need("jax")
    d1 = host_devices(2)[1]
    x = jax.device_put(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), d1)
    y, st = multibn.batch_norm(x, np.ones(3, np.float32), np.zeros(3, np.float32), multibn.init_state(3),
                               backend="jax")
    assert all(a.devices() == {d1} for a in (y, st.running_mean, st.running_var)), [a.devices() for a in st]


@pytest.mark.parametrize("name", PARAMS[:4])
def test_jax_argument_committed_to_another_device_is_named_with_both_devices(name: str) -> None:
    jax = need("jax")
    d0, d1 = host_devices(2)
    x = jax.device_put(np.ones((4, 3), np.float32), d1)

    def make(shape: tuple[int, ...]) -> object:
        return jax.device_put(np.ones(shape, np.float32), d1)

    _call_with(name, make((3,)), x, make)
    with pytest.raises(ValueError, match=re.escape(f"{name} is on device {d0} but x is on device {d1}")):
        _call_with(name, jax.device_put(np.ones(3, np.float32), d0), x, make)
    _call_with(name, jax.numpy.ones(3), x, make)  # uncommitted: JAX moves it, as it would itself


# ---- layouts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x", "gamma", "beta", "state.running_mean"])
def test_numpy_matrix_is_refused_naming_the_argument(name: str) -> None:
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    value = np.asmatrix(x) if name == "x" else np.asmatrix(np.ones(3, np.float32))
    for backend in (None, "torch") if name == "x" else (None,):
        with pytest.raises(TypeError, match=re.escape(name) + r" is a numpy.matrix.*np.asarray"):
            if name == "x":
                multibn.batch_norm(value, backend=backend)
            else:
                _call_with(name, value, x, lambda s: np.ones(s, np.float32))


@pytest.mark.parametrize(("name", "kind"), [
    *((n, k) for n in ("x", "dy", "mask") for k in ("sparse_coo", "sparse_csr", "nested", "jagged")),
    # per-channel vectors: 1-D, which CSR and nested tensors cannot be
    *((n, "sparse_coo") for n in ("gamma", "beta", "state.running_var")),
])
def test_torch_sparse_and_nested_tensors_are_refused_naming_the_argument(name: str, kind: str) -> None:
    torch = need("torch")
    dense = {"x": torch.randn(4, 3), "dy": torch.randn(4, 3), "mask": torch.ones(4, 3, dtype=torch.bool)}.get(
        name, torch.ones(3))
    if kind.startswith("sparse"):
        value = dense.to_sparse() if kind == "sparse_coo" else dense.to_sparse_csr()
        want = rf"{re.escape(name)} is a sparse tensor \(layout torch\.{kind}\).*to_dense\(\)"
    else:
        layout = torch.jagged if kind == "jagged" else torch.strided
        value = torch.nested.nested_tensor([dense[:2], dense[2:]], layout=layout)
        want = rf"{re.escape(name)} is a nested tensor.*to_padded_tensor.*mask="
    x = torch.randn(4, 3)
    for _ in range(2):  # the second time after valid calls of the same signature
        multibn.batch_norm(x, torch.ones(3), torch.zeros(3), multibn.init_state(3, backend="torch"))
        multibn.batch_norm_vjp(x, torch.ones(3), torch.zeros(3), None, torch.randn(4, 3))
        with pytest.raises(TypeError, match=want):
            if name == "x":
                multibn.batch_norm(value)
            elif name == "dy":
                multibn.batch_norm_vjp(x, torch.ones(3), torch.zeros(3), None, value)
            elif name == "mask":
                multibn.batch_norm(x, mask=value)
            else:
                _call_with(name, value, x, torch.ones)


# ---- NumPy scalars for momentum and eps ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.float32(0.1), np.float16(0.1), np.float64(0.1), np.int64(1), 0.1])
def test_numpy_float_momentum_and_eps_are_accepted(value: object) -> None:
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    _, st = multibn.batch_norm(x, state=multibn.init_state(3), momentum=value, eps=value)
    m = float(value)
    np.testing.assert_allclose(st.running_mean, m * x.astype(np.float64).mean(0), rtol=1e-6)
    conv = multibn.CONVENTIONS["torch"].with_overrides(momentum=value, eps=value)
    assert type(conv.momentum) is float and type(conv.eps) is float


def test_torch_layer_and_batch_norm_agree_on_a_numpy_float32_momentum() -> None:
    torch = need("torch")
    x = torch.randn(6, 3)
    native = torch.nn.BatchNorm1d(3, momentum=np.float32(0.1))
    native(x)
    _, st = multibn.batch_norm(x, state=multibn.init_state(3, backend="torch"), momentum=np.float32(0.1))
    torch.testing.assert_close(st.running_mean, native.running_mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [np.bool_(True), True, "0.1", np.array([0.1]), 1 + 0j])
def test_non_real_momentum_is_still_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="momentum must be a float"):
        multibn.batch_norm(np.ones((3, 2), np.float32), momentum=bad)


# ---- masked arrays (item 4) -----------------------------------------------------------------------------------
def _masked_example() -> np.ma.MaskedArray:
    data = np.array([[0.1, 1.0], [0.3, 2.0], [100.0, 3.0]], np.float32)
    return np.ma.MaskedArray(data, mask=[[False, False], [False, False], [True, False]])


def test_masked_array_input_means_its_mask_in_training() -> None:
    """The issue's example: a running mean of 0.1 * mean(0.1, 0.3) = 0.02 for the masked channel, not 3.35."""
    x = _masked_example()
    y, st = multibn.batch_norm(x, state=multibn.init_state(2))
    want_y, want_st = multibn.batch_norm(x.data, state=multibn.init_state(2), mask=~np.ma.getmaskarray(x))
    assert isinstance(y, np.ma.MaskedArray)
    np.testing.assert_array_equal(np.ma.getmaskarray(y), np.ma.getmaskarray(x))
    np.testing.assert_array_equal(y.data, want_y)
    np.testing.assert_allclose(st.running_mean, [0.02, 0.2], rtol=1e-6)
    for a, b in zip(st, want_st, strict=True):
        np.testing.assert_array_equal(a, b)


def test_masked_array_combines_with_a_mask_argument_and_is_ignored_in_eval() -> None:
    x = _masked_example()
    extra = np.array([True, False, True])[:, None]
    _, st = multibn.batch_norm(x, state=multibn.init_state(2), mask=extra, convention="gluon")  # 1 row: allowed
    _, want = multibn.batch_norm(x.data, state=multibn.init_state(2), mask=extra & ~np.ma.getmaskarray(x),
                                 convention="gluon")
    np.testing.assert_allclose(st.running_mean, [0.1 * 0.1, 0.1 * 2.0], rtol=1e-6)
    np.testing.assert_array_equal(st.running_mean, want.running_mean)
    state = multibn.init_state(2)
    y, _ = multibn.batch_norm(x, state=state, training=False)
    assert isinstance(y, np.ma.MaskedArray)
    np.testing.assert_array_equal(np.ma.getmaskarray(y), np.ma.getmaskarray(x))
    np.testing.assert_array_equal(y.data, multibn.batch_norm(x.data, state=state, training=False)[0])


def test_masked_array_without_masked_elements_equals_the_plain_array() -> None:
    data = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    y, st = multibn.batch_norm(np.ma.MaskedArray(data), state=multibn.init_state(3))
    y0, st0 = multibn.batch_norm(data, state=multibn.init_state(3))
    np.testing.assert_array_equal(y.data, y0)
    np.testing.assert_array_equal(st.running_var, st0.running_var)


def test_masked_array_vjp_takes_the_mask_and_a_masked_dy_is_zero_where_masked() -> None:
    x = _masked_example()
    dy = np.ma.MaskedArray(np.full((3, 2), 7.0, np.float32), mask=np.ma.getmaskarray(x))
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, np.ones(2, np.float32), np.zeros(2, np.float32), None, dy)
    want = multibn.batch_norm_vjp(x.data, np.ones(2, np.float32), np.zeros(2, np.float32), None,
                                  np.ma.filled(dy, 0), mask=~np.ma.getmaskarray(x))
    assert isinstance(dx, np.ma.MaskedArray)
    np.testing.assert_array_equal(np.ma.getmaskarray(dx), np.ma.getmaskarray(x))
    for a, b in zip((dx.data, dgamma, dbeta), want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert to_numpy(dbeta)[0] == 14.0  # the two kept rows of channel 0


@pytest.mark.parametrize("name", ["gamma", "state.running_mean"])
def test_masked_array_parameters_are_refused(name: str) -> None:
    x = np.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match=re.escape(name) + r" is a numpy.ma.MaskedArray"):
        _call_with(name, np.ma.MaskedArray(np.ones(2, np.float32), mask=[True, False]), x,
                   lambda s: np.ones(s, np.float32))


def test_masked_array_on_another_backend_is_refused() -> None:
    need("torch")
    with pytest.raises(TypeError, match=r"x is a numpy.ma.MaskedArray.*backend='torch'.*mask="):
        multibn.batch_norm(_masked_example(), backend="torch")
