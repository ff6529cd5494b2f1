"""The implementations of one (case, pass) on each framework (listed in :mod:`multibn.cli.bench`), as runners: one
device-synchronised repetition each. ``roofline`` is two runners, ``roofline:sum`` and ``roofline:copy``, from
which :func:`multibn.cli.bench.timing.measure` builds it.

Each framework has a table ``implementation -> builder``; a builder takes the framework's arrays of the case and
returns its runners. :data:`IMPLS` maps a backend to the function that builds the asked-for implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cases import Case, Runner, Skip, installed, make_data

Builder = Callable[[Any], dict[str, Runner]]


def _build(table: dict[str, Builder], data: Any, impls: Sequence[str]) -> dict[str, Runner]:
    """The runners of the implementations in ``impls`` that ``table`` has, in the table's order."""
    out: dict[str, Runner] = {}
    for impl, build in table.items():
        if impl in impls:
            out.update(build(data))
    return out


# ---- torch ---------------------------------------------------------------------------------------------------
class _Torch:
    """x, dy, gamma, beta of a case on a torch device, and the step every implementation times."""

    def __init__(self, case: Case, pass_: str, device: str) -> None:
        import torch

        self.torch, self.case = torch, case
        self.dev = "cuda" if device == "gpu" else "cpu"
        dt = getattr(torch, case.dtype)
        xn, dyn, gn, bn = make_data(case)
        self.x = torch.from_numpy(xn).to(self.dev, dt)
        self.dy = torch.from_numpy(dyn).to(self.dev, dt)
        self.g = torch.from_numpy(gn).to(self.dev)
        self.b = torch.from_numpy(bn).to(self.dev)
        self.c = case.shape[case.axis]
        self.bwd = pass_ == "fwd+bwd"

    def to_native(self, t: Any) -> Any:
        """channels last: torch's BN takes the NCHW view of the same memory (channels_last memory format)."""
        return t.permute(0, 3, 1, 2) if self.case.axis == 3 else t

    def sync(self) -> None:
        if self.x.is_cuda:
            self.torch.cuda.synchronize()

    def step(self, fn: Callable[[Any, Any, Any], Any]) -> Runner:
        xs, gs, bs = (t.detach().clone().requires_grad_(self.bwd) for t in (self.x, self.g, self.b))

        def run() -> None:
            y = fn(xs, gs, bs)
            if self.bwd:
                self.torch.autograd.grad(y, (xs, gs, bs), self.to_native(self.dy) if y.shape != self.dy.shape
                                         else self.dy)
            self.sync()

        return run


def _torch_native(t: _Torch) -> dict[str, Runner]:
    import torch.nn.functional as F

    rm, rv = t.torch.zeros(t.c, device=t.dev), t.torch.ones(t.c, device=t.dev)
    return {"native": t.step(lambda x_, g_, b_: F.batch_norm(t.to_native(x_), rm, rv, g_, b_, True, 0.1, 1e-5))}


def _torch_multibn(t: _Torch, compiled: bool = False) -> dict[str, Runner]:
    import multibn

    state = [multibn.init_state(t.c, backend="torch", device=t.dev)]

    def mbn(x_: Any, g_: Any, b_: Any) -> Any:
        y, state[0] = multibn.batch_norm(x_, g_, b_, state[0], convention="torch", axis=t.case.axis)
        return y

    if compiled:
        return {"multibn-compiled": t.step(t.torch.compile(mbn))}
    return {"multibn": t.step(mbn)}


def _torch_keras(t: _Torch) -> dict[str, Runner]:
    import keras

    layer = keras.layers.BatchNormalization(axis=t.case.axis, momentum=0.9, epsilon=1e-5, dtype=t.case.dtype)
    layer.build(t.case.shape)
    weights = [w.value for w in layer.trainable_weights]
    xk = t.x.detach().clone().requires_grad_(t.bwd)

    def run() -> None:
        y = layer(xk, training=True)
        if t.bwd:
            t.torch.autograd.grad(y, (xk, *weights), t.dy)
        t.sync()

    return {"keras": run}


def _torch_roofline(t: _Torch) -> dict[str, Runner]:
    buf = t.torch.empty_like(t.x)

    def tsum() -> None:
        t.x.sum()
        t.sync()

    def tcopy() -> None:
        buf.copy_(t.x)
        t.sync()

    return {"roofline:sum": tsum, "roofline:copy": tcopy}


_TORCH: dict[str, Builder] = {
    "native": _torch_native, "multibn": _torch_multibn,
    "multibn-compiled": lambda t: _torch_multibn(t, compiled=True), "keras": _torch_keras, "roofline": _torch_roofline,
}


def torch_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if pass_ == "layer":
        return torch_layer_impls(case, impls, "cuda" if device == "gpu" else "cpu")
    return _build(_TORCH, _Torch(case, pass_, device), impls)


def torch_layer_impls(case: Case, impls: Sequence[str], dev: str) -> dict[str, Runner]:
    """``multibn.layers.torch.BatchNorm`` against ``nn.BatchNorm1d/2d/3d``: training forward, then the gradients of
    the input and both parameters. An ``nhwc`` case is the same memory seen as NCHW: the channels_last memory
    format, which both layers take with channel axis 1 (as in a channels_last model)."""
    import torch

    from multibn.layers.torch import BatchNorm

    if case.axis not in (1, len(case.shape) - 1):
        raise Skip("torch layers take channels first, or channels last as the channels_last memory format")
    xn, dyn, _, _ = make_data(case)
    dt = getattr(torch, case.dtype)
    perm = (0, case.axis, *range(1, case.axis)) if case.axis != 1 else tuple(range(len(case.shape)))
    x = torch.from_numpy(xn).to(dev, dt).permute(perm).detach().requires_grad_(True)
    dy = torch.from_numpy(dyn).to(dev, dt).permute(perm)
    c, nd = case.shape[case.axis], len(case.shape)
    native_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    layers = {"native": native_cls[nd](c), "multibn": BatchNorm(c, nd)}
    out: dict[str, Runner] = {}
    for impl, layer in layers.items():
        if impl not in impls:
            continue
        layer = layer.to(dev, dt if case.dtype == "float64" else torch.float32).train()

        def run(layer: Any = layer) -> None:
            y = layer(x)
            torch.autograd.grad(y, (x, *layer.parameters()), dy)
            if x.is_cuda:
                torch.cuda.synchronize()

        out[impl] = run
    return out


# ---- JAX -----------------------------------------------------------------------------------------------------
class _Jax:
    """x, dy, gamma, beta of a case on a JAX device, and the jitted step every implementation times."""

    def __init__(self, case: Case, pass_: str, device: str) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.case = jax, jnp, case
        dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
        xn, dyn, gn, bn = make_data(case)
        self.x, self.dy = (jax.device_put(jnp.asarray(a, dtype=case.dtype), dev) for a in (xn, dyn))
        self.g, self.b = (jax.device_put(jnp.asarray(a), dev) for a in (gn, bn))
        self.c = case.shape[case.axis]
        self.bwd = pass_ in ("fwd+bwd", "layer")

    def stateful(self, apply: Callable[[Any, Any, Any, Any], tuple[Any, Any]], state: Any) -> Runner:
        """apply(x, g, b, state) -> (y, new_state), under jit; fwd+bwd adds the vjp wrt (x, g, b)."""
        jax, bwd = self.jax, self.bwd

        def f(x_: Any, g_: Any, b_: Any, st: Any, dy_: Any) -> Any:
            if not bwd:
                return apply(x_, g_, b_, st)
            y, vjp, new = jax.vjp(lambda *a: apply(*a, st), x_, g_, b_, has_aux=True)
            return y, vjp(dy_), new

        f = jax.jit(f)  # every array is an argument: a closed-over one would be an XLA constant, folded slowly
        box = [state]

        def run() -> None:
            res = f(self.x, self.g, self.b, box[0], self.dy)
            box[0] = res[-1]
            jax.block_until_ready(res)

        return run


def _jax_multibn(j: _Jax) -> dict[str, Runner]:
    import multibn

    def mbn(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
        return multibn.batch_norm(x_, g_, b_, st, convention="flax", axis=j.case.axis)

    return {"multibn": j.stateful(mbn, multibn.init_state(j.c, backend="jax"))}


def _jax_layer(j: _Jax) -> dict[str, Runner]:
    from multibn.layers.jax import BatchNorm

    layer = BatchNorm(j.c, axis=j.case.axis)

    def layer_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
        return layer.apply({"scale": g_, "bias": b_}, st, x_, training=True)

    return {"multibn": j.stateful(layer_apply, layer.init()[1])}


def _flax_native(j: _Jax) -> dict[str, Runner]:
    if not installed(["flax"]):
        return {}
    import flax.linen as nn

    model = nn.BatchNorm(use_running_average=False, axis=j.case.axis, momentum=0.99, epsilon=1e-5,
                         dtype=j.case.dtype, param_dtype=j.jnp.float32)
    variables = model.init(j.jax.random.PRNGKey(0), j.x[:2])

    def flax_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
        y, upd = model.apply({"params": {"scale": g_, "bias": b_}, "batch_stats": st}, x_, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return {"native": j.stateful(flax_apply, variables["batch_stats"])}


def _jax_keras(j: _Jax) -> dict[str, Runner]:
    import keras

    layer = keras.layers.BatchNormalization(axis=j.case.axis, momentum=0.99, epsilon=1e-5, dtype=j.case.dtype)
    layer.build(j.case.shape)
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def keras_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
        return layer.stateless_call([g_, b_], st, x_, training=True)

    return {"keras": j.stateful(keras_apply, non_trainable)}


def _jax_roofline(j: _Jax) -> dict[str, Runner]:
    jax, jnp = j.jax, j.jnp
    axes = tuple(range(len(j.case.shape)))
    red = jax.jit(lambda a: jnp.sum(a, axis=axes))
    copy = jax.jit(lambda a, k: a + k)  # a streaming pass: read x, write a new buffer
    k = jnp.asarray(0, dtype=j.case.dtype)

    def jsum() -> None:
        red(j.x).block_until_ready()

    def jcopy() -> None:
        copy(j.x, k).block_until_ready()

    return {"roofline:sum": jsum, "roofline:copy": jcopy}


_JAX: dict[str, Builder] = {"multibn": _jax_multibn, "native": _flax_native, "keras": _jax_keras,
                            "roofline": _jax_roofline}
_JAX_LAYER: dict[str, Builder] = dict(_JAX, multibn=_jax_layer)


def jax_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    return _build(_JAX_LAYER if pass_ == "layer" else _JAX, _Jax(case, pass_, device), impls)


# ---- MXNet ---------------------------------------------------------------------------------------------------
def import_mxnet() -> Any:
    """``mxnet``, imported the way multibn does (np.bool alias, torch threads restored)."""
    from multibn.backends import get_backend

    get_backend("mxnet")
    import mxnet as mx

    return mx


class _MXNet:
    """x, dy, gamma, beta of a case in an MXNet context, and the step every implementation times."""

    def __init__(self, case: Case, pass_: str, ctx: Any) -> None:
        mx = self.mx = import_mxnet()
        self.case, self.ctx = case, ctx
        xn, dyn, gn, bn = make_data(case)
        self.x, self.dy = (mx.nd.array(a, ctx=ctx, dtype=case.dtype) for a in (xn, dyn))
        self.g, self.b = (mx.nd.array(a, ctx=ctx) for a in (gn, bn))
        self.c = case.shape[case.axis]
        self.bwd = pass_ == "fwd+bwd"

    def step(self, fn: Callable[[Any, Any, Any], Any]) -> Runner:
        mx, bwd = self.mx, self.bwd
        xs, gs, bs = (a.copy() for a in (self.x, self.g, self.b))
        if bwd:
            for a in (xs, gs, bs):
                a.attach_grad()

        def run() -> None:
            if bwd:
                with mx.autograd.record(train_mode=True):
                    y = fn(xs, gs, bs)
                y.backward(self.dy)
            else:
                with mx.autograd.train_mode():
                    fn(xs, gs, bs)
            mx.nd.waitall()

        return run


def _mxnet_native(m: _MXNet) -> dict[str, Runner]:
    nd = m.mx.nd
    mm, mv = nd.zeros(m.c, ctx=m.ctx), nd.ones(m.c, ctx=m.ctx)
    return {"native": m.step(lambda x_, g_, b_: nd.BatchNorm(
        x_, g_, b_, mm, mv, eps=1e-5, momentum=0.9, fix_gamma=False, axis=m.case.axis))}


def _mxnet_multibn(m: _MXNet) -> dict[str, Runner]:
    import multibn

    state = [multibn.init_state(m.c, backend="mxnet", device=m.ctx)]

    def mbn(x_: Any, g_: Any, b_: Any) -> Any:
        y, state[0] = multibn.batch_norm(x_, g_, b_, state[0], convention="gluon", axis=m.case.axis)
        return y

    return {"multibn": m.step(mbn)}


def _mxnet_roofline(m: _MXNet) -> dict[str, Runner]:
    mx, case, x = m.mx, m.case, m.x
    buf = mx.nd.empty(case.shape, ctx=m.ctx, dtype=case.dtype)
    # MXNet's own nd.sum reads at a fraction of the bandwidth (no AVX in the wheel): its fastest full read of
    # x is a BLAS product with a ones vector, which is what the roofline takes as "one reduction pass"
    flat = x.reshape((-1, case.shape[-1]))
    ones = mx.nd.ones((case.shape[-1], 1), ctx=m.ctx, dtype=case.dtype)

    def msum() -> None:
        mx.nd.dot(flat, ones) if case.dtype in ("float32", "float64") else mx.nd.sum(x)  # CPU dot: no fp16
        mx.nd.waitall()

    def mcopy() -> None:
        x.copyto(buf)
        mx.nd.waitall()

    return {"roofline:sum": msum, "roofline:copy": mcopy}


_MXNET: dict[str, Builder] = {"native": _mxnet_native, "multibn": _mxnet_multibn, "roofline": _mxnet_roofline}


def mxnet_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if case.dtype == "bfloat16":
        raise Skip("MXNet 1.9 has no bfloat16")
    mx = import_mxnet()
    ctx = mx.gpu(0) if device == "gpu" else mx.cpu()
    if pass_ == "layer":
        return gluon_layer_impls(case, impls, ctx)
    return _build(_MXNET, _MXNet(case, pass_, ctx), impls)


def gluon_layer_impls(case: Case, impls: Sequence[str], ctx: Any) -> dict[str, Runner]:
    """multibn's Gluon ``BatchNorm`` against ``gluon.nn.BatchNorm``, both hybridized: a recorded training forward and
    its backward (gradients of the input and of gamma and beta)."""
    mx = import_mxnet()
    from multibn.layers.gluon import BatchNorm

    xn, dyn, _, _ = make_data(case)
    x, dy = (mx.nd.array(a, ctx=ctx, dtype=case.dtype) for a in (xn, dyn))
    x.attach_grad()
    c = case.shape[case.axis]
    layers = {"native": lambda: mx.gluon.nn.BatchNorm(axis=case.axis, in_channels=c),
              "multibn": lambda: BatchNorm(c, axis=case.axis)}
    out: dict[str, Runner] = {}
    for impl, make in layers.items():
        if impl not in impls:
            continue
        layer = make()
        layer.initialize(ctx=ctx)
        layer.hybridize()

        def run(layer: Any = layer) -> None:
            with mx.autograd.record():
                y = layer(x)
            y.backward(dy)
            mx.nd.waitall()

        out[impl] = run
    return out


# ---- NumPy ---------------------------------------------------------------------------------------------------
class _NumPy:
    def __init__(self, case: Case, pass_: str) -> None:
        xn, dyn, self.g, self.b = make_data(case)
        self.x, self.dy = xn.astype(case.dtype), dyn.astype(case.dtype)
        self.case, self.pass_ = case, pass_
        self.c = case.shape[case.axis]


def _numpy_multibn(n: _NumPy) -> dict[str, Runner]:
    import multibn

    state = [multibn.init_state(n.c, backend="numpy")]
    axis = n.case.axis

    def run() -> None:
        _, state[0] = multibn.batch_norm(n.x, n.g, n.b, state[0], convention="torch", axis=axis)
        if n.pass_ == "fwd+bwd":
            multibn.batch_norm_vjp(n.x, n.g, n.b, None, n.dy, convention="torch", axis=axis)

    return {"multibn": run}


def _numpy_roofline(n: _NumPy) -> dict[str, Runner]:
    buf = np.empty_like(n.x)

    def nsum() -> None:
        n.x.sum()

    def ncopy() -> None:
        np.copyto(buf, n.x)

    return {"roofline:sum": nsum, "roofline:copy": ncopy}


_NUMPY: dict[str, Builder] = {"multibn": _numpy_multibn, "roofline": _numpy_roofline}


def numpy_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if case.dtype == "bfloat16":
        raise Skip("NumPy has no bfloat16")
    if pass_ == "layer":
        raise Skip("NumPy has no layer (multibn.batch_norm_vjp is its backward)")
    if device == "gpu":
        raise Skip("NumPy runs on the CPU only")
    return _build(_NUMPY, _NumPy(case, pass_), impls)


#: backend -> the runners of the asked-for implementations of one (case, pass) on a device ("cpu" or "gpu")
IMPLS: dict[str, Callable[[Case, str, Sequence[str], str], dict[str, Runner]]] = {
    "numpy": numpy_impls, "torch": torch_impls, "jax": jax_impls, "mxnet": mxnet_impls,
}
