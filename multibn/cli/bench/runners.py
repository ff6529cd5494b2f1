"""``multibn bench``: multibn against each framework's native batch norm and the memory roofline.

Every implementation of one (backend, case, dtype, pass) runs in one process, side by side: warm-up first, then
``reps`` timed repetitions interleaved (A B C A B C ...), each ended by the framework's device sync
(``mx.nd.waitall``, ``block_until_ready``, ``torch.cuda.synchronize`` on a GPU). Reported: median and
interquartile range in ms, and the ratios of the medians to the native BN and to the roofline of the same run.

* ``multibn``: :func:`multibn.batch_norm` (training, running statistics updated) and, for ``fwd+bwd``, its
  gradient through the framework's autodiff; under ``jax.jit`` on JAX.
* ``multibn-compiled`` (``--compiled``, torch): the same call under ``torch.compile``.
* ``native``: ``torch.nn.functional.batch_norm``, ``mx.nd.BatchNorm``, ``flax.linen.BatchNorm`` under jit.
* ``keras``: Keras 3 ``BatchNormalization`` on its torch and jax backends, in one subprocess per Keras backend
  (Keras picks its backend at import), beside that framework's native BN for the ratio.
* The ``mem`` pass is not timed: it measures the peak memory of one forward+backward pass of ``multibn`` and
  ``native`` (and ``multibn-compiled``), each in a fresh subprocess, and multibn's excess in activations (see
  :func:`peak_memory_here`).
* ``roofline``: one reduction pass plus one streaming pass over ``x`` forward (``sum`` + copy), 6 reads and
  2 writes forward+backward (4 ``sum`` + 2 copies), with the same library's ``sum`` and copy into an existing
  buffer (MXNet: its ``nd.sum`` is far off the bandwidth, so the reduction pass is a BLAS product with a ones
  vector, its fastest full read). NumPy is single-threaded, so its roofline is too.

Cases are named ``nchw_AxBxCxD`` (channel axis 1), ``nhwc_AxBxCxD`` (channel axis 3) or ``nc_AxB``, optionally
with ``:dtype``; any such name works (``nchw_2x3x4x5`` is the smoke test's).
Nothing here imports a framework at module import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKENDS = ("numpy", "torch", "jax", "mxnet")
KERAS_BACKENDS = ("torch", "jax")
#: "layer": the framework layer's training forward and backward (multibn's layer against the native layer);
#: "mem": the peak memory of the fwd+bwd pass, one fresh subprocess per implementation (see :func:`measure_memory`)
PASSES = ("fwd", "fwd+bwd", "layer", "mem")
DEFAULT_PASSES = ("fwd", "fwd+bwd")
DEFAULT_CASES = ("nchw_64x64x56x56", "nhwc_64x56x56x64", "nchw_256x256x14x14", "nc_4096x1024",
                 "nchw_256x256x14x14:float16")
#: ``--small``: where real models spend their BN calls, and where the fixed cost of a call dominates
SMALL_CASES = ("nc_32x64", "nc_256x128", "nchw_32x16x8x8")
SMALL_PASSES = ("fwd", "layer")
#: ``--model lenet``: one training step per batch size; rows have pass "train-step" and case "lenet_b<batch>"
MODELS = {"lenet": (256, 32)}
MODEL_BACKENDS = ("torch", "mxnet", "jax")
#: the convention each backend's multibn run uses: that framework's own, so both sides do the same work
CONVENTION = {"numpy": "torch", "torch": "torch", "jax": "flax", "mxnet": "gluon"}
QUICK_CASES = ("nchw_256x256x14x14", "nc_4096x1024")
IMPL_ORDER = ("multibn", "multibn-compiled", "keras", "native", "roofline")
#: forward+backward passes measured by the "mem" pass, after one warm-up pass
MEM_PASSES = 3
#: the environment of a "mem" subprocess: glibc serves every block over 64 KiB by its own mmap and unmaps it when
#: freed, so resident memory follows live memory (and the kernel's high-water mark, updated at each unmap, sees
#: every peak); by default freed blocks stay resident in the heap and hide later peaks
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ---- cases ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: str
    axis: int = 1

    @classmethod
    def parse(cls, spec: str) -> Case:
        name, _, dtype = spec.partition(":")
        m = re.fullmatch(r"(nchw|nhwc|nc)_(\d+(?:x\d+)*)", name)
        shape = tuple(int(d) for d in m.group(2).split("x")) if m else ()
        if not m or len(shape) != len(m.group(1)):
            raise ValueError(f"case {spec!r}: expected nchw_AxBxCxD, nhwc_AxBxCxD or nc_AxB, optionally with :dtype")
        dtype = dtype or "float32"
        if dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise ValueError(f"case {spec!r}: dtype must be float16, bfloat16, float32 or float64")
        return cls(name, shape, dtype, 3 if m.group(1) == "nhwc" else 1)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (8 if self.dtype == "float64" else 4 if self.dtype == "float32" else 2)


def make_data(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (offset normal data), dy, gamma, beta as float32 NumPy arrays (cast per backend)."""
    rng = np.random.default_rng(0)
    c = case.shape[case.axis]
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
    return x, dy, gamma, beta


# ---- one backend's implementations ------------------------------------------------------------------------------
Runner = Callable[[], None]  # one repetition, device-synchronised


class Skip(Exception):
    """This implementation cannot run this case here (the reason is the message)."""


def _torch_sync(torch: Any, t: Any) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def torch_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    import torch
    import torch.nn.functional as F

    import multibn

    dev = "cuda" if device == "gpu" else "cpu"
    dt = getattr(torch, case.dtype)
    if pass_ == "layer":
        return torch_layer_impls(case, impls, dev)
    # channels last: torch's BN takes the NCHW view of the same memory (channels_last memory format)
    to_native = (lambda t: t.permute(0, 3, 1, 2)) if case.axis == 3 else (lambda t: t)
    xn, dyn, gn, bn = make_data(case)
    x = torch.from_numpy(xn).to(dev, dt)
    dy = torch.from_numpy(dyn).to(dev, dt)
    g = torch.from_numpy(gn).to(dev)
    b = torch.from_numpy(bn).to(dev)
    c = case.shape[case.axis]
    bwd = pass_ == "fwd+bwd"
    out: dict[str, Runner] = {}

    def step(fn: Callable[[Any, Any, Any], Any]) -> Runner:
        xs, gs, bs = (t.detach().clone().requires_grad_(bwd) for t in (x, g, b))

        def run() -> None:
            y = fn(xs, gs, bs)
            if bwd:
                torch.autograd.grad(y, (xs, gs, bs), to_native(dy) if y.shape != dy.shape else dy)
            _torch_sync(torch, x)

        return run

    if "native" in impls:
        rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
        out["native"] = step(lambda x_, g_, b_: F.batch_norm(to_native(x_), rm, rv, g_, b_, True, 0.1, 1e-5))
    for impl in ("multibn", "multibn-compiled"):
        if impl not in impls:
            continue
        state = [multibn.init_state(c, backend="torch", device=dev)]

        def mbn(x_: Any, g_: Any, b_: Any, state: list = state) -> Any:
            y, state[0] = multibn.batch_norm(x_, g_, b_, state[0], convention="torch", axis=case.axis)
            return y

        out[impl] = step(torch.compile(mbn) if impl == "multibn-compiled" else mbn)
    if "keras" in impls:
        import keras

        layer = keras.layers.BatchNormalization(axis=case.axis, momentum=0.9, epsilon=1e-5, dtype=case.dtype)
        layer.build(case.shape)
        weights = [w.value for w in layer.trainable_weights]

        xk = x.detach().clone().requires_grad_(bwd)

        def keras_run() -> None:
            y = layer(xk, training=True)
            if bwd:
                torch.autograd.grad(y, (xk, *weights), dy)
            _torch_sync(torch, x)

        out["keras"] = keras_run
    if "roofline" in impls:
        buf = torch.empty_like(x)

        def tsum() -> None:
            x.sum()
            _torch_sync(torch, x)

        def tcopy() -> None:
            buf.copy_(x)
            _torch_sync(torch, x)

        out["roofline:sum"], out["roofline:copy"] = tsum, tcopy
    return out


def torch_layer_impls(case: Case, impls: Sequence[str], dev: str) -> dict[str, Runner]:
    """``multibn.layers.torch.BatchNorm`` against ``nn.BatchNorm1d/2d/3d``: training forward, then the gradients of
    the input and both parameters."""
    import torch

    from multibn.layers.torch import BatchNorm

    if case.axis != 1:
        raise Skip("torch layers take channels first (NHWC data is the channels_last memory format of NCHW)")
    xn, dyn, _, _ = make_data(case)
    dt = getattr(torch, case.dtype)
    x = torch.from_numpy(xn).to(dev, dt).requires_grad_(True)
    dy = torch.from_numpy(dyn).to(dev, dt)
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
            _torch_sync(torch, x)

        out[impl] = run
    return out


def jax_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    import jax
    import jax.numpy as jnp

    import multibn

    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    xn, dyn, gn, bn = make_data(case)
    x, dy = (jax.device_put(jnp.asarray(a, dtype=case.dtype), dev) for a in (xn, dyn))
    g, b = (jax.device_put(jnp.asarray(a), dev) for a in (gn, bn))
    c = case.shape[case.axis]
    bwd = pass_ in ("fwd+bwd", "layer")
    out: dict[str, Runner] = {}

    def stateful(apply: Callable[[Any, Any, Any, Any], tuple[Any, Any]], state: Any) -> Runner:
        """apply(x, g, b, state) -> (y, new_state), under jit; fwd+bwd adds the vjp wrt (x, g, b)."""
        def f(x_: Any, g_: Any, b_: Any, st: Any, dy_: Any) -> Any:
            if not bwd:
                return apply(x_, g_, b_, st)
            y, vjp, new = jax.vjp(lambda *a: apply(*a, st), x_, g_, b_, has_aux=True)
            return y, vjp(dy_), new

        f = jax.jit(f)  # every array is an argument: a closed-over one would be an XLA constant, folded slowly
        box = [state]

        def run() -> None:
            res = f(x, g, b, box[0], dy)
            box[0] = res[-1]
            jax.block_until_ready(res)

        return run

    if "multibn" in impls and pass_ == "layer":
        from multibn.layers.jax import BatchNorm

        layer = BatchNorm(c, axis=case.axis)

        def layer_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
            return layer.apply({"scale": g_, "bias": b_}, st, x_, training=True)

        out["multibn"] = stateful(layer_apply, layer.init()[1])
    elif "multibn" in impls:
        def mbn(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
            return multibn.batch_norm(x_, g_, b_, st, convention="flax", axis=case.axis)

        out["multibn"] = stateful(mbn, multibn.init_state(c, backend="jax"))
    if "native" in impls and _installed(["flax"]):
        import flax.linen as nn

        model = nn.BatchNorm(use_running_average=False, axis=case.axis, momentum=0.99, epsilon=1e-5,
                             dtype=case.dtype, param_dtype=jnp.float32)
        variables = model.init(jax.random.PRNGKey(0), x[:2])

        def flax_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
            y, upd = model.apply({"params": {"scale": g_, "bias": b_}, "batch_stats": st}, x_,
                                 mutable=["batch_stats"])
            return y, upd["batch_stats"]

        out["native"] = stateful(flax_apply, variables["batch_stats"])
    if "keras" in impls:
        import keras

        layer = keras.layers.BatchNormalization(axis=case.axis, momentum=0.99, epsilon=1e-5, dtype=case.dtype)
        layer.build(case.shape)
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def keras_apply(x_: Any, g_: Any, b_: Any, st: Any) -> tuple[Any, Any]:
            return layer.stateless_call([g_, b_], st, x_, training=True)

        out["keras"] = stateful(keras_apply, non_trainable)
    if "roofline" in impls:
        axes = tuple(range(len(case.shape)))
        red = jax.jit(lambda a: jnp.sum(a, axis=axes))
        copy = jax.jit(lambda a, k: a + k)  # a streaming pass: read x, write a new buffer
        k = jnp.asarray(0, dtype=case.dtype)

        def jsum() -> None:
            red(x).block_until_ready()

        def jcopy() -> None:
            copy(x, k).block_until_ready()

        out["roofline:sum"], out["roofline:copy"] = jsum, jcopy
    return out


def _mx() -> Any:
    from multibn.backends import get_backend

    get_backend("mxnet")  # imports mxnet the way multibn does (np.bool alias, torch threads restored)
    import mxnet as mx

    return mx


def mxnet_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if case.dtype == "bfloat16":
        raise Skip("MXNet 1.9 has no bfloat16")
    mx = _mx()
    import multibn

    ctx = mx.gpu(0) if device == "gpu" else mx.cpu()
    if pass_ == "layer":
        return gluon_layer_impls(case, impls, ctx)
    xn, dyn, gn, bn = make_data(case)
    x, dy = (mx.nd.array(a, ctx=ctx, dtype=case.dtype) for a in (xn, dyn))
    g, b = (mx.nd.array(a, ctx=ctx) for a in (gn, bn))
    c = case.shape[case.axis]
    bwd = pass_ == "fwd+bwd"
    out: dict[str, Runner] = {}

    def step(fn: Callable[[Any, Any, Any], Any]) -> Runner:
        xs, gs, bs = (a.copy() for a in (x, g, b))
        if bwd:
            for a in (xs, gs, bs):
                a.attach_grad()

        def run() -> None:
            if bwd:
                with mx.autograd.record(train_mode=True):
                    y = fn(xs, gs, bs)
                y.backward(dy)
            else:
                with mx.autograd.train_mode():
                    fn(xs, gs, bs)
            mx.nd.waitall()

        return run

    if "native" in impls:
        mm, mv = mx.nd.zeros(c, ctx=ctx), mx.nd.ones(c, ctx=ctx)
        out["native"] = step(lambda x_, g_, b_: mx.nd.BatchNorm(
            x_, g_, b_, mm, mv, eps=1e-5, momentum=0.9, fix_gamma=False, axis=case.axis))
    if "multibn" in impls:
        state = [multibn.init_state(c, backend="mxnet", device=ctx)]

        def mbn(x_: Any, g_: Any, b_: Any) -> Any:
            y, state[0] = multibn.batch_norm(x_, g_, b_, state[0], convention="gluon", axis=case.axis)
            return y

        out["multibn"] = step(mbn)
    if "roofline" in impls:
        buf = mx.nd.empty(case.shape, ctx=ctx, dtype=case.dtype)
        # MXNet's own nd.sum reads at a fraction of the bandwidth (no AVX in the wheel): its fastest full read of
        # x is a BLAS product with a ones vector, which is what the roofline takes as "one reduction pass"
        flat = x.reshape((-1, case.shape[-1]))
        ones = mx.nd.ones((case.shape[-1], 1), ctx=ctx, dtype=case.dtype)

        def msum() -> None:
            mx.nd.dot(flat, ones) if case.dtype in ("float32", "float64") else mx.nd.sum(x)  # CPU dot: no fp16
            mx.nd.waitall()

        def mcopy() -> None:
            x.copyto(buf)
            mx.nd.waitall()

        out["roofline:sum"], out["roofline:copy"] = msum, mcopy
    return out


def gluon_layer_impls(case: Case, impls: Sequence[str], ctx: Any) -> dict[str, Runner]:
    """multibn's Gluon ``BatchNorm`` against ``gluon.nn.BatchNorm``, both hybridized: a recorded training forward and
    its backward (gradients of the input and of gamma and beta)."""
    mx = _mx()
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


def numpy_impls(case: Case, pass_: str, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if case.dtype == "bfloat16":
        raise Skip("NumPy has no bfloat16")
    if pass_ == "layer":
        raise Skip("NumPy has no layer (multibn.batch_norm_vjp is its backward)")
    if device == "gpu":
        raise Skip("NumPy runs on the CPU only")
    import multibn

    xn, dyn, g, b = make_data(case)
    x, dy = xn.astype(case.dtype), dyn.astype(case.dtype)
    c = case.shape[case.axis]
    out: dict[str, Runner] = {}
    if "multibn" in impls:
        state = [multibn.init_state(c, backend="numpy")]

        def run() -> None:
            _, state[0] = multibn.batch_norm(x, g, b, state[0], convention="torch", axis=case.axis)
            if pass_ == "fwd+bwd":
                multibn.batch_norm_vjp(x, g, b, None, dy, convention="torch", axis=case.axis)

        out["multibn"] = run
    if "roofline" in impls:
        buf = np.empty_like(x)

        def nsum() -> None:
            x.sum()

        def ncopy() -> None:
            np.copyto(buf, x)

        out["roofline:sum"], out["roofline:copy"] = nsum, ncopy
    return out


# ---- whole models: one training step ---------------------------------------------------------------------------------
# LeNet as in the textbook's BN chapter: conv(6, 5x5) BN sigmoid avgpool(2), conv(16, 5x5) BN sigmoid avgpool(2),
# dense(120) BN sigmoid, dense(84) BN sigmoid, dense(10); 28x28 single-channel input, softmax cross-entropy, SGD.
LENET_LR = 0.1


def lenet_data(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, batch)


def torch_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    import torch
    from torch import nn

    from multibn.layers.torch import BatchNorm

    dev = "cuda" if device == "gpu" else "cpu"
    xn, yn = lenet_data(batch)
    x, y = torch.from_numpy(xn).to(dev), torch.from_numpy(yn).to(dev)
    bns = {"native": (nn.BatchNorm2d, nn.BatchNorm1d),
           "multibn": (lambda c: BatchNorm(c, 4), lambda c: BatchNorm(c, 2))}
    out: dict[str, Runner] = {}
    for impl, (bn2, bn1) in bns.items():
        if impl not in impls:
            continue
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5), bn2(6), nn.Sigmoid(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), bn2(16), nn.Sigmoid(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 120), bn1(120), nn.Sigmoid(), nn.Linear(120, 84),
            bn1(84), nn.Sigmoid(), nn.Linear(84, 10)).to(dev).train()
        opt = torch.optim.SGD(net.parameters(), lr=LENET_LR)

        def step(net: Any = net, opt: Any = opt) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            _torch_sync(torch, x)

        out[impl] = step
    return out


def gluon_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    mx = _mx()
    from mxnet.gluon import nn

    from multibn.layers.gluon import BatchNorm

    ctx = mx.gpu(0) if device == "gpu" else mx.cpu()
    xn, yn = lenet_data(batch)
    x, y = mx.nd.array(xn, ctx=ctx), mx.nd.array(yn, ctx=ctx)
    bns = {"native": lambda c: nn.BatchNorm(in_channels=c), "multibn": lambda c: BatchNorm(c)}
    loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    out: dict[str, Runner] = {}
    for impl, bn in bns.items():
        if impl not in impls:
            continue
        net = nn.HybridSequential()
        net.add(nn.Conv2D(6, 5, in_channels=1), bn(6), nn.Activation("sigmoid"), nn.AvgPool2D(2),
                nn.Conv2D(16, 5, in_channels=6), bn(16), nn.Activation("sigmoid"), nn.AvgPool2D(2),
                nn.Dense(120, in_units=256), bn(120), nn.Activation("sigmoid"), nn.Dense(84, in_units=120), bn(84),
                nn.Activation("sigmoid"), nn.Dense(10, in_units=84))
        mx.random.seed(0)
        net.initialize(mx.init.Xavier(), ctx=ctx)
        net.hybridize()
        trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LENET_LR})

        def step(net: Any = net, trainer: Any = trainer) -> None:
            with mx.autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(batch)
            mx.nd.waitall()

        out[impl] = step
    return out


def flax_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if not _installed(["flax"]):
        raise Skip("flax is not installed")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    try:
        from multibn.layers.flax import BatchNorm as MultibnBatchNorm
    except ImportError as e:
        raise Skip(f"multibn.layers.flax is not available here ({e})") from e

    class LeNet(nn.Module):
        bn: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            def norm(h: Any) -> Any:
                return self.bn(use_running_average=False, momentum=0.9, epsilon=1e-5)(h)

            def pool(h: Any) -> Any:
                return nn.avg_pool(h, (2, 2), strides=(2, 2))

            x = pool(nn.sigmoid(norm(nn.Conv(6, (5, 5), padding="VALID")(x))))
            x = pool(nn.sigmoid(norm(nn.Conv(16, (5, 5), padding="VALID")(x))))
            x = x.reshape((x.shape[0], -1))
            x = nn.sigmoid(norm(nn.Dense(120)(x)))
            x = nn.sigmoid(norm(nn.Dense(84)(x)))
            return nn.Dense(10)(x)

    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    xn, yn = lenet_data(batch)
    x = jax.device_put(jnp.asarray(xn.transpose(0, 2, 3, 1)), dev)  # NHWC
    y = jax.device_put(jnp.asarray(yn), dev)
    out: dict[str, Runner] = {}
    for impl, bn in (("native", nn.BatchNorm), ("multibn", MultibnBatchNorm)):
        if impl not in impls:
            continue
        model = LeNet(bn)
        variables = model.init(jax.random.PRNGKey(0), x)

        def loss_fn(params: Any, stats: Any, model: Any = model) -> tuple[Any, Any]:
            logits, upd = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), upd["batch_stats"]

        @jax.jit
        def train_step(params: Any, stats: Any, loss_fn: Any = loss_fn) -> tuple[Any, Any]:
            grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats)
            return jax.tree.map(lambda p, g: p - LENET_LR * g, params, grads), stats

        box = [variables["params"], variables["batch_stats"]]

        def step(box: list = box, train_step: Any = train_step) -> None:
            box[:] = train_step(*box)
            jax.block_until_ready(box)

        out[impl] = step
    return out


MODEL_IMPLS: dict[str, Callable[[int, Sequence[str], str], dict[str, Runner]]] = {
    "torch": torch_lenet, "mxnet": gluon_lenet, "jax": flax_lenet,
}


def measure_model(backend: str, model: str, batch: int, reps: int, warmup: int,
                  device: str = "cpu") -> list[dict[str, Any]]:
    """Rows for one training step of ``model`` at ``batch``: multibn's layers and the native BN side by side."""
    runners = MODEL_IMPLS[backend](batch, ("multibn", "native"), device)
    med = {k: summarize(v) for k, v in time_interleaved(runners, reps, warmup).items()}
    native = med.get("native", (None,))[0]
    return [{
        "backend": backend, "impl": impl, "case": f"{model}_b{batch}", "dtype": "float32", "pass": "train-step",
        "median_ms": round(m, 4), "iqr_ms": round(iqr, 4), "runs": reps,
        "ratio_to_native": round(m / native, 3) if native else None, "ratio_to_roofline": None,
    } for impl, (m, iqr) in sorted(med.items(), key=lambda kv: IMPL_ORDER.index(kv[0]))]


IMPLS: dict[str, Callable[[Case, str, Sequence[str], str], dict[str, Runner]]] = {
    "numpy": numpy_impls, "torch": torch_impls, "jax": jax_impls, "mxnet": mxnet_impls,
}


# ---- timing -----------------------------------------------------------------------------------------------------
def time_interleaved(runners: dict[str, Runner], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per repetition of each runner: ``warmup`` untimed rounds, then ``reps`` rounds A B C A B C ..."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range), in ms."""
    q1, med, q3 = np.percentile(np.asarray(times) * 1e3, [25, 50, 75])
    return float(med), float(q3 - q1)


def measure(backend: str, case: Case, pass_: str, impls: Sequence[str], reps: int, warmup: int,
            device: str = "cpu") -> list[dict[str, Any]]:
    """The records of one (backend, case, pass): every impl in ``impls`` timed side by side."""
    runners = IMPLS[backend](case, pass_, impls, device)
    times = time_interleaved(runners, reps, warmup)
    med = {k: summarize(v) for k, v in times.items()}
    if "roofline:sum" in med:
        (s, s_iqr), (c, c_iqr) = med.pop("roofline:sum"), med.pop("roofline:copy")
        ns, nc = (1, 1) if pass_ == "fwd" else (4, 2)  # 2 reads + 1 write; 6 reads + 2 writes (also "layer")
        med["roofline"] = (ns * s + nc * c, ns * s_iqr + nc * c_iqr)
    native = med.get("native", (None,))[0]
    roof = med.get("roofline", (None,))[0]
    records = []
    for impl in sorted(med, key=IMPL_ORDER.index):
        m, iqr = med[impl]
        records.append({
            "backend": backend, "impl": impl, "case": case.name, "dtype": case.dtype, "pass": pass_,
            "median_ms": round(m, 4), "iqr_ms": round(iqr, 4), "runs": reps,
            "ratio_to_native": round(m / native, 3) if native else None,
            "ratio_to_roofline": round(m / roof, 3) if roof else None,
        })
    return records


# ---- peak memory ----------------------------------------------------------------------------------------------------
MIB = 1 << 20


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_here(backend: str, case: Case, impl: str, device: str) -> dict[str, Any]:
    """One implementation's peak memory in this process over ``MEM_PASSES`` forward+backward passes of the
    ``fwd+bwd`` pass's runner (same inputs, same calls), after one warm-up pass (compilation, kernel loading,
    caches). Returns ``peaks`` (bytes, one per pass), ``baseline`` (bytes before the passes), ``retained`` (bytes
    per pass still held after the passes: a leak or a cache that grows) and ``method``.

    CPU: before each pass the kernel's peak-RSS counter (VmHWM) is reset; the pass's peak is VmHWM after it above
    the RSS before it (so a framework's deferred frees from the pass before do not count twice). Where the counter
    cannot be reset: one peak, VmHWM over the passes without warm-up (compilation included), above the RSS before
    them. GPU: the allocator's statistics (torch ``max_memory_allocated`` per pass; JAX ``peak_bytes_in_use``,
    which JAX cannot reset: one peak, warm-up included)."""
    import gc

    if device == "gpu":
        _gpu_available(backend)
    runners = IMPLS[backend](case, "fwd+bwd", [impl], device)
    if impl not in runners:
        raise Skip(f"{impl} is not available for {backend} here")
    run = runners[impl]
    if device == "gpu":
        return _peak_memory_gpu(backend, run)
    try:
        _proc_status("VmRSS")
    except OSError as e:
        raise Skip(f"peak RSS needs Linux's /proc/self/status ({e})") from e
    warm = _reset_peak_rss()
    if warm:
        run()
    gc.collect()
    start = _proc_status("VmRSS")
    peaks = []
    for _ in range(MEM_PASSES):
        if warm:
            gc.collect()
            _reset_peak_rss()
        base = _proc_status("VmRSS")
        run()
        peaks.append(_proc_status("VmHWM") - base)
    if not warm:
        peaks = [_proc_status("VmHWM") - start]
    gc.collect()
    method = ("peak RSS of each pass (VmHWM, reset before it) above the RSS before it, after one warm-up pass"
              if warm else "peak RSS over the passes (VmHWM; /proc/self/clear_refs is not writable: no warm-up, "
              "compilation included) above the RSS before them")
    return {"peaks": peaks, "baseline": start, "retained": (_proc_status("VmRSS") - start) // MEM_PASSES,
            "method": method}


def _gpu_available(backend: str) -> None:
    """Raise :class:`Skip` unless ``backend`` has a GPU here and a peak-memory statistic for it."""
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise Skip("torch sees no CUDA device")
    elif backend == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError as e:
            raise Skip(f"JAX has no GPU here ({e})") from e
    elif backend != "numpy":  # numpy_impls says why NumPy is skipped
        raise Skip(f"{backend} has no peak-memory statistic for the GPU")


def _peak_memory_gpu(backend: str, run: Runner) -> dict[str, Any]:
    if backend == "torch":
        import torch

        run()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        peaks = []
        for _ in range(MEM_PASSES):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        return {"peaks": peaks, "baseline": start,
                "retained": (torch.cuda.memory_allocated() - start) // MEM_PASSES,
                "method": "torch.cuda.max_memory_allocated of each pass above the memory allocated before it"}
    if backend == "jax":
        import jax

        dev = jax.devices("gpu")[0]
        stats = dev.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            raise Skip(f"JAX gives no peak_bytes_in_use for {dev}")
        start = stats["bytes_in_use"]
        for _ in range(1 + MEM_PASSES):
            run()
        stats = dev.memory_stats()
        return {"peaks": [stats["peak_bytes_in_use"] - start], "baseline": start,
                "retained": (stats["bytes_in_use"] - start) // (1 + MEM_PASSES),
                "method": "JAX peak_bytes_in_use (cannot be reset: warm-up pass included) above bytes_in_use before"}
    raise AssertionError(backend)  # _gpu_available refused the others


def measure_memory(backend: str, case: Case, impls: Sequence[str], device: str = "cpu") -> list[dict[str, Any]]:
    """The "mem" records of one (backend, case): each implementation's peak (the median over its passes) in its own
    fresh subprocess (a peak counter is per process, and a framework keeps what it once allocated), and multibn's
    excess over the native BN in activations (bytes of x)."""
    results: dict[str, dict[str, Any]] = {}
    for impl in impls:
        cmd = [sys.executable, "-m", "multibn.bench", "--mem-worker", f"{backend}:{impl}",
               "--cases", f"{case.name}:{case.dtype}", "--device", device]
        proc = subprocess.run(cmd, env=_child_env(MEM_ENV), stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            print(f"\nmem {backend} {impl} {case.name}:{case.dtype}: the subprocess failed (exit {proc.returncode})",
                  file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if "skip" in res:
            print(f"\nskipped mem {backend} {impl} {case.name}:{case.dtype}: {res['skip']}", file=sys.stderr)
            continue
        results[impl] = res
    peak = {impl: float(np.median(res["peaks"])) for impl, res in results.items()}
    native = peak.get("native")
    records = []
    for impl, res in results.items():
        records.append({
            "backend": backend, "impl": impl, "case": case.name, "dtype": case.dtype, "pass": "mem",
            "peak_mib": round(peak[impl] / MIB, 2), "passes_mib": [round(p / MIB, 2) for p in res["peaks"]],
            "retained_mib_per_pass": round(res["retained"] / MIB, 2), "baseline_mib": round(res["baseline"] / MIB, 1),
            "runs": MEM_PASSES, "activation_mib": round(case.nbytes / MIB, 2),
            "native_peak_mib": None if native is None else round(native / MIB, 2),
            "extra_activations": None if native is None else round((peak[impl] - native) / case.nbytes, 3),
            "ratio_to_native": round(peak[impl] / native, 3) if native else None, "method": res["method"],
        })
    return records


def _mem_worker(args: argparse.Namespace) -> int:
    """One "mem" measurement (``--mem-worker BACKEND:IMPL``); prints its result as one JSON line."""
    backend, impl = args.mem_worker.split(":")
    if backend == "torch":
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        res = peak_memory_here(backend, Case.parse(args.cases), impl, args.device)
    except Skip as e:
        res = {"skip": str(e)}
    print(json.dumps(res))
    return 0


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment plus ``extra``, with the directory holding this multibn first on PYTHONPATH (so that a
    subprocess runs the same multibn, also from a checkout that is not installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---- environment --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _allocator() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            conf = os.environ.get("MALLOC_CONF") or os.environ.get("TCMALLOC_RELEASE_RATE") or ""
            return f"{name} ({preload}{'; ' + conf if conf else ''})"
    return "glibc malloc (default)" if platform.system() == "Linux" else "system default"


def environment(backends: Sequence[str]) -> dict[str, Any]:
    """Versions, thread counts, allocator, CPU and GPU of this process (imports the backends' frameworks)."""
    from importlib import metadata

    import multibn

    env: dict[str, Any] = {
        "multibn": multibn.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "allocator": _allocator(), "versions": {},
        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                               "MXNET_CPU_WORKER_NTHREADS", "XLA_FLAGS") if k in os.environ},
        "gpu": None,
    }
    for dist in ("numpy", "torch", "jax", "jaxlib", "mxnet", "flax", "keras"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env["versions"][dist] = metadata.version(dist)
    env["threads"]["numpy"] = 1
    if "torch" in backends:
        import torch

        env["threads"]["torch"] = torch.get_num_threads()
        env["threads"]["torch_interop"] = torch.get_num_interop_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    if "jax" in backends:
        import jax

        env["jax_devices"] = [str(d) for d in jax.devices()]
        if env["gpu"] is None and jax.default_backend() == "gpu":
            env["gpu"] = jax.devices()[0].device_kind
    return env


# ---- output ---------------------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        if self.quiet:
            return
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.0f}s  {label}")
        sys.stderr.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if not self.quiet and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _pass_order(p: str) -> int:
    return PASSES.index(p) if p in PASSES else len(PASSES)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(records: Sequence[dict[str, Any]]) -> str:
    """The timings, then the peak memory (pass "mem") of the same records."""
    timed = [r for r in records if r["pass"] != "mem"]
    mem = [r for r in records if r["pass"] == "mem"]
    return "\n\n".join(t for t in (_time_table(timed) if timed else "", mem_table(mem) if mem else "") if t)


def mem_table(records: Sequence[dict[str, Any]]) -> str:
    """Peak memory above the baseline, in MiB and beside the native BN's, the excess in activations (x's size)."""
    head = (f"{'case':<20} {'dtype':<8} {'backend':<7} {'impl':<16} {'peak MiB':>9} {'native MiB':>10} "
            f"{'x native':>9} {'extra act.':>10} {'act. MiB':>9} {'kept MiB/pass':>13}")
    lines = [f"peak memory of a forward+backward pass above the memory before it (median of {MEM_PASSES}); extra "
             "act.: (peak - native peak) / bytes of x; kept: memory still held after the passes, per pass",
             head, "-" * len(head)]
    prev = None
    for r in records:
        if prev is not None and (r["case"], r["dtype"]) != prev:
            lines.append("")
        prev = (r["case"], r["dtype"])
        extra = r["extra_activations"]  # + 0.0: no "-0.00"
        lines.append(
            f"{r['case']:<20} {r['dtype']:<8} {r['backend']:<7} {r['impl']:<16} {r['peak_mib']:>9.1f} "
            f"{_fmt(r['native_peak_mib'], '10.1f'):>10} {_fmt(r['ratio_to_native'], '9.2f'):>9} "
            f"{_fmt(extra if extra is None else round(extra, 2) + 0.0, '+10.2f'):>10} {r['activation_mib']:>9.1f} "
            f"{r['retained_mib_per_pass']:>13.1f}")
    return "\n".join(lines)


def _time_table(records: Sequence[dict[str, Any]]) -> str:
    head = (f"{'case':<20} {'dtype':<8} {'pass':<7} {'backend':<7} {'impl':<16} {'median ms':>10} "
            f"{'IQR ms':>8} {'runs':>4} {'x native':>9} {'x roofline':>10}")
    lines = [head, "-" * len(head)]
    prev = None
    own = False  # keras rows: ratios to the native BN timed in the Keras subprocess, not to the row above
    for r in records:
        key = (r["case"], r["dtype"], r["pass"], r["backend"])
        if prev is not None and key[:3] != prev[:3]:
            lines.append("")
        prev = key
        lines.append(
            f"{r['case']:<20} {r['dtype']:<8} {r['pass']:<7} {r['backend']:<7} {r['impl']:<16} "
            f"{r['median_ms']:>10.2f} {r['iqr_ms']:>8.2f} {r['runs']:>4} "
            f"{_fmt(r['ratio_to_native'], '9.2f'):>9} {_fmt(r['ratio_to_roofline'], '10.2f'):>10}"
            + (" *" if r["impl"] == "keras" else ""))
        own = own or r["impl"] == "keras"
    if own:
        lines.append("* keras rows run in a subprocess (Keras picks its backend at import): their ratios are to the "
                     "native BN and roofline timed beside them there, not to the rows of this process")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str) -> None:
    """A PNG with two bar charts: each implementation's ratio to the native BN and to the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["pass"] != "mem"]  # times only
    groups = sorted({(r["case"], r["dtype"], r["pass"]) for r in records},
                    key=lambda k: (k[0], k[1], _pass_order(k[2])))
    series = [(b, i) for b in BACKENDS for i in IMPL_ORDER
              if any(r["backend"] == b and r["impl"] == i and i != "roofline" for r in records)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8), sharex=True)
    width = 0.8 / max(len(series), 1)
    for ax, key, title in ((axes[0], "ratio_to_native", "time / native BN of the same framework"),
                           (axes[1], "ratio_to_roofline", "time / memory roofline of the same framework")):
        for j, (b, i) in enumerate(series):
            vals = []
            for grp in groups:
                r = next((r for r in records if (r["case"], r["dtype"], r["pass"]) == grp
                          and r["backend"] == b and r["impl"] == i), None)
                vals.append(r[key] if r and r[key] is not None else np.nan)
            ax.bar(np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width, vals, width, label=f"{b} {i}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(title)
    axes[1].set_xticks(np.arange(len(groups)), [f"{c}\n{d} {p}" for c, d, p in groups], fontsize=8)
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle("multibn bench (median ratios, lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="7 repetitions, the two smaller float32 cases (under two minutes on 2 cores)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, from {','.join(BACKENDS)} (default: every installed backend)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated NAME[:DTYPE] (default: {','.join(DEFAULT_CASES)})")
    parser.add_argument("--passes", default=None,
                        help=f"comma-separated, from {','.join(PASSES)} (layer: the layers' training forward and "
                        "backward, multibn's against the native layer; mem: the peak memory of a forward+backward "
                        f"pass above the memory before it, median of {MEM_PASSES}, multibn's and the native BN's, "
                        "each in a fresh subprocess: peak RSS on the CPU, the allocator's peak on a GPU; default: "
                        f"{','.join(DEFAULT_PASSES)})")
    parser.add_argument("--small", action="store_true",
                        help=f"the small cases {','.join(SMALL_CASES)}, passes {','.join(SMALL_PASSES)}")
    parser.add_argument("--model", choices=tuple(MODELS), default=None,
                        help="one training step of the model with multibn's layers against the native BN, at "
                        "batch 256 and 32, on torch, Gluon (hybridized) and Flax (jit), instead of the cases")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation (>= 7)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--compiled", action="store_true", help="also time multibn under torch.compile")
    parser.add_argument("--keras", choices=("auto", "no"), default="auto",
                        help="Keras BatchNormalization on its torch and jax backends, one subprocess each")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the arrays live: cpu (default) or gpu (torch CUDA device 0, JAX's first GPU, "
                        "mx.gpu(0); numpy is skipped)")
    parser.add_argument("--json", metavar="PATH", help="write the environment and the records as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--keras-worker", help=argparse.SUPPRESS)  # internal: KERAS_BACKEND of this subprocess
    parser.add_argument("--mem-worker", help=argparse.SUPPRESS)  # internal: BACKEND:IMPL of one "mem" measurement


def _installed(names: Sequence[str]) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is not None]


def _keras_subprocess(kb: str, args: argparse.Namespace, cases: Sequence[str], passes: Sequence[str],
                      reps: int, warmup: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "multibn.bench", "--keras-worker", kb, "--cases", ",".join(cases),
           "--passes", ",".join(p for p in passes if p != "mem"), "--reps", str(reps), "--warmup", str(warmup),
           "--device", args.device]
    if args.quiet:
        cmd.append("--quiet")
    env = _child_env({"KERAS_BACKEND": kb})
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        print(f"keras on {kb}: the subprocess failed (exit {proc.returncode}); no keras rows", file=sys.stderr)
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    # Threads: every core for torch, MXNet (which uses half unless told) and XLA; NumPy is single-threaded.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.keras_worker:
        # Keras decides its backend at import: this process is one Keras backend, the parent reads stdout.
        return _worker(args)
    if args.mem_worker:
        return _mem_worker(args)
    from .cli import check_outputs

    if (bad_output := check_outputs("bench", json=args.json, plot=args.plot)) is not None:
        return bad_output
    backends = args.backends.split(",") if args.backends else _installed(BACKENDS)
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if "torch" in backends:
        import torch  # before MXNet, which drops torch's thread count on import

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from multibn.backends import get_backend

    backends = [b for b in backends if _importable(get_backend, b)]
    quick = args.quick
    if args.model:
        return _run_model(args, backends)
    default_cases = SMALL_CASES if args.small else QUICK_CASES if quick else DEFAULT_CASES
    cases = args.cases.split(",") if args.cases else list(default_cases)
    parsed = [Case.parse(c) for c in cases]
    passes = args.passes.split(",") if args.passes else list(SMALL_PASSES if args.small else DEFAULT_PASSES)
    for p in passes:
        if p not in PASSES:
            raise SystemExit(f"unknown pass {p!r}; choose from {', '.join(PASSES)}")
    reps = args.reps or (7 if quick else 15)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    keras_bes = [kb for kb in KERAS_BACKENDS if kb in backends and _installed(["keras"])] \
        if args.keras == "auto" and set(passes) - {"mem"} else []

    env = environment(backends)
    timing = f"{reps} reps after {warmup} warm-up, interleaved; medians in ms" if set(passes) - {"mem"} else ""
    memory = f"peak memory: median of {MEM_PASSES} passes after 1 warm-up, each in a fresh subprocess" \
        if "mem" in passes else ""
    print(f"multibn bench: {len(parsed)} case(s) x {len(passes)} pass(es) x {len(backends)} backend(s), "
          + "; ".join(t for t in (timing, memory) if t))
    print(f"cpu: {env['cpu']} ({env['cpu_count']} cores), gpu: {env['gpu']}, allocator: {env['allocator']}, "
          f"threads: {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    records: list[dict[str, Any]] = []
    progress = Progress(len(parsed) * len(passes) * len(backends) + len(keras_bes), args.quiet)
    for case in parsed:
        for pass_ in passes:
            for b in backends:
                progress.step(f"{b} {case.name} {case.dtype} {pass_}")
                impls = ["multibn", "native", "roofline"]
                if b == "torch" and args.compiled:
                    impls.insert(1, "multibn-compiled")
                if pass_ == "mem":  # NumPy has no native BN
                    records += measure_memory(b, case, impls[:1] if b == "numpy" else impls[:-1], args.device)
                    continue
                try:
                    records += measure(b, case, pass_, impls, reps, warmup, args.device)
                except Skip as e:
                    print(f"\nskipped {b} {case.name}:{case.dtype}: {e}", file=sys.stderr)
    for kb in keras_bes:
        progress.step(f"keras on {kb} (subprocess)")
        records += _keras_subprocess(kb, args, cases, passes, reps, warmup)
    progress.close()
    records.sort(key=lambda r: (
        [c.name + c.dtype for c in parsed].index(r["case"] + r["dtype"]), _pass_order(r["pass"]),
        BACKENDS.index(r["backend"]), IMPL_ORDER.index(r["impl"])))
    _report(args, env, records)
    return 0


def _report(args: argparse.Namespace, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")


def _run_model(args: argparse.Namespace, backends: Sequence[str]) -> int:
    """``--model``: one training step at each batch size, multibn's layers against the native BN, per backend."""
    reps = args.reps or (7 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else 3
    backends = [b for b in MODEL_BACKENDS if b in backends]
    env = environment(backends)
    print(f"multibn bench --model {args.model}: {len(backends)} backend(s), batches {MODELS[args.model]}, "
          f"{reps} reps after {warmup} warm-up, interleaved; medians in ms")
    records: list[dict[str, Any]] = []
    progress = Progress(len(backends) * len(MODELS[args.model]), args.quiet)
    for batch in MODELS[args.model]:
        for b in backends:
            progress.step(f"{b} {args.model} batch {batch}")
            try:
                records += measure_model(b, args.model, batch, reps, warmup, args.device)
            except Skip as e:
                print(f"\nskipped {b} {args.model}: {e}", file=sys.stderr)
    progress.close()
    _report(args, env, records)
    return 0


def _importable(get_backend: Callable[[str], Any], name: str) -> bool:
    try:
        get_backend(name)
    except ImportError as e:
        print(f"skipping {name}: {e}", file=sys.stderr)
        return False
    return True


def _worker(args: argparse.Namespace) -> int:
    """Keras on one backend beside that framework's native BN and roofline; prints the keras rows as JSON."""
    kb = args.keras_worker
    if kb == "torch":
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    records = []
    cases = [Case.parse(c) for c in args.cases.split(",")]
    passes = args.passes.split(",") if args.passes else list(DEFAULT_PASSES)
    progress = Progress(len(cases) * len(passes), quiet=True)
    for case in cases:
        for pass_ in passes:
            progress.step(f"keras {kb} {case.name} {pass_}")
            try:
                rows = measure(kb, case, pass_, ["keras", "native", "roofline"], args.reps, args.warmup, args.device)
            except Exception as e:  # one case keras cannot do must not lose the others
                print(f"keras on {kb}, {case.name}:{case.dtype} {pass_}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            native = next((r["median_ms"] for r in rows if r["impl"] == "native"), None)
            records += [dict(r, native_ms_in_subprocess=native) for r in rows if r["impl"] == "keras"]
    print(json.dumps(records))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="multibn bench")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
