"""``multibn check``: a fixed-seed conformance battery, every installed backend and convention against the float64
reference (:mod:`multibn.reference`) and against the frameworks' own batch norms.

Each case is a sequence of training steps, then eval steps, run through :func:`multibn.batch_norm` (gradients by
the framework's autodiff; :func:`multibn.batch_norm_vjp` on NumPy). After every step ``y``, ``dx``, ``dgamma``,
``dbeta``, the running mean and variance and ``num_batches_tracked`` are compared with the reference within the
per-element error bound of :func:`multibn.reference.step_bounds`; NaN and inf must sit at the same places.
Backends are also compared pairwise, and each framework's native BN with multibn's result on that framework.

The machinery here (cases, runners, comparisons, native runners) is also what the test suite uses. Importing
this module imports no framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from . import reference as R
from .conventions import CONVENTIONS, Convention, resolve_convention

F64 = np.float64
BACKENDS = ("numpy", "torch", "jax", "mxnet")
GRAD_QUANTITIES = ("dx", "dgamma", "dbeta")
STATE_QUANTITIES = ("running_mean", "running_var", "num_batches_tracked")


# ---- cases -----------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One call: ``x`` and the upstream gradient ``dy`` as float64 arrays holding values of the case's dtype."""

    x: np.ndarray
    dy: np.ndarray
    training: bool = True


@dataclass
class Case:
    name: str
    convention: str | Convention
    dtype: str
    gamma: np.ndarray  # float64 values of the parameter dtype (float32, or float64 for float64 input)
    beta: np.ndarray
    steps: list[Step]
    axis: int | None = None
    momentum: float | None = None
    eps: float | None = None
    stateful: bool = True  # False: state=None (PyTorch's track_running_stats=False), training steps only

    @property
    def conv(self) -> Convention:
        return resolve_convention(self.convention, self.momentum, self.eps)

    @property
    def conv_name(self) -> str:
        return self.convention if isinstance(self.convention, str) else self.convention.name

    @property
    def channel_axis(self) -> int:
        ndim = self.steps[0].x.ndim
        return (self.conv.axis if self.axis is None else self.axis) % ndim

    @property
    def channels(self) -> int:
        return len(self.gamma)

    @property
    def pdtype(self) -> str:
        return R.param_dtype(self.dtype)

    def describe(self) -> str:
        shapes = sorted({tuple(s.x.shape) for s in self.steps})
        modes = "".join("T" if s.training else "E" for s in self.steps)
        return (f"{self.name}: {self.conv_name} {self.dtype} shapes={shapes} axis={self.axis} steps={modes} "
                f"momentum={self.momentum} eps={self.eps} stateful={self.stateful}")


def make_case(
    name: str, convention: str | Convention, dtype: str, shapes: Sequence[tuple[int, ...]], *,
    training: Sequence[bool] | None = None, axis: int | None = None, seed: int = 0,
    offsets: float | Sequence[float] = 0.0, spread: float = 1.0, constant: Iterable[int] = (),
    specials: Iterable[tuple[int, int, float]] = (), momentum: float | None = None, eps: float | None = None,
    stateful: bool = True, gamma: Sequence[float] | None = None, beta: Sequence[float] | None = None,
    dy_scale: float = 1.0,
) -> Case:
    """A case with data drawn from ``seed``: one step per shape in ``shapes`` (``training`` flags, default all).

    Channel c holds ``mean_c + spread * N(0, 1)`` with ``|mean_c| = offsets[c] * spread`` (random sign; ``offsets``
    is repeated or cut to the number of channels);
    channels in ``constant`` hold one integer value; ``specials`` are ``(step, flat index, value)`` entries
    (NaN, inf) written into x. Everything is rounded to ``dtype`` (parameters to the parameter dtype).
    """
    rng = np.random.default_rng(seed)
    conv = resolve_convention(convention, momentum, eps)
    ndim = len(shapes[0])
    ax = (conv.axis if axis is None else axis) % ndim
    channels = shapes[0][ax]
    ratio = np.resize(np.asarray(offsets, F64), channels)  # repeated or cut to one per channel
    mean = ratio * spread * rng.choice([-1.0, 1.0], channels)
    pdt = R.param_dtype(dtype)
    g = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels) if gamma is None else gamma
    b = rng.uniform(-1.0, 1.0, channels) if beta is None else beta
    training = [True] * len(shapes) if training is None else list(training)
    steps = []
    for shape in shapes:
        bc = [1] * ndim
        bc[ax] = channels
        x = mean.reshape(bc) + spread * rng.standard_normal(shape)
        for c in constant:
            idx = [slice(None)] * ndim
            idx[ax] = c
            x[tuple(idx)] = np.round(mean[c])
        steps.append(Step(x, dy_scale * rng.standard_normal(shape)))
    for i, flat, value in specials:
        if steps[i].x.size:
            steps[i].x.reshape(-1)[flat % steps[i].x.size] = value
    for s, t in zip(steps, training, strict=True):
        s.x, s.dy, s.training = R.quantize(s.x, dtype), R.quantize(s.dy, dtype), bool(t)
    return Case(name, convention, dtype, R.quantize(g, pdt), R.quantize(b, pdt), steps, axis, momentum, eps, stateful)


# ---- what a backend cannot do ---------------------------------------------------------------------------------------
def _jax_x64() -> bool:
    jax = sys.modules.get("jax")
    if jax is not None:
        return bool(jax.config.jax_enable_x64)
    return os.environ.get("JAX_ENABLE_X64", "").lower() in ("1", "true", "yes")


#: Every combination a backend refuses, with the reason and the error it raises (asserted by the test suite).
#: ``(backend, what) -> (exception type, text the message contains, reason)``.
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str, str]] = {
    ("numpy", "bfloat16"): (TypeError, "no bfloat16", "NumPy has no bfloat16 dtype"),
    ("mxnet", "bfloat16"): (TypeError, "no bfloat16", "MXNet 1.9 NDArray has no bfloat16 dtype"),
    ("mxnet", "empty"): (ValueError, "zero-size", "MXNet 1.x cannot hold zero-size arrays (empty batches)"),
    ("jax", "float64"): (TypeError, "jax_enable_x64",
                         "JAX keeps float64 only with jax_enable_x64; multibn refuses it rather than truncate"),
}


def unsupported(case: Case, backend: str) -> str | None:
    """Why ``backend`` cannot run ``case`` (a key of :data:`UNSUPPORTED`), or None."""
    if (backend, case.dtype) in UNSUPPORTED and not (backend == "jax" and _jax_x64()):
        return case.dtype
    if (backend, "empty") in UNSUPPORTED and any(s.x.size == 0 for s in case.steps):
        return "empty"
    return None


# ---- the reference run -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Per-step results (float64 NumPy arrays, ``num_batches_tracked`` an int) and where it raised, if it did."""

    steps: list[dict[str, Any]]
    error: tuple[int, BaseException] | None = None
    bounds: list[dict[str, np.ndarray]] | None = None  # reference runs only


def reference_run(case: Case, *, extra_var: float = 0.0, extra_var_rel: float = 0.0,
                  u_acc: float | None = None) -> Run:
    conv, ax = case.conv, case.channel_axis
    state = R.init_ref_state(case.channels) if case.stateful else None
    err = None
    steps, bounds = [], []
    for i, step in enumerate(case.steps):
        try:
            rs = R.reference_step(step.x, case.gamma, case.beta, state, step.dy, training=step.training,
                                  convention=conv, axis=ax)
        except ValueError as e:
            return Run(steps, (i, e), bounds)
        b, err = R.step_bounds(rs, step.x, step.dy, case.beta, axis=ax, eps=conv.eps, dtype=case.dtype,
                               err_in=err, extra_var=extra_var, extra_var_rel=extra_var_rel, u_acc=u_acc)
        out = {"y": rs.y, "dx": rs.dx, "dgamma": rs.dgamma, "dbeta": rs.dbeta}
        if rs.state is not None:
            state = rs.state
            out.update(running_mean=state.running_mean, running_var=state.running_var,
                       num_batches_tracked=state.num_batches_tracked)
        steps.append(out)
        bounds.append(b)
    return Run(steps, None, bounds)


# ---- multibn on a backend --------------------------------------------------------------------------------------------
def to_backend(be: Any, a: np.ndarray, dtype: str) -> Any:
    """A float64 array of ``dtype`` values as a ``dtype`` array of backend ``be`` (bfloat16 via float32, exact)."""
    carrier = a.astype(np.float32 if dtype == "bfloat16" else dtype)
    return be.asarray(carrier, dtype=dtype)


def _numpy_of(be: Any, a: Any) -> np.ndarray:
    return be.to_numpy(a).astype(F64)


def _tracked(be: Any, t: Any) -> int:
    return int(np.asarray(be.to_numpy(t)).reshape(-1)[0])


def _forward_backward(backend: str, be: Any, x: Any, g: Any, b: Any, state: Any, dy: Any, kw: dict) -> tuple:
    """``(y, new_state, dx, dgamma, dbeta)`` of multibn.batch_norm; gradients by the framework's autodiff."""
    from .api import batch_norm, batch_norm_vjp

    if backend == "torch":
        x, g, b = (v.detach().requires_grad_(True) for v in (x, g, b))
        y, new = batch_norm(x, g, b, state, **kw)
        y.backward(dy)
        return (y.detach(), new, x.grad, g.grad, b.grad)
    if backend == "jax":
        import jax

        y, vjp, new = jax.vjp(lambda x_, g_, b_: batch_norm(x_, g_, b_, state, **kw), x, g, b, has_aux=True)
        return (y, new, *vjp(dy))
    if backend == "mxnet":
        from mxnet import autograd

        for v in (x, g, b):
            v.attach_grad()
        with autograd.record():
            y, new = batch_norm(x, g, b, state, **kw)
        y.backward(dy)
        return (y, new, x.grad, g.grad, b.grad)
    y, new = batch_norm(x, g, b, state, **kw)
    return (y, new, *batch_norm_vjp(x, g, b, state, dy, **kw))


def backend_run(case: Case, backend: str) -> Run:
    """``case`` through multibn on ``backend``; a ValueError/TypeError ends the run and is recorded."""
    from .api import init_state
    from .backends import get_backend

    be = get_backend(backend)
    conv = case.conv
    kw = dict(convention=case.convention, momentum=case.momentum, eps=case.eps, axis=case.axis, backend=backend)
    g, b = (to_backend(be, v, case.pdtype) for v in (case.gamma, case.beta))
    state = init_state(case.channels, backend=backend, convention=conv, dtype=case.pdtype) if case.stateful else None
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(case.steps):
        try:
            x, dy = to_backend(be, step.x, case.dtype), to_backend(be, step.dy, case.dtype)
            y, new, dx, dg, db = _forward_backward(backend, be, x, g, b, state, dy, dict(kw, training=step.training))
        except (ValueError, TypeError) as e:
            return Run(steps, (i, e))
        out = {"y": _numpy_of(be, y), "dx": _numpy_of(be, dx), "dgamma": _numpy_of(be, dg), "dbeta": _numpy_of(be, db)}
        if new is not None:
            state = new
            out.update(running_mean=_numpy_of(be, state.running_mean), running_var=_numpy_of(be, state.running_var),
                       num_batches_tracked=_tracked(be, state.num_batches_tracked))
        steps.append(out)
    return Run(steps)


# ---- comparisons -----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    backend: str
    convention: str
    case: str
    quantity: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    ok: bool
    err_to_tol: float = 0.0
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("max_abs_err", "max_rel_err", "tol", "err_to_tol"):
            d[k] = _json_float(d[k])
        return d


def _json_float(v: float) -> float | str:
    return v if np.isfinite(v) else str(v)


def _merge(rows: dict[str, R.Comparison], q: str, c: R.Comparison, where: str) -> None:
    old = rows.get(q)
    if c.detail and not c.ok:
        c = dataclasses.replace(c, detail=f"{where}: {c.detail}")
    if old is None:
        rows[q] = c
        return
    max_abs, scale = max(old.max_abs_err, c.max_abs_err), max(old.ref_scale, c.ref_scale)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)  # over all steps
    rows[q] = R.Comparison(max_abs, max_rel, max(old.tol, c.tol), max(old.err_to_tol, c.err_to_tol),
                           old.ok and c.ok, old.detail or c.detail, scale)


def compare_runs(
    got: Run, ref: Run, bounds: Sequence[dict[str, np.ndarray]], quantities: Sequence[str] = R.QUANTITIES, *,
    common_only: bool = False,
) -> dict[str, R.Comparison]:
    """Quantity -> the comparison of ``got`` with ``ref`` over all steps (``bounds``: per step, per quantity).

    A quantity on one side only fails, unless ``common_only`` (natives that lack one, e.g. F.batch_norm's
    ``num_batches_tracked``)."""
    out: dict[str, R.Comparison] = {}
    if (got.error is None) != (ref.error is None) or (got.error and got.error[0] != ref.error[0]):
        def say(r: Run, who: str) -> str:
            return f"{who} raised {type(r.error[1]).__name__} at step {r.error[0]}: {r.error[1]}" if r.error else (
                f"{who} ran all {len(r.steps)} steps")
        out["raises"] = R.Comparison(np.inf, np.inf, 0.0, np.inf, False, f"{say(got, 'got')}; {say(ref, 'expected')}")
        return out
    if ref.error is not None:
        same = type(got.error[1]) is type(ref.error[1])
        out["raises"] = R.Comparison(0.0, 0.0, 0.0, 0.0, same, "" if same else
                                     f"raised {type(got.error[1]).__name__}, expected {type(ref.error[1]).__name__}")
    for i, (g, r, b) in enumerate(zip(got.steps, ref.steps, bounds, strict=False)):
        where = f"step {i}"
        for q in quantities:
            if q not in r and q not in g:
                continue
            if (q in r) != (q in g):
                if common_only:
                    continue
                _merge(out, q, R.Comparison(np.inf, np.inf, 0.0, np.inf, False, "present on one side only"), where)
            elif q == "num_batches_tracked":
                d = abs(int(g[q]) - int(r[q]))
                _merge(out, q, R.Comparison(float(d), float(d) / max(abs(int(r[q])), 1), 0.0, float(d > 0), d == 0,
                                            f"got {g[q]}, expected {r[q]}" if d else ""), where)
            else:
                _merge(out, q, R.compare(g[q], r[q], b[q]), where)
    return out


def rows_of(backend: str, case: Case, comps: dict[str, R.Comparison]) -> list[Row]:
    return [Row(backend, case.conv_name, case.name, q, c.max_abs_err, c.max_rel_err, c.tol, c.ok, c.err_to_tol,
                c.detail) for q, c in comps.items()]


def check_case(
    case: Case, backends: Sequence[str], *, pairwise: bool = True
) -> tuple[list[Row], dict[str, tuple[str, str]]]:
    """Every backend against the reference (and pairwise). Returns the rows and, for each backend that cannot run
    the case, ``(what, reason)`` from :data:`UNSUPPORTED`."""
    ref = reference_run(case)
    rows: list[Row] = []
    runs: dict[str, Run] = {}
    skipped: dict[str, tuple[str, str]] = {}
    for name in backends:
        why = unsupported(case, name)
        if why is not None:
            skipped[name] = (why, UNSUPPORTED[(name, why)][2])
            continue
        runs[name] = backend_run(case, name)
        rows += rows_of(name, case, compare_runs(runs[name], ref, ref.bounds))
    if pairwise:
        names = list(runs)
        doubled = [{q: 2 * v for q, v in b.items()} for b in ref.bounds]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                comps = compare_runs(runs[a], runs[b], doubled)
                rows += rows_of(f"{a}~{b}", case, comps)
    return rows, skipped


# ---- native batch norms ----------------------------------------------------------------------------------------------
def _native_torch(case: Case, *, functional: bool, affine: bool = True, track: bool = True,
                  eval_mode_last: bool = False) -> Run:
    """PyTorch's own BN: ``F.batch_norm`` or ``nn.BatchNorm1d/2d/3d`` (channel axis 1), gradients by autograd."""
    import torch

    from .backends import get_backend

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
        out = {"y": _numpy_of(be, y), "dx": _numpy_of(be, x.grad)}
        if w is not None:
            out.update(dgamma=_numpy_of(be, w.grad), dbeta=_numpy_of(be, b.grad))
        if functional and track:
            out.update(running_mean=_numpy_of(be, rm), running_var=_numpy_of(be, rv))
        elif not functional and track:
            out.update(running_mean=_numpy_of(be, mod.running_mean), running_var=_numpy_of(be, mod.running_var),
                       num_batches_tracked=int(mod.num_batches_tracked))
        steps.append(out)
    return Run(steps)


#: What MXNet 1.9's CPU ``nd.BatchNorm`` is allowed beyond multibn's bound: its moving variance is recovered as
#: ``1/invstd^2 - eps`` (a few float32 roundings of var + eps), float64 input is computed at float32 accuracy and
#: float16 input partly at float16 accuracy (both observed here; ``docs/semantics.md`` §6 measured 1.6e-4 off
#: float64 on a (64, 64, 56, 56) batch, which the n u terms of the bound cover).
MXNET_NATIVE = dict(extra_var_rel=4 * 2.0**-24, u_acc={"float64": 2.0**-24, "float16": 2.0**-11})


def _native_mxnet(case: Case, *, fix_gamma: bool) -> Run:
    """MXNet's ``nd.BatchNorm``: training steps under ``autograd.record()`` with a backward (which is when its CPU
    kernel moves the moving statistics); eval steps with ``use_global_stats=True``."""
    from .backends import get_backend

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
        steps.append({"y": _numpy_of(be, y), "dx": _numpy_of(be, x.grad), "dgamma": _numpy_of(be, g.grad),
                      "dbeta": _numpy_of(be, b.grad), "running_mean": _numpy_of(be, mm),
                      "running_var": _numpy_of(be, mv)})
    return Run(steps)


def _gluon_block_run(case: Case, *, ours: bool) -> Run:
    """``gluon.nn.BatchNorm`` (``ours=False``) or ``multibn.layers.gluon.BatchNorm(update="backward")``: training
    steps under ``autograd.record()`` with a backward (when both move the statistics), eval steps in predict mode
    with ``backward(train_mode=False)``. Channel axis 1, float32, the case's convention (gluon: eps, momentum)."""
    from .backends import get_backend

    get_backend("mxnet")
    from mxnet import autograd, gluon, initializer, nd

    conv = case.conv
    if ours:
        from .layers.gluon import BatchNorm

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


def _native_flax(case: Case, *, fast_variance: bool) -> Run:
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


# ---- the battery ---------------------------------------------------------------------------------------------------
def battery(conventions: Sequence[str], *, quick: bool) -> list[Case]:
    """The fixed-seed cases, per convention. The quick battery shares shapes between cases (JAX compiles each
    operation once per shape and dtype) and alternates float16 and bfloat16 between conventions."""
    cases = []
    for k, name in enumerate(conventions):
        s = 1000 * (k + 1)
        # the convention's default axis: (6, 3, 4, 4) is NCHW with 3 channels, or NHWC with 4 (flax, keras)
        cases.append(make_case("f32 rank4 3T+E", name, "float32", [(6, 3, 4, 4)] * 3 + [(2, 3, 4, 4)],
                               training=[True, True, True, False], seed=s + 1, offsets=[0.0, 3.0, 30.0, 1.0]))
        cases.append(make_case("f64 offset1e4 rank3 axis-1 2T+E", name, "float64", [(8, 5, 4), (5, 5, 4), (3, 5, 4)],
                               training=[True, True, False], axis=-1, seed=s + 2, offsets=1e4, spread=1e-2))
        if not quick or k % 2 == 0:
            cases.append(make_case("f16 rank2 2T+E", name, "float16", [(16, 3), (8, 3), (4, 3)],
                                   training=[True, True, False], axis=1, seed=s + 3, offsets=[0.0, 10.0, 100.0],
                                   spread=2.0))
        if not quick or k % 2 == 1:
            cases.append(make_case("bf16 rank5 axis0 T+E", name, "bfloat16", [(3, 4, 2, 3, 2), (3, 2, 2, 1, 2)],
                                   training=[True, False], axis=0, seed=s + 4, offsets=[0.0, 1.0, 1e3]))
        cases += [
            make_case("f32 constant+NaN eps0 2T+E", name, "float32", [(5, 4, 3)] * 3, training=[True, True, False],
                      axis=1, seed=s + 5, offsets=[0.0, 20.0, 0.0, 5.0], constant=[1], eps=0.0,
                      specials=[(1, 7, float("nan"))]),
            make_case("f32 NaN/inf in eval T+E", name, "float32", [(5, 4, 3)] * 2, training=[True, False], axis=1,
                      seed=s + 12, specials=[(1, 1, float("nan")), (1, 4, float("inf"))]),
            make_case("f32 one value per channel", name, "float32", [(1, 4, 1), (5, 4, 3)], axis=1, seed=s + 6),
        ]
        if not quick:
            cases += [
                make_case("f32 large n offset1e3", name, "float32", [(32, 4, 8, 8)] * 2 + [(8, 4, 8, 8)],
                          training=[True, True, False], axis=1, seed=s + 7, offsets=[0.0, 1e3, 10.0, 1e2]),
                make_case("f32 empty batch 3T", name, "float32", [(4, 3, 2), (0, 3, 2), (4, 3, 2)], axis=1,
                          seed=s + 8),
                make_case("f64 momentum0.5 eps0.1 4T+E", name, "float64", [(3, 2, 5)] * 4 + [(1, 2, 5)],
                          training=[True] * 4 + [False], axis=-2, seed=s + 9, momentum=0.5, eps=0.1),
                make_case("f32 stateless", name, "float32", [(4, 3, 3)] * 2, axis=1, seed=s + 10, stateful=False),
                make_case("f32 inf channel", name, "float32", [(6, 3)] * 2 + [(2, 3)], training=[True, True, False],
                          axis=1, seed=s + 11, specials=[(0, 4, float("-inf"))]),
            ]
    return cases


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
            out.append(Native("F.batch_norm", "torch", c, lambda c: _native_torch(c, functional=True)))
            out.append(Native("nn.BatchNorm2d", "torch", c, lambda c: _native_torch(c, functional=False)))
            c3 = make_case("f32 rank5 2T+E", "torch", "float32", [(2, 3, 2, 2, 3)] * 2 + [(1, 3, 2, 2, 3)],
                           training=[True, True, False], seed=12, gamma=[1.0] * 3, beta=[0.0] * 3)
            out.append(Native("nn.BatchNorm3d(affine=False)", "torch", c3,
                              lambda c: _native_torch(c, functional=False, affine=False)))
            cs = make_case("f32 rank3 3T", "torch", "float32", [(4, 3, 5)] * 3, seed=13)
            out.append(Native("nn.BatchNorm1d(track_running_stats=False), eval last", "torch", cs,
                              lambda c: _native_torch(c, functional=False, track=False, eval_mode_last=True),
                              multibn_case=dataclasses.replace(cs, stateful=False)))
            if not quick:
                cb = make_case("bf16 rank4 2T+E", "torch", "bfloat16", [(4, 3, 3, 3)] * 3,
                               training=[True, True, False], seed=14)
                out.append(Native("F.batch_norm", "torch", cb, lambda c: _native_torch(c, functional=True)))
        if "torch_cma" in conventions:
            c = make_case("f32 rank2 3T+E", "torch_cma", "float32", [(6, 4), (3, 4), (9, 4), (2, 4)],
                          training=[True, True, True, False], seed=15, offsets=[0.0, 1.0, 10.0, 100.0])
            out.append(Native("nn.BatchNorm1d(momentum=None)", "torch", c,
                              lambda c: _native_torch(c, functional=False)))
    if "mxnet" in backends and installed("mxnet"):
        if "mxnet" in conventions:
            c = make_case("f32 rank4 2T+E", "mxnet", "float32", [(5, 3, 4, 2)] * 2 + [(2, 3, 4, 2)],
                          training=[True, True, False], seed=21, offsets=[0.0, 5.0, 50.0])
            out.append(Native("nd.BatchNorm(fix_gamma=True)", "mxnet", c, lambda c: _native_mxnet(c, fix_gamma=True),
                              **MXNET_NATIVE))
            cl = make_case("f32 rank3 axis-1 2T+E", dataclasses.replace(CONVENTIONS["mxnet"], fix_gamma=False,
                                                                          name="mxnet(fix_gamma=False)"),
                           "float32", [(4, 5, 3)] * 2 + [(1, 5, 3)], training=[True, True, False], axis=-1, seed=22)
            out.append(Native("nd.BatchNorm(fix_gamma=False, axis=-1)", "mxnet", cl,
                              lambda c: _native_mxnet(c, fix_gamma=False), **MXNET_NATIVE))
            if not quick:
                cb = make_case("f32 large n 2T+E", "mxnet", "float32", [(32, 8, 16, 16)] * 2 + [(4, 8, 16, 16)],
                               training=[True, True, False], seed=25, offsets=[0.0, 1.0, 10.0, 100.0])
                out.append(Native("nd.BatchNorm(fix_gamma=True)", "mxnet", cb,
                                  lambda c: _native_mxnet(c, fix_gamma=True), **MXNET_NATIVE))
        if "gluon" in conventions:
            c = make_case("f32 rank2 2T+E", "gluon", "float32", [(8, 3), (5, 3), (2, 3)],
                          training=[True, True, False], seed=23)
            out.append(Native("nd.BatchNorm(fix_gamma=False, eps=1e-5)", "mxnet", c,
                              lambda c: _native_mxnet(c, fix_gamma=False), **MXNET_NATIVE))
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
                          lambda c: _native_flax(c, fast_variance=False), requires=("flax",)))
        out.append(Native("linen.BatchNorm(use_fast_variance=True)", "jax", c,
                          lambda c: _native_flax(c, fast_variance=True), extra_var=1.0, requires=("flax",)))
        if not quick:
            co = make_case("f32 offset1e3 rank2 2T+E", "flax", "float32", [(16, 3)] * 3,
                           training=[True, True, False], seed=32, offsets=1e3, momentum=0.9)
            out.append(Native("linen.BatchNorm(use_fast_variance=False, momentum=0.9)", "jax", co,
                              lambda c: _native_flax(c, fast_variance=False), requires=("flax",)))
    if "keras" in conventions and installed("keras"):
        c = make_case("f32 rank3 2T+E", "keras", "float32", [(4, 5, 3)] * 2 + [(2, 5, 3)],
                      training=[True, True, False], seed=41, offsets=[0.0, 1.0, 2.0])
        for kb, extra in (("jax", 0.0), ("torch", 1.0)):  # Keras-torch: one-pass E[x^2] - E[x]^2
            if kb in backends and installed(kb):
                out.append(Native(f"keras[{kb}] BatchNormalization", kb, c,
                                  lambda c, kb=kb: run_keras(c, kb), extra_var=extra, requires=("keras",)))
    return out


# ---- the command -----------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("multibn", "numpy", "torch", "jax", "jaxlib", "mxnet", "flax", "keras", "array-api-compat"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["jax_enable_x64"] = str(_jax_x64())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of numpy,torch,jax,mxnet (default: every installed backend)")
    parser.add_argument("--conventions", default=None,
                        help=f"comma-separated subset of {','.join(CONVENTIONS)} (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="the smaller battery (under a minute)")
    parser.add_argument("--no-native", action="store_true", help="skip the comparisons with the frameworks' own BN")


class _Progress:
    def __init__(self, total: int, t0: float) -> None:
        self.total, self.done, self.tty = max(total, 1), 0, sys.stderr.isatty()
        self.t0 = t0

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:5.1f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
        elif self.done == self.total or self.done % max(self.total // 10, 1) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class UsageError(ValueError):
    """A bad selection or output path: exit status 2, nothing run."""


def _parse_list(value: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if value is None:
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not items:
        raise UsageError(f"--{what}s {value!r} selects no {what}; choose from {', '.join(allowed)} "
                         f"(or leave the flag out for all)")
    return list(dict.fromkeys(items))


def _unavailable(asked: Sequence[str]) -> dict[str, str]:
    """Backend -> why it cannot be imported here, for the asked-for backends that cannot (imports them)."""
    from .backends import get_backend

    out = {}
    for b in asked:
        try:
            get_backend(b)
        except ImportError as e:
            out[b] = str(e)
    return out


def run(args: argparse.Namespace) -> int:
    from .cli import check_outputs

    try:
        conventions = _parse_list(args.conventions, tuple(CONVENTIONS), "convention")
        asked = _parse_list(args.backends, BACKENDS, "backend")
    except UsageError as e:
        print(f"multibn check: error: {e}", file=sys.stderr)
        return 2
    bad_output = check_outputs("check", json=args.json)
    if bad_output is not None:
        return bad_output
    if args.backends is not None:  # asked for by name: each must run, or the check would pass without them
        missing = _unavailable(asked)
        if missing:
            for b, why in missing.items():
                print(f"multibn check: error: backend {b} was asked for but cannot run here: {why}", file=sys.stderr)
            return 1
    return _run(args, conventions, asked)


def _run(args: argparse.Namespace, conventions: list[str], asked: list[str]) -> int:
    import importlib.util
    import shutil

    from .backends import available_backends

    t0 = time.monotonic()
    cases = battery(conventions, quick=args.quick)
    present = [b for b in asked if importlib.util.find_spec(b) is not None]
    natives = [] if args.no_native else native_battery(present, conventions, quick=args.quick)
    # Keras picks its backend at import: each Keras run is a subprocess, started first (it has the longest way to
    # go) and collected at the end.
    workdir = tempfile.mkdtemp(prefix="multibn-check-")
    keras_jobs = {id(n): start_keras(n.case, n.backend, workdir) for n in natives if n.requires == ("keras",)}
    have = available_backends()  # imports the frameworks
    backends = [b for b in asked if b in have]
    missing = [b for b in asked if b not in have]
    natives = [n for n in natives if n.backend in backends]
    progress = _Progress(len(cases) + len(natives), t0)
    rows: list[Row] = []
    not_run: dict[tuple[str, str], str] = {}
    try:
        for case in cases:
            progress.step(f"{case.conv_name} {case.name}")
            r, skipped = check_case(case, backends)
            rows += r
            for b, (what, why) in skipped.items():
                not_run[(b, what)] = why
        for nat in natives:
            progress.step(f"{nat.backend} {nat.label}")
            try:
                job = keras_jobs.pop(id(nat), None)
                native_run = finish_keras(*job, len(nat.case.steps)) if job is not None else None
                rows += compare_native(nat, native_run)
            except ImportError as e:
                not_run[(nat.backend, nat.label)] = f"not installed: {e}"
    finally:
        for proc, _ in keras_jobs.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    progress.close()
    _print_table(rows, conventions, backends)
    failed = [r for r in rows if not r.ok]
    if not_run or missing:
        print("\nnot run:")
        for b in missing:
            print(f"  {b}: backend not installed here")
        for (b, what), why in sorted(not_run.items()):
            print(f"  {b} {what}: {why}")
    if failed:
        print("\nfailures:")
        for r in failed:
            print(f"  {r.backend} {r.convention} [{r.case}] {r.quantity}: {r.detail}")
    elapsed = time.monotonic() - t0
    passed = bool(rows) and not failed  # nothing compared is not a pass
    if not rows:
        print("\nno comparison ran: none of the selected backends can run here", file=sys.stderr)
    print(f"\n{len(rows)} comparisons ({len(cases)} cases x {len(backends)} backends + pairwise, "
          f"{len(natives)} native): "
          f"{len(rows) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f}s "
          f"-> {'PASS' if passed else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "results": [r.as_json() for r in rows],
                       "not_run": [{"backend": b, "what": w, "reason": why} for (b, w), why in not_run.items()]
                       + [{"backend": b, "what": "backend", "reason": "not installed"} for b in missing]},
                      f, indent=1)
    return 0 if passed else 1


def _print_table(rows: list[Row], conventions: Sequence[str], backends: Sequence[str]) -> None:
    """One line per backend x convention x quantity (cases folded: the worst error, the largest bound); then the
    backend pairs, then the native BNs (``<backend>:native``: the framework's own BN against multibn on it)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:  # backend pairs: one line per pair and quantity, every convention folded in
        groups.setdefault((r.backend, "(all)" if "~" in r.backend else r.convention, r.quantity), []).append(r)
    order = {q: i for i, q in enumerate((*R.QUANTITIES, "raises"))}
    border = {b: i for i, b in enumerate(backends)}

    def key(k: tuple[str, str, str]) -> tuple:
        b, c, q = k
        return ("native" in b, "~" in b, border.get(b.split(":")[0].split("~")[0], 99), b,
                conventions.index(c) if c in conventions else 99, c, order.get(q, 99))

    header = (f"{'backend':<14} {'convention':<24} {'quantity':<20} {'cases':>5} {'max_abs_err':>11} "
              f"{'max_rel_err':>11} {'tol':>9} {'err/tol':>8}  result")
    print(header)
    print("-" * len(header))
    for k in sorted(groups, key=key):
        rs = groups[k]
        ok = all(r.ok for r in rs)
        print(f"{k[0]:<14} {k[1]:<24} {k[2]:<20} {len(rs):>5} {max(r.max_abs_err for r in rs):>11.3g} "
              f"{max(r.max_rel_err for r in rs):>11.3g} {max(r.tol for r in rs):>9.2g} "
              f"{max(r.err_to_tol for r in rs):>8.2g}  {'PASS' if ok else 'FAIL'}")
    if any(not np.isfinite(r.tol) for r in rows):
        print("tol inf: the error bound is infinite where 1/sqrt(var + eps) is (a constant channel with eps 0) or "
              "the input holds NaN/inf; such a row checks that NaN and inf sit at the same places, and its error "
              "columns show how far the finite values are apart (mxnet dgamma under fix_gamma: exactly 0)")
