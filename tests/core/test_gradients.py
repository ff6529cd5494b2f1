"""Gradients of multibn.batch_norm: the analytic backward against every framework's own autodiff and BN.

* the native references: torch ``F.batch_norm`` (float64), ``mx.nd.BatchNorm`` (``fix_gamma`` False and True)
  under ``autograd.record``, ``jax.grad`` of a textbook ``jnp`` BN;
* float64 finite differences, ``torch.autograd.gradcheck``, ``jax.test_util.check_grads`` (float64, run in a
  subprocess so that ``jax_enable_x64`` never leaks into this test session);
* the training invariants sum(dx) = 0 and sum(xhat * dx) = 0 per channel, eval-mode gradients, fix_gamma;
* ``batch_norm`` under ``jax.jit``, ``jax.grad`` and ``jax.vmap``; ``batch_norm_vjp`` against each autodiff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import multibn
from multibn import BNState
from multibn.backends import get_backend
from tests.helpers import jax_float64, mxnet_module, need, require, to_numpy

REPO = Path(__file__).resolve().parents[2]
AUTODIFF_BACKENDS = ("torch", "jax", "mxnet")


class Problem(NamedTuple):
    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    rmean: np.ndarray
    rvar: np.ndarray
    dy: np.ndarray
    axis: int

    def astype(self, dtype: Any) -> Problem:
        return Problem(*(a.astype(dtype) for a in self[:6]), self.axis)

    def state(self) -> BNState:
        return BNState(self.rmean, self.rvar, 0)


def make_problem(shape: tuple[int, ...], axis: int = 1, seed: int = 0) -> Problem:
    """float64 data with per-channel offsets and scales, and a random upstream gradient."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, c).reshape(bshape) + rng.normal(size=c).reshape(bshape)
    return Problem(
        x, rng.uniform(0.5, 1.5, c), rng.normal(size=c), 0.3 * rng.normal(size=c), rng.uniform(0.5, 2.0, c),
        rng.normal(size=shape), axis,
    )


def channel_view(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` as (C, n): one row per channel."""
    a = np.moveaxis(a, axis, 0)
    return a.reshape(a.shape[0], -1)


def reference_forward(p: Problem, *, training: bool, eps: float, fix_gamma: bool = False) -> np.ndarray:
    """The textbook BN in float64 NumPy (centred form)."""
    axes = tuple(i for i in range(p.x.ndim) if i != p.axis % p.x.ndim)
    bshape = [1] * p.x.ndim
    bshape[p.axis] = -1
    if training:
        mean = p.x.mean(axis=axes)
        var = ((p.x - mean.reshape(bshape)) ** 2).mean(axis=axes)
    else:
        mean, var = p.rmean, p.rvar
    gamma = np.ones_like(p.gamma) if fix_gamma else p.gamma
    xhat = (p.x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps)
    return xhat * gamma.reshape(bshape) + p.beta.reshape(bshape)


def dtype_for(backend: str) -> type:
    """float64 where the backend takes it in this session (JAX runs without x64 here, MXNet is tested in float32)."""
    return np.float64 if backend in ("numpy", "torch") else np.float32


def tol(backend: str) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-9} if dtype_for(backend) is np.float64 else {"rtol": 2e-4, "atol": 2e-5}


def autodiff_grads(
    backend: str, p: Problem, *, training: bool, convention: str = "torch", **kw: Any
) -> tuple[np.ndarray, ...]:
    """``(dx, dgamma, dbeta)`` through ``batch_norm`` by the backend's own autodiff (NumPy: batch_norm_vjp)."""
    p = p.astype(dtype_for(backend))
    opts = dict(training=training, convention=convention, axis=p.axis, **kw)
    if backend == "numpy":
        return multibn.batch_norm_vjp(p.x, p.gamma, p.beta, p.state(), p.dy, **opts)
    if backend == "torch":
        torch = need("torch")
        x, g, b = (torch.tensor(a, requires_grad=True) for a in (p.x, p.gamma, p.beta))
        state = BNState(torch.tensor(p.rmean), torch.tensor(p.rvar), 0)
        y, _ = multibn.batch_norm(x, g, b, state, **opts)
        return tuple(t.numpy() for t in torch.autograd.grad(y, (x, g, b), torch.tensor(p.dy)))
    if backend == "jax":
        jax = need("jax")
        state = BNState(jax.numpy.asarray(p.rmean), jax.numpy.asarray(p.rvar), 0)

        def f(x: Any, g: Any, b: Any) -> Any:
            return multibn.batch_norm(x, g, b, state, **opts)[0]

        _, vjp = jax.vjp(f, *(jax.numpy.asarray(a) for a in (p.x, p.gamma, p.beta)))
        return tuple(np.asarray(t) for t in vjp(jax.numpy.asarray(p.dy)))
    mx = mxnet_module()
    x, g, b = (mx.nd.array(a, dtype=a.dtype) for a in (p.x, p.gamma, p.beta))
    for a in (x, g, b):
        a.attach_grad()
    state = BNState(mx.nd.array(p.rmean), mx.nd.array(p.rvar), 0)
    with mx.autograd.record(train_mode=training):
        y, _ = multibn.batch_norm(x, g, b, state, **opts)
    y.backward(mx.nd.array(p.dy), train_mode=training)
    return tuple(a.grad.asnumpy() for a in (x, g, b))


def vjp_grads(backend: str, p: Problem, *, training: bool, convention: str = "torch") -> tuple[np.ndarray, ...]:
    """``batch_norm_vjp`` on the backend's own arrays, as NumPy."""
    be = get_backend(backend)
    p = p.astype(dtype_for(backend))
    args = [be.asarray(a) for a in (p.x, p.gamma, p.beta)]
    state = BNState(be.asarray(p.rmean), be.asarray(p.rvar), 0)
    out = multibn.batch_norm_vjp(*args, state, be.asarray(p.dy), training=training, convention=convention,
                                 axis=p.axis)
    return tuple(to_numpy(a) for a in out)


def assert_grads_close(got: tuple, want: tuple, **tolerance: float) -> None:
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), err_msg=name, **tolerance)


SHAPES = [((6, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 3), 1), ((2, 3, 4), -1)]
SHAPE_IDS = ["NC", "NCL", "NCHW", "NLC"]


# ---- float64 finite differences (NumPy: the vjp is how NumPy users train) --------------------------------------
@pytest.mark.parametrize("convention", ["torch", "keras", "mxnet"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES[:3], ids=SHAPE_IDS[:3])
def test_vjp_matches_finite_differences(shape: tuple, axis: int, training: bool, convention: str) -> None:
    p = make_problem(shape, axis, seed=1)
    opts = dict(training=training, convention=convention, axis=axis)

    def loss(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(multibn.batch_norm(x, g, b, p.state(), **opts)[0] * p.dy))

    h = 1e-6
    args = [p.x, p.gamma, p.beta]
    numeric = []
    for i, a in enumerate(args):
        grad = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            plus, minus = [t.copy() for t in args], [t.copy() for t in args]
            plus[i][j] += h
            minus[i][j] -= h
            grad[j] = (loss(*plus) - loss(*minus)) / (2 * h)
        numeric.append(grad)
    got = multibn.batch_norm_vjp(p.x, p.gamma, p.beta, p.state(), p.dy, **opts)
    assert_grads_close(got, numeric, rtol=1e-5, atol=1e-6)


# ---- torch: F.batch_norm in float64, gradcheck --------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=SHAPE_IDS)
def test_torch_matches_native_batch_norm(shape: tuple, axis: int, training: bool, convention: str) -> None:
    torch = need("torch")
    import torch.nn.functional as F

    p = make_problem(shape, axis, seed=2)
    got = autodiff_grads("torch", p, training=training, convention=convention)
    eps = multibn.CONVENTIONS[convention].eps
    x, g, b = (torch.tensor(a, requires_grad=True) for a in (np.moveaxis(p.x, axis, 1), p.gamma, p.beta))
    y = F.batch_norm(x, torch.tensor(p.rmean), torch.tensor(p.rvar), g, b, training=training, momentum=0.1, eps=eps)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), torch.tensor(np.moveaxis(p.dy, axis, 1)))
    assert_grads_close(got, (np.moveaxis(dx.numpy(), 1, axis), dg.numpy(), db.numpy()), rtol=1e-10, atol=1e-10)


@pytest.mark.torch
@pytest.mark.parametrize("convention", ["torch", "mxnet"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "axis"), [SHAPES[0], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[3]])
def test_torch_gradcheck(shape: tuple, axis: int, training: bool, convention: str) -> None:
    torch = need("torch")
    p = make_problem(shape, axis, seed=3)
    state = BNState(torch.tensor(p.rmean), torch.tensor(p.rvar), torch.tensor(0))
    inputs = tuple(torch.tensor(a, requires_grad=True) for a in (p.x, p.gamma, p.beta))

    def f(x: Any, g: Any, b: Any) -> Any:
        return multibn.batch_norm(x, g, b, state, training=training, convention=convention, axis=axis)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- MXNet: mx.nd.BatchNorm under autograd.record -------------------------------------------------------------
@pytest.mark.mxnet
@pytest.mark.parametrize("fix_gamma", [False, True], ids=["learned_gamma", "fix_gamma"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=SHAPE_IDS)
def test_mxnet_matches_native_batch_norm(shape: tuple, axis: int, training: bool, fix_gamma: bool) -> None:
    mx = mxnet_module()
    convention = "mxnet" if fix_gamma else "gluon"
    eps = multibn.CONVENTIONS[convention].eps
    p = make_problem(shape, axis, seed=4).astype(np.float32)
    got = autodiff_grads("mxnet", p, training=training, convention=convention)
    x, g, b = (mx.nd.array(a) for a in (p.x, p.gamma, p.beta))
    for a in (x, g, b):
        a.attach_grad()
    with mx.autograd.record(train_mode=training):
        y = mx.nd.BatchNorm(x, g, b, mx.nd.array(p.rmean), mx.nd.array(p.rvar), eps=eps, momentum=0.9,
                            fix_gamma=fix_gamma, axis=axis)
    y.backward(mx.nd.array(p.dy), train_mode=training)
    want = tuple(a.grad.asnumpy() for a in (x, g, b))
    assert_grads_close(got, want, rtol=1e-4, atol=2e-5)
    if fix_gamma:
        assert not np.any(got[1]) and not np.any(want[1])


@pytest.mark.mxnet
def test_mxnet_gamma_gradient_when_x_needs_none() -> None:
    mx = mxnet_module()
    p = make_problem((6, 3), 1, seed=14).astype(np.float32)
    grads = []
    for native in (False, True):
        x, g, b = (mx.nd.array(a) for a in (p.x, p.gamma, p.beta))
        g.attach_grad()
        b.attach_grad()
        with mx.autograd.record():
            if native:
                y = mx.nd.BatchNorm(x, g, b, mx.nd.zeros(3), mx.nd.ones(3), eps=1e-5, fix_gamma=False)
            else:
                y, _ = multibn.batch_norm(x, g, b, None, convention="gluon")
        y.backward(mx.nd.array(p.dy))
        grads.append((g.grad.asnumpy(), b.grad.asnumpy()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


MXNET_SGD_SCRIPT = """
import multibn
from multibn.backends.mxnet import mx

gamma = mx.nd.ones({channels})
gamma.attach_grad()
for step in range(2):
    x = mx.nd.random.normal(shape={shape})
    x.attach_grad()
    with mx.autograd.record():
        y, _ = multibn.batch_norm(x, gamma, None, None, convention="gluon")
        loss = (y ** 3).sum()
    loss.backward()
    gamma[:] = gamma - 0.1 * gamma.grad  # an SGD step, in place, as gluon.Trainer does
    x[:] = 0  # and the caller's x overwritten in place
    gamma.asnumpy()
    x.grad.asnumpy()
print("ok")
"""


@pytest.mark.mxnet
@pytest.mark.parametrize(("shape", "timeout"), [((8, 3), 10), ((64, 8, 16, 20), 60)], ids=["host", "operators"])
def test_mxnet_sgd_step_on_gamma_after_backward(shape: tuple[int, ...], timeout: int) -> None:
    """In-place updates of gamma and x right after backward() do not deadlock: the backward reads its own copies of
    x and gamma (on the host path for small arrays, on MXNet's operators over 2^17 elements, where it also writes
    dx into x.grad), never the caller's arrays queued behind updates that wait for this backward."""
    mxnet_module()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = MXNET_SGD_SCRIPT.format(channels=shape[1], shape=shape)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: two SGD steps on gamma did not finish in {timeout} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


# ---- JAX: jax.grad of a textbook jnp BN; check_grads in float64 -------------------------------------------------
def textbook_jnp(x: Any, g: Any, b: Any, rmean: Any, rvar: Any, *, training: bool, eps: float, axis: int) -> Any:
    import jax.numpy as jnp

    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    bshape = [1] * x.ndim
    bshape[axis] = -1
    if training:
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean((x - mean.reshape(bshape)) ** 2, axis=axes)
    else:
        mean, var = rmean, rvar
    return (x - mean.reshape(bshape)) / jnp.sqrt(var.reshape(bshape) + eps) * g.reshape(bshape) + b.reshape(bshape)


@pytest.mark.parametrize("convention", ["flax", "torch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=SHAPE_IDS)
def test_jax_matches_textbook_grad(shape: tuple, axis: int, training: bool, convention: str) -> None:
    jax = need("jax")
    p = make_problem(shape, axis, seed=5).astype(np.float32)
    got = autodiff_grads("jax", p, training=training, convention=convention)
    eps = multibn.CONVENTIONS[convention].eps

    def loss(x: Any, g: Any, b: Any) -> Any:
        y = textbook_jnp(x, g, b, p.rmean, p.rvar, training=training, eps=eps, axis=axis)
        return jax.numpy.sum(y * p.dy)

    want = jax.grad(loss, argnums=(0, 1, 2))(p.x, p.gamma, p.beta)
    assert_grads_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("convention", ["torch", "mxnet"])
@pytest.mark.parametrize(("shape", "axis"), [SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[1], SHAPE_IDS[3]])
def test_jax_check_grads_float64(shape: tuple, axis: int, convention: str, training: bool) -> None:
    """float64 with x64 on for this test only (jax_float64: thread-local, restored on exit)."""
    jax = need("jax")
    import jax.numpy as jnp
    from jax.test_util import check_grads

    with jax_float64():
        assert jax.config.jax_enable_x64
        p = make_problem(shape, axis, seed=6)
        state = multibn.BNState(jnp.asarray(p.rmean), jnp.asarray(p.rvar), 0)
        # backend="jax": check_grads evaluates f on NumPy arrays (its numerical derivatives)
        opts = dict(training=training, convention=convention, axis=axis, backend="jax")

        @jax.jit
        def f(x: Any, g: Any, b: Any) -> Any:
            return multibn.batch_norm(x, g, b, state, **opts)[0]

        args = tuple(jnp.asarray(a) for a in (p.x, p.gamma, p.beta))
        assert args[0].dtype == jnp.float64
        check_grads(f, args, order=1, modes=["rev"])
        conv = multibn.CONVENTIONS[convention]

        def ref(x: Any, g: Any, b: Any) -> Any:
            g = jnp.ones_like(g) if conv.fix_gamma else g  # MXNet's fix_gamma: gamma ignored, dgamma 0
            return textbook_jnp(x, g, b, state.running_mean, state.running_var, training=training, eps=conv.eps,
                                axis=axis)

        got = jax.vjp(f, *args)[1](jnp.asarray(p.dy))
        want = jax.vjp(ref, *args)[1](jnp.asarray(p.dy))
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"{name} {shape} {opts}")


def test_jax_check_grads_float32() -> None:
    jax = need("jax")
    from jax.test_util import check_grads

    p = make_problem((6, 3), 1, seed=7).astype(np.float32)
    state = BNState(jax.numpy.asarray(p.rmean), jax.numpy.asarray(p.rvar), 0)
    for training in (True, False):
        def f(x: Any, g: Any, b: Any, training: bool = training) -> Any:
            return multibn.batch_norm(x, g, b, state, training=training, convention="flax", axis=1,
                                      backend="jax")[0]

        check_grads(f, (p.x, p.gamma, p.beta), order=1, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


# ---- invariants, eval mode and fix_gamma, on every backend ------------------------------------------------------
@pytest.mark.parametrize(("shape", "axis"), [SHAPES[2], SHAPES[3]], ids=[SHAPE_IDS[2], SHAPE_IDS[3]])
def test_training_invariants(backend: str, shape: tuple, axis: int) -> None:
    """sum(dx) = 0 and sum(xhat * dx) = 0 per channel, and dgamma/dbeta are the textbook sums.

    The second identity is exact for eps = 0 (with eps > 0 it is off by a factor eps / (var + eps)).
    """
    p = make_problem(shape, axis, seed=8)
    eps = 0.0
    grads = autodiff_grads(backend, p, training=True, eps=eps)
    dx, dgamma, dbeta = (np.asarray(a, np.float64) for a in grads)
    xs = channel_view(p.x, axis)
    xhat = (xs - xs.mean(axis=1, keepdims=True)) / np.sqrt(xs.var(axis=1, keepdims=True) + eps)
    dxs, dys = channel_view(dx, axis), channel_view(p.dy, axis)
    scale = np.abs(dxs).sum(axis=1)
    precision = 1e-12 if dtype_for(backend) is np.float64 else 1e-5
    assert np.all(np.abs(dxs.sum(axis=1)) <= precision * scale)
    assert np.all(np.abs((xhat * dxs).sum(axis=1)) <= precision * 10 * scale)
    np.testing.assert_allclose(dgamma, (dys * xhat).sum(axis=1), **tol(backend))
    np.testing.assert_allclose(dbeta, dys.sum(axis=1), **tol(backend))


@pytest.mark.parametrize(("shape", "axis"), [SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[1], SHAPE_IDS[3]])
def test_eval_gradients(backend: str, shape: tuple, axis: int) -> None:
    """Eval: dx = dy * gamma / sqrt(RV + eps), dgamma = sum(dy * (x - RM) / sqrt(RV + eps)), dbeta = sum(dy)."""
    p = make_problem(shape, axis, seed=9)
    dx, dgamma, dbeta = autodiff_grads(backend, p, training=False, convention="keras")
    eps = multibn.CONVENTIONS["keras"].eps
    bshape = [1] * p.x.ndim
    bshape[axis] = -1
    s = 1 / np.sqrt(p.rvar + eps)
    np.testing.assert_allclose(dx, p.dy * (p.gamma * s).reshape(bshape), **tol(backend))
    xn = channel_view(p.x, axis) - p.rmean[:, None]
    np.testing.assert_allclose(dgamma, (channel_view(p.dy, axis) * xn).sum(axis=1) * s, **tol(backend))
    np.testing.assert_allclose(dbeta, channel_view(p.dy, axis).sum(axis=1), **tol(backend))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fix_gamma_gives_zero_dgamma(backend: str, training: bool) -> None:
    """Convention "mxnet" ignores gamma: dgamma = 0, and dx is that of gamma = 1 (the "gluon" rule, eps 1e-3)."""
    p = make_problem((4, 3, 2), 1, seed=10)
    dx, dgamma, dbeta = autodiff_grads(backend, p, training=training, convention="mxnet")
    assert not np.any(np.asarray(dgamma))
    ones = p._replace(gamma=np.ones_like(p.gamma))
    dx1, _, dbeta1 = autodiff_grads(backend, ones, training=training, convention="gluon", eps=1e-3)
    np.testing.assert_allclose(dx, dx1, **tol(backend))
    np.testing.assert_allclose(dbeta, dbeta1, **tol(backend))


@pytest.mark.parametrize("convention", ["torch", "mxnet"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", AUTODIFF_BACKENDS)
def test_vjp_equals_autodiff(backend: str, training: bool, convention: str) -> None:
    """batch_norm_vjp on a backend's arrays equals that backend's autodiff through batch_norm."""
    require(backend)
    p = make_problem((3, 2, 4), 1, seed=11)
    got = vjp_grads(backend, p, training=training, convention=convention)
    want = autodiff_grads(backend, p, training=training, convention=convention)
    assert_grads_close(got, want, rtol=1e-6, atol=1e-7)
    assert all(g.dtype == np.dtype(dtype_for(backend)) for g in got)


def test_numpy_vjp_matches_reference_forward() -> None:
    """The NumPy forward is the textbook one, so the finite differences above check the textbook gradient."""
    p = make_problem((2, 3, 2, 3), 1, seed=12)
    for training in (True, False):
        y, _ = multibn.batch_norm(p.x, p.gamma, p.beta, p.state(), training=training, convention="torch")
        np.testing.assert_allclose(y, reference_forward(p, training=training, eps=1e-5), rtol=1e-12, atol=1e-12)


# ---- JAX transformations: jit, grad, vmap ------------------------------------------------------------------------
def test_jax_jit_and_grad() -> None:
    jax = need("jax")
    jnp = jax.numpy
    p = make_problem((5, 2, 3), 1, seed=13).astype(np.float32)
    state = BNState(jnp.asarray(p.rmean), jnp.asarray(p.rvar), jnp.asarray(0, jnp.int32))

    def f(x: Any, g: Any, b: Any, state: BNState) -> Any:
        return multibn.batch_norm(x, g, b, state, training=True, convention="torch", axis=1, backend="jax")

    eager = f(p.x, p.gamma, p.beta, state)
    jitted = jax.jit(f)(p.x, p.gamma, p.beta, state)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(jitted[1].num_batches_tracked) == 1

    def loss(x: Any, g: Any, b: Any) -> Any:
        return jnp.sum(f(x, g, b, state)[0] * p.dy)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p.x, p.gamma, p.beta)
    want = multibn.batch_norm_vjp(p.x, p.gamma, p.beta, p.state(), p.dy, convention="torch", axis=1)
    assert_grads_close(grads, want, rtol=2e-4, atol=2e-5)
    # eval mode under jit and grad; the state is passed through unchanged
    ev = jax.jit(lambda x, s: multibn.batch_norm(x, p.gamma, p.beta, s, training=False, convention="torch",
                                                 backend="jax"))
    y, same = ev(p.x, state)
    np.testing.assert_allclose(np.asarray(y), reference_forward(p.astype(np.float64), training=False, eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(same, state, strict=True))


def test_jax_vmap_independent_problems() -> None:
    """vmap over a leading batch of problems, each with its own state, equals solving them one by one."""
    jax = need("jax")
    jnp = jax.numpy
    problems = [make_problem((6, 3), 1, seed=20 + i).astype(np.float32) for i in range(4)]
    xs = jnp.stack([q.x for q in problems])
    dys = jnp.stack([q.dy for q in problems])
    gamma, beta = problems[0].gamma, problems[0].beta
    states = BNState(jnp.stack([q.rmean for q in problems]), jnp.stack([q.rvar for q in problems]),
                     jnp.arange(4, dtype=jnp.int32))

    def f(x: Any, state: BNState) -> Any:
        return multibn.batch_norm(x, gamma, beta, state, training=True, convention="flax", axis=1, backend="jax")

    ys, new = jax.jit(jax.vmap(f))(xs, states)

    def loss(x: Any, g: Any, b: Any, dy: Any) -> Any:
        return jnp.sum(multibn.batch_norm(x, g, b, None, convention="flax", axis=1, backend="jax")[0] * dy)

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None, 0))(xs, gamma, beta, dys)
    for i, q in enumerate(problems):
        state_i = BNState(jnp.asarray(q.rmean), jnp.asarray(q.rvar), jnp.asarray(i, jnp.int32))
        y_i, new_i = f(jnp.asarray(q.x), state_i)
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y_i), rtol=1e-6, atol=1e-6)
        for a, b in zip(new, new_i, strict=True):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-6, atol=1e-6)
        want = multibn.batch_norm_vjp(q.x, gamma, beta, None, q.dy, convention="flax", axis=1)
        assert_grads_close([np.asarray(g[i]) for g in grads], want, rtol=2e-4, atol=2e-5)
    assert np.asarray(new.num_batches_tracked).tolist() == [1, 2, 3, 4]
