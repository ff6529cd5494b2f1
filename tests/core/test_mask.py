"""Masked batch norm (``mask=``) on every backend, against a float64 masked textbook BN.

The reference here is written from the definition (Flax's semantics): the statistics are those of the elements
where the mask is True, per channel; every element is normalised; a channel with no element gives beta and keeps
its running statistics. Its gradients are torch autograd of that formula in float64 (an autodiff independent of
multibn's analytic rule).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import multibn
from tests.helpers import ALL_BACKENDS, arr, require, to_numpy

CONVENTIONS = ("torch", "gluon", "flax", "mxnet")


def _reference(x: np.ndarray, mask: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray, conv_name: str,
               axis: int = 1) -> dict[str, np.ndarray]:
    """float64 masked BN: outputs, torch-autograd gradients, and the running statistics after one step."""
    import torch

    conv = multibn.CONVENTIONS[conv_name]
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    m = torch.tensor(np.broadcast_to(mask, x.shape).astype(np.float64))
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    n = m.sum(red)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    mean = (xt * m).sum(red) / safe
    var = (m * (xt - mean.reshape(shape)) ** 2).sum(red) / safe
    s = torch.where(n > 0, 1 / torch.sqrt(var + conv.eps), torch.zeros_like(var))
    g = torch.ones_like(gt) if conv.fix_gamma else gt
    y = (xt - mean.reshape(shape)) * (g * s).reshape(shape) + bt.reshape(shape)
    dx, dg, db = torch.autograd.grad(y, (xt, gt, bt), torch.tensor(dy), allow_unused=True)
    keep, take = conv.update_weights()
    n_np = n.numpy()
    mean_np = mean.detach().numpy()
    m2 = var.detach().numpy() * n_np
    stat_var = m2 / np.where(n_np > 1, n_np - 1, 1) if conv.unbiased_running_var else m2 / np.where(n_np > 0, n_np, 1)
    rmean = np.where(n_np > 0, take * mean_np, 0.0)
    rvar = np.where(n_np > (1 if conv.unbiased_running_var else 0), take * stat_var + keep, 1.0)
    return {"y": y.detach().numpy(), "dx": dx.numpy(), "dgamma": np.zeros_like(gamma) if dg is None else dg.numpy(),
            "dbeta": db.numpy(), "running_mean": rmean, "running_var": rvar, "tracked": int((n_np > 0).any())}


def _problem(rng: np.random.Generator, shape: tuple[int, ...], mask_shape: tuple[int, ...], p: float):
    c = shape[1]
    x = rng.normal(size=shape) * 2 + 0.5
    mask = rng.random(mask_shape) < p
    return x, mask, rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=shape)


def _run(backend: str, x, mask, gamma, beta, dy, conv: str):
    """multibn's outputs, state and (dx, dgamma, dbeta) from batch_norm_vjp, float64 where the backend has it."""
    dtype = "float64" if backend != "jax" else "float32"
    x_, g_, b_, dy_ = (arr(backend, a, dtype) for a in (x, gamma, beta, dy))
    m_ = arr(backend, mask, None)
    state = multibn.init_state(x.shape[1], backend=backend, dtype=dtype)
    y, new = multibn.batch_norm(x_, g_, b_, state, mask=m_, convention=conv, axis=1)
    grads = multibn.batch_norm_vjp(x_, g_, b_, None, dy_, mask=m_, convention=conv, axis=1)
    return y, new, grads


def _check(backend: str, x, mask, gamma, beta, dy, conv: str) -> None:
    want = _reference(x, mask, gamma, beta, dy, conv)
    y, new, (dx, dg, db) = _run(backend, x, mask, gamma, beta, dy, conv)
    tol = {"rtol": 2e-4, "atol": 2e-4} if backend == "jax" else {"rtol": 1e-9, "atol": 1e-10}
    np.testing.assert_allclose(to_numpy(y), want["y"], **tol, err_msg="y")
    np.testing.assert_allclose(to_numpy(dx), want["dx"], **tol, err_msg="dx")
    np.testing.assert_allclose(to_numpy(dg), want["dgamma"], **tol, err_msg="dgamma")
    np.testing.assert_allclose(to_numpy(db), want["dbeta"], **tol, err_msg="dbeta")
    np.testing.assert_allclose(to_numpy(new.running_mean), want["running_mean"], **tol, err_msg="running_mean")
    np.testing.assert_allclose(to_numpy(new.running_var), want["running_var"], **tol, err_msg="running_var")
    tracked = int(to_numpy(new.num_batches_tracked).reshape(-1)[0])
    counts_empty = multibn.CONVENTIONS[conv].count_empty_batches
    assert tracked == (1 if counts_empty else want["tracked"])


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_mask_matches_reference(backend: str, conv: str) -> None:
    require("torch")  # the reference's gradients
    rng = np.random.default_rng(0)
    x, mask, g, b, dy = _problem(rng, (8, 3, 5), (8, 1, 5), 0.6)
    mask[2] = False  # an all-False row
    _check(backend, x, mask, g, b, dy, conv)


def test_all_false_channel_gives_beta_and_keeps_statistics(backend: str) -> None:
    require("torch")
    rng = np.random.default_rng(1)
    x, _, g, b, dy = _problem(rng, (6, 3, 4), (6, 3, 4), 0.5)
    mask = rng.random((6, 3, 4)) < 0.7
    mask[:, 1] = False
    _check(backend, x, mask, g, b, dy, "gluon")
    y, new, _ = _run(backend, x, mask, g, b, dy, "gluon")
    np.testing.assert_allclose(to_numpy(y)[:, 1], np.broadcast_to(b[1], (6, 4)), rtol=1e-6)
    assert float(to_numpy(new.running_mean)[1]) == 0.0 and float(to_numpy(new.running_var)[1]) == 1.0


def test_all_true_mask_is_plain_batch_norm(backend: str) -> None:
    rng = np.random.default_rng(2)
    x = arr(backend, rng.normal(size=(5, 4, 3)))
    y0, s0 = multibn.batch_norm(x, state=multibn.init_state(4, backend=backend))
    y1, s1 = multibn.batch_norm(x, state=multibn.init_state(4, backend=backend),
                                mask=arr(backend, np.ones((5, 1, 1), bool), None))
    np.testing.assert_allclose(to_numpy(y1), to_numpy(y0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(s1.running_var), to_numpy(s0.running_var), rtol=1e-5)


@given(data=st.data())
def test_random_masks_numpy(data: st.DataObject) -> None:
    require("torch")
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n, c, q = data.draw(st.integers(2, 7)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    mask_shape = data.draw(st.sampled_from([(n, c, q), (n, 1, q), (n, 1, 1), (1, c, q)]))
    p = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    conv = data.draw(st.sampled_from(["gluon", "flax", "mxnet"]))
    x, mask, g, b, dy = _problem(rng, (n, c, q), mask_shape, p)
    _check("numpy", x, mask, g, b, dy, conv)


def test_mask_one_value_under_torch_rules_raises_and_changes_nothing() -> None:
    x = np.random.default_rng(3).normal(size=(4, 2))
    mask = np.array([[True, True], [False, True], [False, False], [False, True]])
    state = multibn.init_state(2)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*channel\(s\) \[0\]"):
        multibn.batch_norm(x, state=state, mask=mask)
    assert state.running_var.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("mask", "error", "match"), [
    (np.ones((4, 3)), TypeError, "mask must be a boolean array, got dtype float64"),
    (np.ones((4, 2), bool), ValueError, r"mask must be broadcastable to the shape of x, \(4, 3\), got shape \(4, 2\)"),
    ("yes", TypeError, "mask must be a boolean array, got str"),
])
def test_bad_masks_are_refused(mask: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        multibn.batch_norm(np.zeros((4, 3), np.float32), mask=mask)


@pytest.mark.torch
def test_torch_masked_autodiff_equals_reference() -> None:
    require("torch")
    import torch

    rng = np.random.default_rng(4)
    x, mask, g, b, dy = _problem(rng, (6, 3, 4), (6, 1, 4), 0.6)
    want = _reference(x, mask, g, b, dy, "torch")
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    y, _ = multibn.batch_norm(xt, gt, bt, mask=torch.tensor(mask))
    grads = torch.autograd.grad(y, (xt, gt, bt), torch.tensor(dy))
    for got, k in zip(grads, ("dx", "dgamma", "dbeta"), strict=True):
        np.testing.assert_allclose(got.numpy(), want[k], rtol=1e-10, atol=1e-12)
    m = torch.tensor(mask)
    assert torch.autograd.gradgradcheck(lambda x, g, b: multibn.batch_norm(x, g, b, mask=m)[0], (xt, gt, bt))


def test_jax_masked_autodiff_under_jit_equals_reference() -> None:
    require("jax", "torch")
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    x, mask, g, b, dy = _problem(rng, (6, 3, 4), (6, 1, 4), 0.6)
    want = _reference(x, mask, g, b, dy, "flax")

    @jax.jit
    def grads(x, g, b, m):
        def loss(x, g, b):
            return jnp.sum(multibn.batch_norm(x, g, b, mask=m, convention="flax", axis=1)[0] * jnp.asarray(dy))

        return jax.grad(loss, argnums=(0, 1, 2))(x, g, b)

    got = grads(*(jnp.asarray(a, jnp.float32) for a in (x, g, b)), jnp.asarray(mask))
    for a, k in zip(got, ("dx", "dgamma", "dbeta"), strict=True):
        np.testing.assert_allclose(np.asarray(a), want[k], rtol=2e-4, atol=2e-4)


__all__ = ["ALL_BACKENDS"]
