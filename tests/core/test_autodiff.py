"""Every derivative a framework's own BN gives, from multibn's one tangent rule and its transpose.

* torch, against ``F.batch_norm`` (float64): double backward (``gradgradcheck``, Hessian-vector products),
  forward-mode AD, ``torch.func`` (``grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``vmap``, ``hessian``);
* jax, against JAX's autodiff of the textbook formula (float64): ``jvp``, ``jacfwd``, ``linearize``, ``hessian``,
  reverse mode under ``jit``;
* the running statistics in eval mode get their true gradient (they are inputs of an affine map), on every
  autodiff backend: against autodiff of the textbook formula, and against Flax's ``BatchNorm`` on jax;
* the new running statistics are differentiable functions of ``x`` (JAX threads them as outputs).
"""

from __future__ import annotations

import numpy as np
import pytest

import multibn
from multibn import BNState
from tests.helpers import jax_float64, need, require, to_numpy

SHAPES = [((6, 3), 1), ((4, 3, 5), 1), ((3, 2, 3, 4), 1), ((5, 4, 3), -1)]


def _data(shape: tuple[int, ...], axis: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = shape[axis]
    return {
        "x": rng.normal(size=shape) * 1.7 + 0.4, "gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(size=c),
        "rmean": 0.3 * rng.normal(size=c), "rvar": rng.uniform(0.5, 2.0, c), "dy": rng.normal(size=shape),
    }


# ---- torch ------------------------------------------------------------------------------------------------------
def _torch_fns(axis: int, training: bool, eps: float = 1e-5):
    """(multibn, native) as functions of (x, gamma, beta[, rmean, rvar]) with channels on ``axis``."""
    import torch
    import torch.nn.functional as F

    def native(x, g, b, rm=None, rv=None):
        xm = torch.movedim(x, axis, 1)
        y = F.batch_norm(xm, rm, rv, g, b, training=training, eps=eps)
        return torch.movedim(y, 1, axis)

    def mine(x, g, b, rm=None, rv=None):
        state = None if rm is None else BNState(rm, rv, torch.tensor(0))
        return multibn.batch_norm(x, g, b, state, training=training, axis=axis, eps=eps)[0]

    return mine, native


def _torch_args(d: dict, training: bool, requires_grad: bool = True) -> tuple:
    import torch

    names = ("x", "gamma", "beta") if training else ("x", "gamma", "beta", "rmean", "rvar")
    return tuple(torch.tensor(d[k], dtype=torch.float64, requires_grad=requires_grad) for k in names)


@pytest.mark.torch
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_torch_gradgradcheck(shape: tuple, axis: int, training: bool) -> None:
    require("torch")
    import torch

    mine, _ = _torch_fns(axis, training)
    args = _torch_args(_data(shape, axis), True)[:3]
    if not training:  # the running statistics as constants here: native BN refuses their gradient
        d = _data(shape, axis)
        rm, rv = torch.tensor(d["rmean"]), torch.tensor(d["rvar"])
        assert torch.autograd.gradgradcheck(lambda x, g, b: mine(x, g, b, rm, rv), args)
    else:
        assert torch.autograd.gradgradcheck(mine, args)


@pytest.mark.torch
@pytest.mark.parametrize(("shape", "axis"), SHAPES[:3])
@pytest.mark.parametrize("training", [True, False])
def test_torch_hessian_vector_products_equal_native(shape: tuple, axis: int, training: bool) -> None:
    require("torch")
    import torch

    d = _data(shape, axis)
    mine, native = _torch_fns(axis, training)
    consts = () if training else (torch.tensor(d["rmean"]), torch.tensor(d["rvar"]))
    w = torch.tensor(d["dy"])
    v = tuple(torch.tensor(np.random.default_rng(1).normal(size=np.shape(d[k]))) for k in ("x", "gamma", "beta"))
    out = []
    for f in (mine, native):
        def loss(x, g, b, f=f):
            return (torch.tanh(f(x, g, b, *consts)) * w).sum()  # a non-quadratic loss: the Hessian sees every term

        out.append(torch.autograd.functional.hvp(loss, _torch_args(d, True, False)[:3], v)[1])
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.torch
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_torch_forward_ad_equals_native(shape: tuple, axis: int, training: bool) -> None:
    require("torch")
    import torch
    import torch.autograd.forward_ad as fwAD

    d = _data(shape, axis)
    mine, native = _torch_fns(axis, training)
    primals = _torch_args(d, True, False)[:3]
    consts = () if training else (torch.tensor(d["rmean"]), torch.tensor(d["rvar"]))
    rng = np.random.default_rng(2)
    tangents = tuple(torch.tensor(rng.normal(size=p.shape)) for p in primals)
    got = []
    for f in (mine, native):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            got.append(fwAD.unpack_dual(f(*duals, *consts)).tangent)
    torch.testing.assert_close(got[0], got[1], rtol=1e-10, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize(("shape", "axis"), SHAPES[:3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd", "hessian"])
def test_torch_func_jacobians_equal_native(shape: tuple, axis: int, training: bool, transform: str) -> None:
    require("torch")
    import torch
    import torch.func as tf

    d = _data(shape, axis)
    mine, native = _torch_fns(axis, training)
    args = _torch_args(d, True, False)[:3]
    consts = () if training else (torch.tensor(d["rmean"]), torch.tensor(d["rvar"]))
    w = torch.tensor(d["dy"])

    def wrap(f):
        if transform == "hessian":
            return lambda x, g, b: (torch.sin(f(x, g, b, *consts)) * w).sum()
        return lambda x, g, b: f(x, g, b, *consts)

    jac = getattr(tf, transform)
    # torch 2.13's own F.batch_norm gives wrong mixed x-gamma second derivatives under torch.func.hessian (it
    # agrees with the textbook under plain double backward): there the reference is autodiff of the textbook
    references = [_torch_textbook(axis, training)] + ([native] if transform != "hessian" else [])
    got = jac(wrap(mine), argnums=(0, 1, 2))(*args)
    for ref in references:
        want = jac(wrap(ref), argnums=(0, 1, 2))(*args)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _torch_textbook(axis: int, training: bool, eps: float = 1e-5):
    """The textbook BN as plain torch ops (centred form), for torch's own autodiff."""
    import torch

    def f(x, g, b, rm=None, rv=None):
        axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        shape = [1] * x.ndim
        shape[axis] = -1
        if training:
            mean = x.mean(axes, keepdim=True)
            var = ((x - mean) ** 2).mean(axes, keepdim=True)
        else:
            mean, var = rm.reshape(shape), rv.reshape(shape)
        return (x - mean) / torch.sqrt(var + eps) * g.reshape(shape) + b.reshape(shape)

    return f


@pytest.mark.torch
@pytest.mark.parametrize("training", [True, False])
def test_torch_func_grad_jvp_vmap_equal_native(training: bool) -> None:
    require("torch")
    import torch
    import torch.func as tf

    shape, axis = (4, 3, 5), 1
    d = _data(shape, axis)
    mine, native = _torch_fns(axis, training)
    x, g, b = _torch_args(d, True, False)[:3]
    consts = () if training else (torch.tensor(d["rmean"]), torch.tensor(d["rvar"]))
    w = torch.tensor(d["dy"])
    gm, gn = (tf.grad(lambda x, g, b, f=f: (f(x, g, b, *consts) ** 3 * w).sum(), argnums=(0, 1, 2))(x, g, b)
              for f in (mine, native))
    for a, c in zip(gm, gn, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    t = tuple(torch.randn_like(v) for v in (x, g, b))
    (ym, tm), (yn, tn) = (tf.jvp(lambda x, g, b, f=f: f(x, g, b, *consts), (x, g, b), t) for f in (mine, native))
    torch.testing.assert_close(ym, yn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tm, tn, rtol=1e-10, atol=1e-12)
    xs = torch.tensor(np.random.default_rng(3).normal(size=(7, *shape)))  # 7 independent batches
    vm, vn = (tf.vmap(lambda x, f=f: f(x, g, b, *consts))(xs) for f in (mine, native))
    torch.testing.assert_close(vm, vn, rtol=1e-10, atol=1e-12)
    # gradients of a vmapped loss (per-batch gradients, as in per-sample-gradient code)
    gm, gn = (tf.vmap(tf.grad(lambda x, f=f: (f(x, g, b, *consts) ** 2 * w).sum()))(xs) for f in (mine, native))
    torch.testing.assert_close(gm, gn, rtol=1e-10, atol=1e-12)


@pytest.mark.torch
def test_torch_fast_kernels_and_autograd_agree_at_scale() -> None:
    """A tensor large enough for the chunked CPU kernels: forward, backward and double backward still native."""
    require("torch")
    import torch
    import torch.nn.functional as F

    x = torch.randn(32, 8, 24, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn_like(x)
    out = []
    for f in (lambda x: multibn.batch_norm(x)[0], lambda x: F.batch_norm(x, None, None, training=True)):
        (gx,) = torch.autograd.grad((f(x) ** 2 * w).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * w).sum(), x)
        out.append((gx.detach(), ggx))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.torch
def test_torch_eval_running_statistics_get_their_true_gradient() -> None:
    """Native BN refuses this gradient (RuntimeError); multibn gives the true one, never None."""
    require("torch")
    import torch

    d = _data((4, 3, 5), 1)
    x, g, b, rm, rv = _torch_args(d, False)
    y = multibn.batch_norm(x, g, b, BNState(rm, rv, torch.tensor(0)), training=False)[0]
    w = torch.tensor(d["dy"])
    grads = torch.autograd.grad((y * w).sum(), (rm, rv))
    x2, g2, b2, rm2, rv2 = _torch_args(d, False)
    ref = (x2 - rm2[:, None]) / torch.sqrt(rv2[:, None] + 1e-5) * g2[:, None] + b2[:, None]
    want = torch.autograd.grad((ref * w).sum(), (rm2, rv2))
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):  # what native BN does with the same request
        rm3, rv3 = rm2.detach().requires_grad_(), rv2.detach().requires_grad_()
        torch.nn.functional.batch_norm(x2, rm3, rv3, g2, b2, training=False).sum().backward()


# ---- jax --------------------------------------------------------------------------------------------------------
def _jax_textbook(axis: int, training: bool, eps: float = 1e-5):
    import jax.numpy as jnp

    def f(x, g, b, rm=None, rv=None):
        axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        shape = [1] * x.ndim
        shape[axis] = -1
        if training:
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
        else:
            mean, var = rm.reshape(shape), rv.reshape(shape)
        return (x - mean) / jnp.sqrt(var + eps) * g.reshape(shape) + b.reshape(shape)

    return f


def _jax_mine(axis: int, training: bool, eps: float = 1e-5):
    def f(x, g, b, rm=None, rv=None):
        state = None if rm is None else BNState(rm, rv, 0)
        return multibn.batch_norm(x, g, b, state, training=training, axis=axis, eps=eps)[0]

    return f


def _close_trees(got: object, want: object, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_jax_forward_mode_equals_textbook_autodiff(shape: tuple, axis: int, training: bool) -> None:
    require("jax")
    import jax
    import jax.numpy as jnp

    with jax_float64("jax"):
        d = _data(shape, axis)
        names = ("x", "gamma", "beta") if training else ("x", "gamma", "beta", "rmean", "rvar")
        args = tuple(jnp.asarray(d[k]) for k in names)
        argnums = tuple(range(len(args)))
        mine, ref = _jax_mine(axis, training), _jax_textbook(axis, training)
        rng = np.random.default_rng(4)
        tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        # multibn's side eagerly for jvp and linearize (each transformation traced op by op) and compiled for the
        # Jacobians and the Hessian (batched tangents: op by op they cost a minute); the textbook reference compiled
        _close_trees(jax.jvp(mine, args, tangents), jax.jit(lambda a, t: jax.jvp(ref, a, t))(args, tangents))
        _close_trees(jax.jit(jax.jacfwd(mine, argnums=argnums))(*args),
                     jax.jit(jax.jacfwd(ref, argnums=argnums))(*args))
        _close_trees(jax.jit(jax.jacrev(mine, argnums=argnums))(*args),
                     jax.jit(jax.jacrev(ref, argnums=argnums))(*args))
        y, lin = jax.linearize(mine, *args)
        y_ref, lin_ref = jax.linearize(ref, *args)
        _close_trees((y, lin(*tangents)), (y_ref, lin_ref(*tangents)))
        w = jnp.asarray(d["dy"])

        def loss(f):
            return lambda *a: jnp.sum(jnp.tanh(f(*a)) * w)

        _close_trees(jax.jit(jax.hessian(loss(mine), argnums=argnums))(*args),
                     jax.jit(jax.hessian(loss(ref), argnums=argnums))(*args), rtol=1e-8, atol=1e-10)
        grad = jax.jit(jax.grad(loss(mine), argnums=argnums))
        _close_trees(grad(*args), jax.jit(jax.grad(loss(ref), argnums=argnums))(*args))


def test_jax_new_running_statistics_are_differentiable() -> None:
    """JAX threads the state as an output: its derivative with respect to x is the true one, not zero."""
    require("jax")
    import jax
    import jax.numpy as jnp

    with jax_float64("jax"):
        d = _data((6, 3, 4), 1)
        x, g, b = (jnp.asarray(d[k]) for k in ("x", "gamma", "beta"))

        def mine(x):
            _, st = multibn.batch_norm(x, g, b, BNState(jnp.zeros(3), jnp.ones(3), 0), convention="torch")
            return jnp.sum(st.running_mean * jnp.arange(1.0, 4.0)) + jnp.sum(st.running_var ** 2)

        def ref(x):
            m = x.mean((0, 2))
            v = ((x - m[None, :, None]) ** 2).sum((0, 2)) / (x.size // 3 - 1)
            return jnp.sum(0.1 * m * jnp.arange(1.0, 4.0)) + jnp.sum((0.9 + 0.1 * v) ** 2)

        _close_trees(jax.grad(mine)(x), jax.grad(ref)(x))
        _close_trees(jax.jacfwd(mine)(x), jax.grad(ref)(x))


def test_jax_eval_running_statistics_gradient_equals_flax() -> None:
    require("jax")
    flax = need("flax")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    del flax
    with jax_float64("jax"):
        d = _data((8, 3), 1)
        x = jnp.asarray(d["x"])
        params = {"scale": jnp.asarray(d["gamma"]), "bias": jnp.asarray(d["beta"])}
        stats = {"mean": jnp.asarray(d["rmean"]), "var": jnp.asarray(d["rvar"])}
        w = jnp.asarray(d["dy"])
        bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5, param_dtype=jnp.float64, dtype=jnp.float64)

        def flax_loss(params, stats):
            return jnp.sum(bn.apply({"params": params, "batch_stats": stats}, x) * w)

        def mine_loss(params, stats):
            y, _ = multibn.batch_norm(x, params["scale"], params["bias"], BNState(stats["mean"], stats["var"], 0),
                                      training=False, convention="flax")
            return jnp.sum(y * w)

        want = jax.grad(flax_loss, argnums=(0, 1))(params, stats)
        _close_trees(jax.grad(mine_loss, argnums=(0, 1))(params, stats), want)
        assert float(jnp.max(jnp.abs(want[1]["var"]))) > 0  # a real gradient, which multibn once gave as zero


@pytest.mark.mxnet
@pytest.mark.parametrize("convention", ["gluon", "mxnet"])
def test_mxnet_eval_running_statistics_gradient(convention: str) -> None:
    require("mxnet")
    from multibn.backends.mxnet import mx

    d = _data((4, 3, 5), 1)
    x, g, b, rm, rv, dy = (mx.nd.array(d[k], dtype="float64") for k in ("x", "gamma", "beta", "rmean", "rvar", "dy"))
    for a in (x, g, b, rm, rv):
        a.attach_grad()
    with mx.autograd.record(train_mode=False):
        y, _ = multibn.batch_norm(x, g, b, BNState(rm, rv, 0), training=False, convention=convention)
    y.backward(dy)
    gamma = np.ones(3) if convention == "mxnet" else d["gamma"]
    eps = 1e-3 if convention == "mxnet" else 1e-5
    s = 1 / np.sqrt(d["rvar"] + eps)
    sum_dy = d["dy"].sum((0, 2))
    sum_dy_xc = (d["dy"] * (d["x"] - d["rmean"][:, None])).sum((0, 2))
    np.testing.assert_allclose(rm.grad.asnumpy(), -gamma * s * sum_dy, rtol=1e-10)
    np.testing.assert_allclose(rv.grad.asnumpy(), -0.5 * gamma * s**3 * sum_dy_xc, rtol=1e-10)


def test_numpy_gradient_functions_share_the_rule() -> None:
    """batch_norm_vjp (NumPy's way to train) and torch autograd give the same eval-mode dx, dgamma, dbeta."""
    require("torch")
    import torch

    d = _data((4, 3, 5), 1)
    got = multibn.batch_norm_vjp(d["x"], d["gamma"], d["beta"], BNState(d["rmean"], d["rvar"], 0), d["dy"],
                                 training=False)
    x, g, b = (torch.tensor(d[k], requires_grad=True) for k in ("x", "gamma", "beta"))
    y = torch.nn.functional.batch_norm(x, torch.tensor(d["rmean"]), torch.tensor(d["rvar"]), g, b, training=False)
    want = torch.autograd.grad(y, (x, g, b), torch.tensor(d["dy"]))
    for a, w in zip(got, want, strict=True):
        np.testing.assert_allclose(to_numpy(a), w.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("training", [True, False])
def test_torch_layer_double_backward_and_functional_call_equal_native(training: bool) -> None:
    require("torch")
    import torch
    from torch.func import functional_call, grad, vmap

    from multibn.layers.torch import BatchNorm

    torch.manual_seed(0)
    mine, native = BatchNorm(3, 4).double(), torch.nn.BatchNorm2d(3).double()
    for m in (mine, native):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
        m.train(training)
    mine.load_state_dict(native.state_dict())
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().requires_grad_() for k, v in native.named_parameters()}

    def f(m):
        return lambda x, w, b: functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(f(mine), (x, params["weight"], params["bias"]))
    v = tuple(torch.randn_like(t) for t in (x, params["weight"], params["bias"]))
    hvps = [torch.autograd.functional.hvp(lambda *a, m=m: (torch.tanh(f(m)(*a)) ** 2).sum(),
                                          (x.detach(), params["weight"].detach(), params["bias"].detach()), v)[1]
            for m in (mine, native)]
    for a, b in zip(*hvps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if not training:  # per-example gradients with vmap (native BN refuses vmap in training with running stats)
        xs = torch.randn(5, 4, 3, 2, 3, dtype=torch.float64)
        got, want = (vmap(grad(lambda x, m=m: (f(m)(x, params["weight"], params["bias"]) ** 2).sum()))(xs)
                     for m in (mine, native))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
