"""An independent float64 NumPy reference for batch norm, and the error bounds the conformance suite allows.

The reference is written from the textbook (Ioffe & Szegedy 2015, Algorithms 1-2 and the chain-rule backward
of their section 3), not from :mod:`multibn.algorithm`, and shares no code with it: centred form
``y = gamma * (x - mean) / sqrt(var + eps) + beta``, two-pass statistics, every value in float64. Of a
convention it reads only the fields of the record (momentum, momentum_weighs, unbiased_running_var, eps,
fix_gamma, zero_var_guard, single_value_raises, count_empty_batches); the update rules are spelled out here.

The second half is the error model of the conformance suite: how far a backend computing in a narrower dtype
may be from the float64 reference, per element, with one table of unit roundoffs per dtype
(:data:`TOLERANCES`). Nothing here imports a framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

F64 = np.float64


# ---- layout ---------------------------------------------------------------------------------------------------
def channel_axes(ndim: int, axis: int) -> tuple[int, tuple[int, ...]]:
    """``(channel axis, reduced axes)`` for ``axis`` in ``[-ndim, ndim)``."""
    ax = axis % ndim
    return ax, tuple(i for i in range(ndim) if i != ax)


def per_channel(v: np.ndarray, ndim: int, ax: int) -> np.ndarray:
    """A per-channel vector reshaped to broadcast against an array of rank ``ndim``."""
    shape = [1] * ndim
    shape[ax] = -1
    return np.reshape(v, shape)


# ---- the reference ------------------------------------------------------------------------------------------------
class RefState(NamedTuple):
    """Running statistics, float64, and the number of training calls counted so far (a Python int)."""

    running_mean: np.ndarray
    running_var: np.ndarray
    num_batches_tracked: int


def init_ref_state(channels: int) -> RefState:
    return RefState(np.zeros(channels, F64), np.ones(channels, F64), 0)


@dataclass
class RefStep:
    """One reference step: the outputs, the state after it, and what the error model needs."""

    y: np.ndarray
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    state: RefState | None
    training: bool  # True: batch statistics; False: running statistics
    n: int  # elements per channel
    center: np.ndarray  # the mean used (batch mean, or running mean in eval)
    var: np.ndarray  # the variance used (biased batch variance, or running var in eval)
    invstd: np.ndarray
    gamma_eff: np.ndarray  # gamma, or ones under fix_gamma
    guarded: np.ndarray  # bool per channel: invstd forced to 0 by the zero-variance guard
    stat_var: np.ndarray | None = None  # the variance folded into the running var (biased or unbiased)
    keep_take: tuple[float, float] | None = None  # the running update's weights, when there was one
    info: dict[str, Any] = field(default_factory=dict)


def moments(x: np.ndarray, axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, biased var)`` per channel, two passes in float64."""
    ax, red = channel_axes(x.ndim, axis)
    n = int(np.prod([x.shape[i] for i in red], dtype=np.int64))
    mean = np.sum(x, axis=red) / n
    dev = x - per_channel(mean, x.ndim, ax)
    var = np.sum(dev * dev, axis=red) / n
    return n, mean, var


def reference_step(
    x: Any, gamma: Any, beta: Any, state: RefState | None, dy: Any, *, training: bool, convention: Any,
    axis: int,
) -> RefStep:
    """One batch-norm call and its backward for the upstream gradient ``dy``, in float64.

    ``convention`` is a :class:`multibn.Convention` (only its fields are read). Training uses the batch
    statistics and, with a ``state``, moves it; eval (``training=False``) uses ``state``'s statistics.
    Raises ValueError where the convention refuses (one value per channel in training under PyTorch's rules).
    """
    x = np.asarray(x, F64)
    dy = np.asarray(dy, F64)
    gamma = np.asarray(gamma, F64)
    beta = np.asarray(beta, F64)
    eps = float(convention.eps)
    ax, red = channel_axes(x.ndim, axis)
    channels = x.shape[ax]
    g = np.ones(channels, F64) if convention.fix_gamma else gamma
    bc = lambda v: per_channel(v, x.ndim, ax)  # noqa: E731
    with np.errstate(all="ignore"):
        if training:
            n = int(np.prod([x.shape[i] for i in red], dtype=np.int64))
            if n == 1 and convention.single_value_raises:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
            if n == 0:  # empty batch: empty output, zero parameter gradients, no statistic moves
                zeros = np.zeros(channels, F64)
                new = None
                if state is not None:
                    t = state.num_batches_tracked + (1 if convention.count_empty_batches else 0)
                    new = RefState(state.running_mean, state.running_var, t)
                return RefStep(np.zeros(x.shape, F64), np.zeros(x.shape, F64), zeros, zeros.copy(), new, True, 0,
                               zeros, zeros, zeros, g, np.zeros(channels, bool))
            _, mean, var = moments(x, ax)
            guarded = np.zeros(channels, bool)
            if convention.zero_var_guard and eps == 0.0:
                guarded = var == 0
            invstd = np.where(guarded, 0.0, 1.0 / np.sqrt(var + eps))
            xmu = x - bc(mean)
            y = bc(g) * xmu * bc(invstd) + bc(beta)
            # Backward, the textbook chain rule through mean and variance (Ioffe & Szegedy, section 3).
            dxhat = dy * bc(g)
            dvar_factor = np.where(guarded, 0.0, (var + eps) ** -1.5)  # d invstd / d var = -1/2 (var+eps)^-3/2
            dvar = np.sum(dxhat * xmu, axis=red) * -0.5 * dvar_factor
            dmean = -np.sum(dxhat, axis=red) * invstd + dvar * -2.0 * np.sum(xmu, axis=red) / n
            dx = dxhat * bc(invstd) + bc(dvar) * 2.0 * xmu / n + bc(dmean) / n
            dgamma = np.zeros(channels, F64) if convention.fix_gamma else np.sum(dy * xmu * bc(invstd), axis=red)
            dbeta = np.sum(dy, axis=red)
            new, stat_var, weights = None, None, None
            if state is not None:
                new, stat_var, weights = _update(state, mean, var, n, convention)
            return RefStep(y, dx, dgamma, dbeta, new, True, n, mean, var, invstd, g, guarded, stat_var, weights,
                           {"unbiased": bool(convention.unbiased_running_var)})
        if state is None:
            raise ValueError("eval mode needs running statistics")
        n = int(np.prod([x.shape[i] for i in red], dtype=np.int64))
        rm, rv = state.running_mean, state.running_var
        invstd = 1.0 / np.sqrt(rv + eps)  # no zero-variance guard in eval, in any framework
        xmu = x - bc(rm)
        y = bc(g) * xmu * bc(invstd) + bc(beta)
        dx = dy * bc(g) * bc(invstd)
        dgamma = np.zeros(channels, F64) if convention.fix_gamma else np.sum(dy * xmu * bc(invstd), axis=red)
        dbeta = np.sum(dy, axis=red)
        return RefStep(y, dx, dgamma, dbeta, state, False, n, rm, rv, invstd, g, np.zeros(channels, bool))


def _update(
    state: RefState, mean: np.ndarray, var: np.ndarray, n: int, convention: Any
) -> tuple[RefState, np.ndarray, tuple[float, float]]:
    """The running statistics after one non-empty training batch; also the stored variance and the weights."""
    t = state.num_batches_tracked + 1
    stat_var = var * n / (n - 1) if convention.unbiased_running_var else var  # n == 1: 0/0 = NaN, as PyTorch's
    m = convention.momentum
    if m is None:  # PyTorch momentum=None: cumulative average, the t-th batch weighs 1/t
        keep, take = 1.0 - 1.0 / t, 1.0 / t
    elif convention.momentum_weighs == "new":  # R <- (1 - m) R + m stat
        keep, take = 1.0 - float(m), float(m)
    else:  # R <- m R + (1 - m) stat
        keep, take = float(m), 1.0 - float(m)
    new = RefState(keep * state.running_mean + take * mean, keep * state.running_var + take * stat_var, t)
    return new, stat_var, (keep, take)


# ---- dtypes ------------------------------------------------------------------------------------------------------
def round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even); the result is float32. NaN and inf are kept."""
    a32 = np.ascontiguousarray(a, np.float32)
    bits = a32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a32), a32, rounded).astype(np.float32)


def quantize(a: Any, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and returned as float64 (bfloat16 by hand: NumPy has no such dtype)."""
    a = np.asarray(a, F64)
    with np.errstate(all="ignore"):
        if dtype == "bfloat16":
            return round_to_bfloat16(a).astype(F64)
        return a.astype(dtype).astype(F64)


def param_dtype(dtype: str) -> str:
    """The dtype of gamma, beta and the running statistics for input ``dtype`` (float32 for the narrow ones)."""
    return "float64" if dtype == "float64" else "float32"


# ---- the error model -----------------------------------------------------------------------------------------------
class Tol(NamedTuple):
    u_out: float  # unit roundoff of values stored in this dtype
    u_acc: float  # unit roundoff of the arithmetic: statistics are computed in promote(dtype, float32)


#: The one tolerance table: unit roundoffs per dtype. Everything the suite allows follows from these two numbers
#: through the first-order error model of :func:`step_bounds`, times :data:`SAFETY`:
#:
#: * sums of n terms in the accumulation dtype are off by at most ``n * u_acc * sum|terms|`` (recursive summation,
#:   Higham ch. 4; pairwise sums do better), so the batch mean is off by ``dm = n u A`` with ``A = max|x|`` of the
#:   channel: error growing with n, and with |mean|/std relative to the result (the issue's ``n ulp |mean|/std``);
#: * the two-pass variance is off by ``n u var + dm^2`` (the mean error enters squared), a one-pass
#:   E[x^2] - E[x]^2 by ``n u A^2`` more (only natives that use it are allowed that: ``extra_var``);
#: * ``y = x * scale + shift`` is computed in fused form, so besides the propagated mean and variance errors it is
#:   off by ``3 u (|scale| A + |scale mean| + |beta|)``: the absolute error scales with ``ulp * |mean| * scale``,
#:   cancellation that a centred form would not have;
#: * every result is finally rounded to its dtype: ``u_out |result|`` (float16/bfloat16 y and dx; the float32 or
#:   float64 parameters and running statistics);
#: * running statistics carry their error from step to step, and eval steps inherit it.
#:
#: SAFETY absorbs the constants a first-order model drops. The model is what ``docs/semantics.md`` §3 asks
#: (float32 ~1e-6 relative plus n ulp |mean|/std absolute) made per element, and it stays tighter than a one-pass
#: variance would need, so it tells a two-pass implementation from a one-pass one.
TOLERANCES: dict[str, Tol] = {
    "float64": Tol(u_out=2.0**-53, u_acc=2.0**-53),
    "float32": Tol(u_out=2.0**-24, u_acc=2.0**-24),
    "float16": Tol(u_out=2.0**-11, u_acc=2.0**-24),
    "bfloat16": Tol(u_out=2.0**-8, u_acc=2.0**-24),
}
SAFETY = 4.0

QUANTITIES = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "num_batches_tracked")


class StateError(NamedTuple):
    """Per-channel bounds on the error a backend's running mean and variance may carry."""

    mean: np.ndarray
    var: np.ndarray


def _finite_absmax(a: np.ndarray, red: tuple[int, ...]) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.max(np.where(np.isfinite(a), np.abs(a), 0.0), axis=red, initial=0.0)


def step_bounds(
    step: RefStep, x: Any, dy: Any, beta: Any, *, axis: int, eps: float, dtype: str,
    err_in: StateError | None, extra_var: float = 0.0, extra_var_rel: float = 0.0, u_acc: float | None = None,
) -> tuple[dict[str, np.ndarray], StateError | None]:
    """Per-element error bounds for every quantity of ``step``, and the state error after it.

    ``x``, ``dy``, ``beta`` are the float64 values the backend was given. ``extra_var`` adds ``n u A^2 *
    extra_var`` to the variance error (one-pass natives), ``extra_var_rel`` adds ``extra_var_rel * (var + eps)``
    (e.g. MXNet's variance recovered as ``1/invstd^2 - eps``). ``u_acc`` replaces the unit roundoff of the
    arithmetic and of the stored parameters where a native computes in a narrower type than multibn does.
    """
    x, dy, beta = (np.asarray(v, F64) for v in (x, dy, beta))
    tol, tol_p = TOLERANCES[dtype], TOLERANCES[param_dtype(dtype)]
    u, uo, up = tol.u_acc, tol.u_out, tol_p.u_out
    if u_acc is not None:
        u, up = max(u, u_acc), max(up, u_acc)
    ax, red = channel_axes(x.ndim, axis)
    bc = lambda v: per_channel(v, x.ndim, ax)  # noqa: E731
    n = max(step.n, 1)
    channels = x.shape[ax]
    if err_in is None:
        err_in = StateError(np.zeros(channels), np.zeros(channels))
    with np.errstate(all="ignore"):
        A = _finite_absmax(x, red)
        D = _finite_absmax(dy, red)
        G = np.abs(step.gamma_eff)
        Bb = np.abs(beta)
        mu, var, s = step.center, step.var, step.invstd
        if step.training:
            dm = n * u * A
            dv = n * u * var + dm**2 + extra_var * n * u * A**2 + extra_var_rel * (var + eps)
        else:  # eval: the running statistics' own error; their float32 copy adds nothing (already float32)
            dm, dv = err_in.mean, err_in.var
        rho = np.where(step.guarded, 0.0, dv / (2.0 * (var + eps)) + 2.0 * u)  # relative error of invstd
        xc = np.abs(x - bc(mu))
        xh = xc * bc(s)
        Xh = _finite_absmax(xh, red)
        gs = G * s
        b: dict[str, np.ndarray] = {}
        b["y"] = (bc(gs * dm) + bc(gs * rho) * xc + bc(3 * u * (gs * (A + np.abs(mu)) + Bb))
                  + uo * np.abs(step.y))
        if step.training:
            dxh = bc(s * dm) + xh * bc(rho) + 2 * u * xh  # error of xhat, per element
            dXh = _finite_absmax(dxh, red)
            P = np.abs(np.sum(dy * (x - bc(mu)), axis=red)) * s / n  # |mean(dy * xhat)|
            dP = D * dXh + n * u * D * Xh
            b["dx"] = (np.abs(step.dx) * bc(rho)
                       + bc(gs) * (bc(n * u * D) + dxh * bc(P) + xh * bc(dP) + bc(3 * u * (2 * D + Xh * P)))
                       + uo * np.abs(step.dx))
            b["dgamma"] = n * D * (dXh + n * u * Xh) + up * np.abs(step.dgamma)
        else:
            b["dx"] = np.abs(step.dx) * (bc(rho) + 2 * u + uo)
            b["dgamma"] = n * D * s * (dm + _finite_absmax(xc, red) * rho + n * u * (A + np.abs(mu))) \
                + up * np.abs(step.dgamma)
        b["dbeta"] = n * n * u * D + up * np.abs(step.dbeta)
        err_out = err_in
        st = step.state
        if step.training and st is not None and step.keep_take is not None:
            keep, take = step.keep_take
            kept_mean = st.running_mean - take * mu  # keep * (the running mean before the update)
            kept_var = st.running_var - take * step.stat_var
            corr = n / (n - 1) if step.info.get("unbiased") and n > 1 else 1.0
            em = keep * err_in.mean + take * dm + 3 * u * (np.abs(kept_mean) + np.abs(take * mu)) \
                + up * np.abs(st.running_mean)
            ev = keep * err_in.var + take * dv * corr + 3 * u * (np.abs(kept_var) + np.abs(take * step.stat_var)) \
                + up * np.abs(st.running_var)
            err_out = StateError(em, ev)
        if st is not None:
            b["running_mean"] = err_out.mean
            b["running_var"] = err_out.var
        out = {}
        for k, v in b.items():
            v = SAFETY * np.broadcast_to(v, np.shape(getattr(step, k) if hasattr(step, k) else v))
            out[k] = np.where(np.isnan(v), np.inf, v)
    return out, err_out


# ---- comparison ---------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """How far ``got`` is from ``ref``: errors over the finite reference entries, non-finite positions exactly."""

    max_abs_err: float
    max_rel_err: float  # max |got - ref| / max |ref|
    tol: float  # the largest error the bound allows anywhere (the bound is per element)
    err_to_tol: float  # max |got - ref| / bound: <= 1 means within the bound everywhere
    ok: bool
    detail: str = ""
    ref_scale: float = 0.0  # max |ref| over the finite entries


def compare(got: Any, ref: Any, bound: Any) -> Comparison:
    """``got`` against ``ref`` within ``bound`` (per element); NaN, +inf and -inf must sit at the same places."""
    got, ref = np.asarray(got, F64), np.asarray(ref, F64)
    if got.shape != ref.shape:
        return Comparison(np.inf, np.inf, 0.0, np.inf, False, f"shape {got.shape} != reference {ref.shape}")
    bound = np.broadcast_to(np.asarray(bound, F64), ref.shape)
    problems = []
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        mismatch = test(got) != test(ref)
        if mismatch.any():
            idx = tuple(int(i) for i in np.argwhere(mismatch)[0])
            problems.append(f"{name} positions differ ({int(mismatch.sum())} entries, first at {idx}: "
                            f"got {got[idx]!r}, reference {ref[idx]!r})")
    fin = np.isfinite(ref) & np.isfinite(got)
    if not fin.any():
        return Comparison(0.0, 0.0, 0.0, 0.0, not problems, "; ".join(problems))
    err = np.abs(got[fin] - ref[fin])
    bnd = bound[fin]
    max_abs = float(err.max())
    scale = float(np.abs(ref[fin]).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    with np.errstate(all="ignore"):
        ratios = np.where(err == 0, 0.0, err / bnd)
    worst = int(np.argmax(ratios))
    ratio = float(ratios[worst])
    if ratio > 1:
        idx = tuple(int(i) for i in np.argwhere(fin)[worst])
        problems.append(f"error {err[worst]:.3g} > bound {bnd[worst]:.3g} at {idx} "
                        f"(got {got[idx]!r}, reference {ref[idx]!r})")
    return Comparison(max_abs, max_rel, float(bnd.max()), ratio, not problems, "; ".join(problems), scale)
