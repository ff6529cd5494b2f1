"""The frameworks' own batch norms on the battery's cases, against multibn on the same framework: PyTorch's
``F.batch_norm`` and ``nn.BatchNorm1d/2d/3d``, MXNet's ``nd.BatchNorm`` and ``gluon.nn.BatchNorm``, Flax's
``linen.BatchNorm`` and Keras 3's ``BatchNormalization`` (in a subprocess: Keras picks its backend at import).
A native passes where it lies within multibn's error bound plus its own (:func:`compare_native`)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..conventions import CONVENTIONS
from .cases import F64, Case, Step, make_case
from .compare import Row, compare_runs, rows_of
from .runs import Run, backend_run, numpy_of, reference_run, to_backend


def native_torch(case: Case, *, functional: bool, affine: bool = True, track: bool = True,
                 eval_mode_last: bool = False) -> Run:
    """PyTorch's own BN: ``F.batch_norm`` or ``nn.BatchNorm1d/2d/3d`` (channel axis 1), gradients by autograd."""
    import torch

    from ..backends import get_backend

    be = get_backend("torch")
    conv = case.conv
    pdt = getattr(torch, case.pdtype)
    steps = []
    if functional:
        rm = torch.zeros(case.channels, dtype=pdt) if track else None
        rv = torch.ones(case.channels, dtype=pdt) if track else None
    else:
        ndim = case.steps[0].x.ndim
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]
        mod = cls(case.channels, eps=conv.eps, momentum=conv.momentum, affine=affine, track_running_stats=track,
                  dtype=pdt)
        if affine:
            with torch.no_grad():
                mod.weight.copy_(torch.as_tensor(case.gamma))
                mod.bias.copy_(torch.as_tensor(case.beta))
    for i, step in enumerate(case.steps):
        x = to_backend(be, step.x, case.dtype).requires_grad_(True)
        dy = to_backend(be, step.dy, case.dtype)
        try:
            if functional:
                w = torch.as_tensor(case.gamma, dtype=pdt).requires_grad_(True)
                b = torch.as_tensor(case.beta, dtype=pdt).requires_grad_(True)
                y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=step.training or not track,
                                                   momentum=conv.momentum, eps=conv.eps)
            else:
                mod.train(step.training and not (eval_mode_last and i == len(case.steps) - 1))
                mod.zero_grad(set_to_none=True)
                y = mod(x)
                w, b = mod.weight, mod.bias
            y.backward(dy)
        except (ValueError, TypeError, RuntimeError) as e:
            return Run(steps, (i, e))
        out = {"y": numpy_of(be, y), "dx": numpy_of(be, x.grad)}
        if w is not None:
            out.update(dgamma=numpy_of(be, w.grad), dbeta=numpy_of(be, b.grad))
        if functional and track:
            out.update(running_mean=numpy_of(be, rm), running_var=numpy_of(be, rv))
        elif not functional and track:
            out.update(running_mean=numpy_of(be, mod.running_mean), running_var=numpy_of(be, mod.running_var),
                       num_batches_tracked=int(mod.num_batches_tracked))
        steps.append(out)
    return Run(steps)


#: What MXNet 1.9's CPU ``nd.BatchNorm`` is allowed beyond multibn's bound: its moving variance is recovered as
#: ``1/invstd^2 - eps`` (a few float32 roundings of var + eps), float64 input is computed at float32 accuracy and
#: float16 input partly at float16 accuracy (``docs/semantics.md`` §6).
MXNET_NATIVE = dict(extra_var_rel=4 * 2.0**-24, u_acc={"float64": 2.0**-24, "float16": 2.0**-11})


def native_mxnet(case: Case, *, fix_gamma: bool) -> Run:
    """MXNet's ``nd.BatchNorm``: training steps under ``autograd.record()`` with a backward (which is when its CPU
    kernel moves the moving statistics); eval steps with ``use_global_stats=True``."""
    from ..backends import get_backend

    be = get_backend("mxnet")  # imports mxnet the way the adapter does (NumPy >= 1.24 needs np.bool restored)
    from mxnet import autograd, nd

    conv = case.conv
    mm = nd.zeros(case.channels, dtype=case.pdtype)
    mv = nd.ones(case.channels, dtype=case.pdtype)
    steps = []
    for step in case.steps:
        x, dy = to_backend(be, step.x, case.dtype), to_backend(be, step.dy, case.dtype)
        g, b = to_backend(be, case.gamma, case.pdtype), to_backend(be, case.beta, case.pdtype)
        for v in (x, g, b):
            v.attach_grad()
        with autograd.record():
            y = nd.BatchNorm(x, g, b, mm, mv, eps=conv.eps, momentum=conv.momentum, fix_gamma=fix_gamma,
                             use_global_stats=not step.training, axis=case.channel_axis)
        y.backward(dy)
        steps.append({"y": numpy_of(be, y), "dx": numpy_of(be, x.grad), "dgamma": numpy_of(be, g.grad),
                      "dbeta": numpy_of(be, b.grad), "running_mean": numpy_of(be, mm),
                      "running_var": numpy_of(be, mv)})
    return Run(steps)


def _gluon_block_run(case: Case, *, ours: bool) -> Run:
    """``gluon.nn.BatchNorm`` (``ours=False``) or ``multibn.layers.gluon.BatchNorm(update="backward")``: training
    steps under ``autograd.record()`` with a backward (when both move the statistics), eval steps in predict mode
    with ``backward(train_mode=False)``. Channel axis 1, float32, the case's convention (gluon: eps, momentum)."""
    from ..backends import get_backend

    get_backend("mxnet")
    from mxnet import autograd, gluon, initializer, nd

    conv = case.conv
    if ours:
        from ..layers.gluon import BatchNorm

        block = BatchNorm(case.channels, convention=conv, axis=case.channel_axis, update="backward")
    else:
        block = gluon.nn.BatchNorm(axis=case.channel_axis, momentum=conv.momentum, epsilon=conv.eps,
                                   in_channels=case.channels)
    block.initialize(initializer.Zero())
    block.gamma.set_data(nd.array(case.gamma.astype(np.float32)))
    block.beta.set_data(nd.array(case.beta.astype(np.float32)))
    block.running_mean.set_data(nd.zeros(case.channels))
    block.running_var.set_data(nd.ones(case.channels))
    steps = []
    for step in case.steps:
        x, dy = nd.array(step.x.astype(np.float32)), nd.array(step.dy.astype(np.float32))
        x.attach_grad()
        with autograd.record(train_mode=step.training):
            y = block(x)
        y.backward(dy, train_mode=step.training)
        steps.append({k: v.asnumpy().astype(F64) for k, v in dict(
            y=y, dx=x.grad, dgamma=block.gamma.grad(), dbeta=block.beta.grad(),
            running_mean=block.running_mean.data(), running_var=block.running_var.data()).items()})
    return Run(steps)


def native_flax(case: Case, *, fast_variance: bool) -> Run:
    """``flax.linen.BatchNorm`` (``use_running_average`` per step), gradients by ``jax.vjp`` of ``apply``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    conv = case.conv
    mod = nn.BatchNorm(axis=case.channel_axis, momentum=conv.momentum, epsilon=conv.eps,
                       use_fast_variance=fast_variance)
    stats = {"mean": jnp.zeros(case.channels, jnp.float32), "var": jnp.ones(case.channels, jnp.float32)}
    scale, bias = jnp.asarray(case.gamma, jnp.float32), jnp.asarray(case.beta, jnp.float32)
    steps = []
    for step in case.steps:
        x = jnp.asarray(step.x.astype(np.float32), case.dtype)
        dy = jnp.asarray(step.dy.astype(np.float32), case.dtype)

        def f(x_: Any, s_: Any, b_: Any, step: Step = step, stats: Any = stats) -> Any:
            return mod.apply({"params": {"scale": s_, "bias": b_}, "batch_stats": stats}, x_,
                             use_running_average=not step.training, mutable=["batch_stats"])

        y, vjp, upd = jax.vjp(f, x, scale, bias, has_aux=True)
        dx, ds, db = vjp(dy.astype(y.dtype))
        stats = upd["batch_stats"]
        steps.append({k: np.asarray(v, F64) for k, v in dict(
            y=y, dx=dx, dgamma=ds, dbeta=db, running_mean=stats["mean"], running_var=stats["var"]).items()})
    return Run(steps)


_KERAS_WORKER = r"""
import os, sys
if hasattr(os, "nice"):
    os.nice(5)  # it runs beside the rest of the battery: the spare CPU is enough
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
d = dict(np.load(src))
import keras
backend = keras.backend.backend()
nsteps, axis = int(d["nsteps"]), int(d["axis"])
layer = keras.layers.BatchNormalization(axis=axis, momentum=float(d["momentum"]), epsilon=float(d["eps"]))
layer.build(d["x0"].shape)
layer.gamma.assign(d["gamma"].astype("float32"))
layer.beta.assign(d["beta"].astype("float32"))
out = {}
for i in range(nsteps):
    x, dy, training = d[f"x{i}"].astype("float32"), d[f"dy{i}"].astype("float32"), bool(d[f"training{i}"])
    if backend == "jax":
        import jax
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]
        def f(x_, tv_):
            return layer.stateless_call(tv_, ntv, x_, training=training)
        y, vjp, new = jax.vjp(f, x, tv, has_aux=True)
        dx, (dg, db) = vjp(dy)
        for var, val in zip(layer.non_trainable_variables, new):
            var.assign(val)
    else:
        import torch
        xt = torch.tensor(x, requires_grad=True)
        for v in layer.trainable_variables:
            v.value.grad = None
        y = layer(xt, training=training)
        y.backward(torch.tensor(dy))
        dx, dg, db = xt.grad, layer.gamma.value.grad, layer.beta.value.grad
        y = y.detach()
    to = lambda a: np.asarray(keras.ops.convert_to_numpy(a), np.float64)
    out.update({f"y{i}": to(y), f"dx{i}": to(dx), f"dgamma{i}": to(dg), f"dbeta{i}": to(db),
                f"running_mean{i}": to(layer.moving_mean.value), f"running_var{i}": to(layer.moving_variance.value)})
np.savez(dst, backend=backend, **out)
"""


def start_keras(case: Case, keras_backend: str, workdir: str) -> tuple[subprocess.Popen, str]:
    """Start Keras 3 ``BatchNormalization`` on ``case`` in a subprocess (Keras picks its backend at import, from
    ``KERAS_BACKEND``); :func:`finish_keras` collects it."""
    conv = case.conv
    src = os.path.join(workdir, f"keras_{keras_backend}_{case.name}_in.npz")
    dst = os.path.join(workdir, f"keras_{keras_backend}_{case.name}_out.npz")
    data = {"nsteps": len(case.steps), "axis": case.channel_axis, "momentum": conv.momentum, "eps": conv.eps,
            "gamma": case.gamma, "beta": case.beta}
    for i, s in enumerate(case.steps):
        data.update({f"x{i}": s.x, f"dy{i}": s.dy, f"training{i}": s.training})
    np.savez(src, **data)
    env = dict(os.environ, KERAS_BACKEND=keras_backend, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", _KERAS_WORKER, src, dst], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, dst


def run_keras(case: Case, keras_backend: str) -> Run:
    """Keras 3 ``BatchNormalization`` on ``case`` with ``KERAS_BACKEND=keras_backend``, waiting for it."""
    with tempfile.TemporaryDirectory(prefix="multibn-keras-") as workdir:
        return finish_keras(*start_keras(case, keras_backend, workdir), len(case.steps))


def finish_keras(proc: subprocess.Popen, dst: str, nsteps: int, timeout: float = 300) -> Run:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        return Run([], (0, RuntimeError(f"keras subprocess failed: {err.strip().splitlines()[-1:] or err}")))
    with np.load(dst) as d:
        keys = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var")
        return Run([{k: d[f"{k}{i}"] for k in keys} for i in range(nsteps)])


@dataclass
class Native:
    """A native BN and the multibn run it must match."""

    label: str  # e.g. "torch F.batch_norm"
    backend: str  # the multibn backend compared with it (and the framework it needs)
    case: Case
    run: Callable[[Case], Run]
    extra_var: float = 0.0  # one-pass variance (n u A^2 more error allowed): Flax fast variance, Keras-torch
    extra_var_rel: float = 0.0  # variance recovered as 1/invstd^2 - eps: MXNet
    u_acc: dict[str, float] = dataclasses.field(default_factory=dict)  # dtype -> the native's own arithmetic
    multibn_case: Case | None = None  # if multibn runs a different but equivalent case (e.g. state=None)
    requires: tuple[str, ...] = ()  # extra modules the native needs (flax, keras)
    ours: Callable[[Case], Run] | None = None  # multibn's side, if not multibn.batch_norm on ``backend``


def compare_native(nat: Native, native_run: Run | None = None) -> list[Row]:
    """The native BN against multibn on the same backend: bound = multibn's bound + the native's bound."""
    mcase = nat.multibn_case or nat.case
    native = native_run if native_run is not None else nat.run(nat.case)
    ours = nat.ours(mcase) if nat.ours is not None else backend_run(mcase, nat.backend)
    ref_m = reference_run(mcase)
    ref_n = reference_run(nat.case, extra_var=nat.extra_var, extra_var_rel=nat.extra_var_rel,
                          u_acc=nat.u_acc.get(nat.case.dtype))
    bounds = [{q: bm[q] + bn.get(q, bm[q]) for q in bm} for bm, bn in zip(ref_m.bounds, ref_n.bounds, strict=True)]
    rows = rows_of(f"{nat.backend}:native", mcase, compare_runs(native, ours, bounds, common_only=True))
    for r in rows:
        r.case = f"{nat.label} | {mcase.name}"
    return rows




def native_battery(backends: Sequence[str], conventions: Sequence[str], *, quick: bool) -> list[Native]:
    """The native comparisons whose framework is installed and whose backend and convention were asked for."""
    out: list[Native] = []

    def installed(mod: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(mod) is not None

    if "torch" in backends and installed("torch"):
        if "torch" in conventions:
            c = make_case("f32 rank4 2T+E", "torch", "float32", [(5, 3, 4, 2)] * 2 + [(2, 3, 4, 2)],
                          training=[True, True, False], seed=11, offsets=[0.0, 5.0, 50.0])
            out.append(Native("F.batch_norm", "torch", c, lambda c: native_torch(c, functional=True)))
            out.append(Native("nn.BatchNorm2d", "torch", c, lambda c: native_torch(c, functional=False)))
            c3 = make_case("f32 rank5 2T+E", "torch", "float32", [(2, 3, 2, 2, 3)] * 2 + [(1, 3, 2, 2, 3)],
                           training=[True, True, False], seed=12, gamma=[1.0] * 3, beta=[0.0] * 3)
            out.append(Native("nn.BatchNorm3d(affine=False)", "torch", c3,
                              lambda c: native_torch(c, functional=False, affine=False)))
            cs = make_case("f32 rank3 3T", "torch", "float32", [(4, 3, 5)] * 3, seed=13)
            out.append(Native("nn.BatchNorm1d(track_running_stats=False), eval last", "torch", cs,
                              lambda c: native_torch(c, functional=False, track=False, eval_mode_last=True),
                              multibn_case=dataclasses.replace(cs, stateful=False)))
            if not quick:
                cb = make_case("bf16 rank4 2T+E", "torch", "bfloat16", [(4, 3, 3, 3)] * 3,
                               training=[True, True, False], seed=14)
                out.append(Native("F.batch_norm", "torch", cb, lambda c: native_torch(c, functional=True)))
        if "torch_cma" in conventions:
            c = make_case("f32 rank2 3T+E", "torch_cma", "float32", [(6, 4), (3, 4), (9, 4), (2, 4)],
                          training=[True, True, True, False], seed=15, offsets=[0.0, 1.0, 10.0, 100.0])
            out.append(Native("nn.BatchNorm1d(momentum=None)", "torch", c,
                              lambda c: native_torch(c, functional=False)))
    if "mxnet" in backends and installed("mxnet"):
        if "mxnet" in conventions:
            c = make_case("f32 rank4 2T+E", "mxnet", "float32", [(5, 3, 4, 2)] * 2 + [(2, 3, 4, 2)],
                          training=[True, True, False], seed=21, offsets=[0.0, 5.0, 50.0])
            out.append(Native("nd.BatchNorm(fix_gamma=True)", "mxnet", c, lambda c: native_mxnet(c, fix_gamma=True),
                              **MXNET_NATIVE))
            cl = make_case("f32 rank3 axis-1 2T+E", dataclasses.replace(CONVENTIONS["mxnet"], fix_gamma=False,
                                                                          name="mxnet(fix_gamma=False)"),
                           "float32", [(4, 5, 3)] * 2 + [(1, 5, 3)], training=[True, True, False], axis=-1, seed=22)
            out.append(Native("nd.BatchNorm(fix_gamma=False, axis=-1)", "mxnet", cl,
                              lambda c: native_mxnet(c, fix_gamma=False), **MXNET_NATIVE))
            if not quick:
                cb = make_case("f32 large n 2T+E", "mxnet", "float32", [(32, 8, 16, 16)] * 2 + [(4, 8, 16, 16)],
                               training=[True, True, False], seed=25, offsets=[0.0, 1.0, 10.0, 100.0])
                out.append(Native("nd.BatchNorm(fix_gamma=True)", "mxnet", cb,
                                  lambda c: native_mxnet(c, fix_gamma=True), **MXNET_NATIVE))
        if "gluon" in conventions:
            c = make_case("f32 rank2 2T+E", "gluon", "float32", [(8, 3), (5, 3), (2, 3)],
                          training=[True, True, False], seed=23)
            out.append(Native("nd.BatchNorm(fix_gamma=False, eps=1e-5)", "mxnet", c,
                              lambda c: native_mxnet(c, fix_gamma=False), **MXNET_NATIVE))
        if "gluon" in conventions and installed("multibn.layers.gluon"):
            c = make_case("f32 rank4 3T+E", "gluon", "float32", [(4, 3, 2, 2)] * 3 + [(2, 3, 2, 2)],
                          training=[True, True, True, False], seed=24, offsets=[0.0, 2.0, 20.0])
            out.append(Native("gluon.nn.BatchNorm vs layers.gluon.BatchNorm(update=backward)", "mxnet", c,
                              lambda c: _gluon_block_run(c, ours=False), **MXNET_NATIVE,
                              ours=lambda c: _gluon_block_run(c, ours=True)))
    if "jax" in backends and installed("jax") and "flax" in conventions and installed("flax"):
        c = make_case("f32 rank4 NHWC 2T+E", "flax", "float32", [(4, 3, 3, 5)] * 2 + [(2, 3, 3, 5)],
                      training=[True, True, False], seed=31, offsets=[0.0, 1.0, 3.0, 0.5, 0.0])
        out.append(Native("linen.BatchNorm(use_fast_variance=False)", "jax", c,
                          lambda c: native_flax(c, fast_variance=False), requires=("flax",)))
        out.append(Native("linen.BatchNorm(use_fast_variance=True)", "jax", c,
                          lambda c: native_flax(c, fast_variance=True), extra_var=1.0, requires=("flax",)))
        if not quick:
            co = make_case("f32 offset1e3 rank2 2T+E", "flax", "float32", [(16, 3)] * 3,
                           training=[True, True, False], seed=32, offsets=1e3, momentum=0.9)
            out.append(Native("linen.BatchNorm(use_fast_variance=False, momentum=0.9)", "jax", co,
                              lambda c: native_flax(c, fast_variance=False), requires=("flax",)))
    if "keras" in conventions and installed("keras"):
        c = make_case("f32 rank3 2T+E", "keras", "float32", [(4, 5, 3)] * 2 + [(2, 5, 3)],
                      training=[True, True, False], seed=41, offsets=[0.0, 1.0, 2.0])
        for kb, extra in (("jax", 0.0), ("torch", 1.0)):  # Keras-torch: one-pass E[x^2] - E[x]^2
            if kb in backends and installed(kb):
                out.append(Native(f"keras[{kb}] BatchNormalization", kb, c,
                                  lambda c, kb=kb: run_keras(c, kb), extra_var=extra, requires=("keras",)))
    return out
