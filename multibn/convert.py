"""Converting one BN layer's parameters and running statistics from one convention to another.

The maths of ``docs/semantics.md`` (porting): a checkpoint stores gamma, beta, the running mean and the running
variance, but not eps, momentum or ``fix_gamma``, nor whether the running variance is the biased or the
unbiased estimate. Loading one framework's numbers into another framework's layer silently changes the
layer's output unless those differences are folded into the numbers; :func:`convert_state` does that. The
checkpoint files themselves are read and written by :mod:`multibn.checkpoints`; the command is
:mod:`multibn.port`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .backends import backend_name_of, get_backend
from .backends.base import Backend
from .conventions import Convention, resolve_convention
from .state import BNState

PRESERVE = ("inference", "statistics")


def convert_state(
    state: BNState, gamma: Any, beta: Any, *, src: str | Convention, dst: str | Convention,
    count: int | None = None, preserve: Literal["inference", "statistics"] = "inference",
) -> tuple[BNState, Any, Any, float]:
    """One BN layer's ``(state, gamma, beta)`` trained under convention ``src``, for a layer of convention ``dst``.

    Returns ``(state, gamma, beta, eps)``: the converted values and the eps the destination layer must be built
    with (``dst``'s). ``src``/``dst`` are convention names (``multibn.CONVENTIONS``) or :class:`Convention`
    objects, which is how a layer's own eps or ``fix_gamma`` is given (``dataclasses.replace(CONVENTIONS["torch"],
    eps=1e-3)``). ``gamma``/``beta`` may be None (no affine parameters: gamma 1, beta 0). The arrays may be
    NumPy, PyTorch, JAX or MXNet arrays (all of one framework) or sequences of numbers (converted to NumPy);
    the results are arrays of the same framework and dtype. Pure: nothing passed in is modified, and arrays
    that need no change are returned as they are. The checks read the values, so under ``jax.jit`` it fails.

    ``preserve="inference"`` (default): the destination layer in eval mode gives the source layer's output,
    ``y = gamma (x - mean) / sqrt(var + eps) + beta``, on every input:

    * a ``src.fix_gamma`` layer ignored its stored gamma (which weight decay may have moved away from 1,
      apache/mxnet#9624): gamma becomes 1;
    * an eps difference is folded into the running variance, ``var' = var + eps_src - eps_dst``; ValueError if
      that is negative for some channel (the source output then cannot be reproduced with ``eps_dst``);
    * a ``dst.fix_gamma`` layer ignores gamma, so a gamma that is not 1 is folded into the variance,
      ``var' = (var + eps_src) / gamma**2 - eps_dst`` and gamma becomes 1; ValueError for gamma <= 0;
    * biased and unbiased running variances are both just "the variance used at inference" once stored, so a
      change of estimator changes nothing; nor does momentum (it acts only on future training steps).

    ``preserve="statistics"``: the running statistics stay estimates of the data's statistics, converted to the
    destination's estimator, so that training can continue under the destination's rules; the inference output
    changes by the rescale (and by an eps difference, which is *not* folded). Between a biased (``M2/n``) and
    an unbiased (``M2/(n-1)``) running variance with ``k = count / (count - 1)``, ``count`` being the number of
    elements per channel in each training batch (N*H*W for a 2-d BN):

        U_t = k B_t + P_t (1 - k),   B_t = (U_t + P_t (k - 1)) / k,   P_t = prod_{i<=t} (1 - a_i)

    where ``a_i`` is the weight the source convention gave batch ``i`` (``1 - momentum`` for "old"-weighted
    momentum, ``momentum`` for "new", ``1/i`` for the cumulative average) and ``t =
    state.num_batches_tracked`` (``docs/semantics.md`` §2.6, from ``U_0 = B_0 = 1``, every framework's initial
    running variance).
    This is **exact only when every training batch had ``count`` elements per channel**, with no other
    change to the running variance; with varying batch sizes there is no exact conversion and ``count`` should
    be the typical one. ``num_batches_tracked=None`` means t is unknown: ``P_t`` is taken as 0, the steady
    state, which is exact in the limit of many batches. ``count`` (an int >= 2) is required when the estimators
    differ and refused with ``preserve="inference"``. The mean is never changed; gamma is reset to 1 for a
    ``src.fix_gamma`` source as above, and a gamma that is not 1 cannot go to a ``dst.fix_gamma`` layer
    (ValueError).
    """
    new_state, new_gamma, new_beta, eps, _ = convert_state_verbose(
        state, gamma, beta, src=src, dst=dst, count=count, preserve=preserve
    )
    return new_state, new_gamma, new_beta, eps


def convert_state_verbose(
    state: BNState, gamma: Any, beta: Any, *, src: str | Convention, dst: str | Convention,
    count: int | None = None, preserve: str = "inference",
) -> tuple[BNState, Any, Any, float, list[str]]:
    """:func:`convert_state` plus a list of what it changed, in words (empty when nothing changed)."""
    src_c = resolve_convention(src, None, None)
    dst_c = resolve_convention(dst, None, None)
    if preserve not in PRESERVE:
        raise ValueError(f"preserve must be 'inference' or 'statistics', got {preserve!r}")
    if count is not None and preserve != "statistics":
        raise ValueError(
            "count is used only with preserve='statistics' (the biased/unbiased rescale); with "
            "preserve='inference' the stored variance is kept as the variance used at inference"
        )
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 2):
        raise ValueError(
            f"count must be an int >= 2 (elements per channel in each training batch), got {count!r}"
        )
    if not (isinstance(state, tuple) and len(state) == 3):
        raise TypeError(
            "state must be a multibn.BNState (running_mean, running_var, num_batches_tracked), "
            f"got {type(state).__name__}"
        )
    rmean, rvar, tracked = state
    be = _common_backend({"state.running_mean": rmean, "state.running_var": rvar, "gamma": gamma, "beta": beta})
    rmean, rvar = _as_array(be, "state.running_mean", rmean), _as_array(be, "state.running_var", rvar)
    gamma = None if gamma is None else _as_array(be, "gamma", gamma)
    beta = None if beta is None else _as_array(be, "beta", beta)
    shape = tuple(rvar.shape)
    for name, a in (("state.running_mean", rmean), ("gamma", gamma), ("beta", beta)):
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)} but state.running_var has shape {shape}")
    for name, a in (("state.running_var", rvar), ("gamma", gamma)):
        if a is not None and not be.dtype_name(a).startswith(("float", "bfloat")):
            raise TypeError(f"{name} must have a floating dtype, got {be.dtype_name(a)}")

    xp = be.xp
    changes: list[str] = []
    var_np = be.to_numpy(rvar).astype(np.float64)
    gamma_np = None if gamma is None else be.to_numpy(gamma).astype(np.float64)
    new_gamma, new_var = gamma, rvar
    if src_c.fix_gamma and gamma is not None:
        new_gamma = xp.ones_like(gamma)
        if not np.all(gamma_np == 1):
            changes.append(f"gamma reset to 1 (source fix_gamma; stored gamma {_span(gamma_np)} was ignored)")
        gamma_np = None  # the effective gamma is 1
    gamma_is_one = gamma_np is None or bool(np.all(gamma_np == 1))
    eps_s, eps_d = src_c.eps, dst_c.eps

    if preserve == "inference":
        if dst_c.fix_gamma and not gamma_is_one:
            bad = np.flatnonzero(~(gamma_np > 0))
            if bad.size:
                raise ValueError(
                    f"the destination fixes gamma to 1 (fix_gamma) but gamma is not positive at channels "
                    f"{_channels(bad)} ({_values(gamma_np, bad)}): only a positive scale can be folded into "
                    "the running variance; use a destination convention without fix_gamma"
                )
            folded = (var_np + eps_s) / gamma_np**2 - eps_d
            _check_nonneg(folded, f"folding gamma into the running variance with eps {eps_s:g} -> {eps_d:g}")
            v32, g32 = _wide(be, rvar), _wide(be, gamma)
            new_var = xp.astype((v32 + eps_s) / (g32 * g32) - eps_d, rvar.dtype)
            new_gamma = xp.ones_like(gamma)
            changes.append(f"gamma {_span(gamma_np)} folded into running_var (destination fix_gamma)"
                           + (f", eps {eps_s:g} -> {eps_d:g} folded" if eps_s != eps_d else "")
                           + _lost(be, new_var, var_np, folded))
        elif eps_s != eps_d:
            folded = var_np + (eps_s - eps_d)
            if np.any(folded < 0):
                bad = np.flatnonzero(folded < 0)
                raise ValueError(
                    f"folding eps {eps_s:g} -> {eps_d:g} into the running variance (var + {eps_s:g} - {eps_d:g}) "
                    f"would make it negative at channels {_channels(bad)} (running_var {_values(var_np, bad)}): "
                    f"the source layer's output cannot be reproduced with eps {eps_d:g}; the destination eps "
                    f"must be <= {float(np.min(var_np)) + eps_s:.6g}"
                )
            new_var = xp.astype(_wide(be, rvar) + (eps_s - eps_d), rvar.dtype)
            lost = _lost(be, new_var, var_np, folded)
            if lost and bool(np.all(be.to_numpy(new_var).astype(np.float64) == var_np)):
                changes.append(f"eps {eps_s:g} -> {eps_d:g} NOT folded: the change is below a "
                               f"{be.dtype_name(rvar)} ulp of every running_var, which is stored unchanged; "
                               "the destination's output differs from the source's by that rounding")
            else:
                changes.append(f"eps {eps_s:g} -> {eps_d:g} folded into running_var" + lost)
    else:
        if dst_c.fix_gamma and not gamma_is_one:
            raise ValueError(
                f"the destination fixes gamma to 1 (fix_gamma) but gamma is {_span(gamma_np)}; with "
                "preserve='statistics' the running variance is not rescaled to absorb it: use "
                "preserve='inference' or a destination convention without fix_gamma"
            )
        if src_c.unbiased_running_var != dst_c.unbiased_running_var:
            if count is None:
                raise ValueError(
                    f"preserve='statistics' needs count (elements per channel in each training batch) to convert "
                    f"the {'unbiased' if src_c.unbiased_running_var else 'biased'} running variance of "
                    f"{src_c.name!r} to the {'unbiased' if dst_c.unbiased_running_var else 'biased'} one of "
                    f"{dst_c.name!r}"
                )
            t = _batches(be, tracked)
            p = _decay(src_c, t)
            k = count / (count - 1)
            if src_c.unbiased_running_var:
                new_var = xp.astype((rvar + p * (k - 1)) / k, rvar.dtype)
            else:
                _check_nonneg(k * var_np - p * (k - 1), f"rescaling the biased running variance with count "
                              f"{count} (t = {t})", hint="count or t does not fit these statistics")
                new_var = xp.astype(rvar * k - p * (k - 1), rvar.dtype)
            how = "unbiased -> biased" if src_c.unbiased_running_var else "biased -> unbiased"
            when = "t unknown: steady state" if t is None else f"t = {t}"
            changes.append(f"running_var rescaled {how} (count {count}, {when})")
        if eps_s != eps_d:
            changes.append(f"eps {eps_s:g} -> {eps_d:g} not folded (preserve='statistics'): inference output changes")
    return BNState(rmean, new_var, tracked), new_gamma, beta, eps_d, changes


# ---- helpers ----------------------------------------------------------------------------------------------------
def _wide(be: Backend, a: Any) -> Any:
    """``a`` in at least float32, so that a fold is computed once and rounded once to the stored dtype."""
    return be.xp.astype(a, be.xp.float32) if be.dtype_name(a) in ("float16", "bfloat16") else a


def _lost(be: Backend, new_var: Any, var_np: np.ndarray, folded: np.ndarray) -> str:
    """A warning for the channels where the stored dtype cannot hold the fold (the stored value did not move
    although the exact fold did), else ""."""
    stored = be.to_numpy(new_var).astype(np.float64)
    bad = np.flatnonzero((stored == var_np) & (folded != var_np))
    if not bad.size:
        return ""
    return (f"; WARNING: {be.dtype_name(new_var)} cannot hold the change at channels {_channels(bad)}: "
            "running_var stored unchanged there")


def _common_backend(named: dict[str, Any]) -> Backend:
    found = {k: b for k, v in named.items() if v is not None and (b := backend_name_of(v)) is not None}
    names = set(found.values())
    if len(names) > 1:
        k1, b1 = next(iter(found.items()))
        k2, b2 = next((k, b) for k, b in found.items() if b != b1)
        raise TypeError(f"{k1} is a {b1} array but {k2} is a {b2} array; pass arrays of one framework")
    return get_backend(names.pop() if names else "numpy")


def _as_array(be: Backend, name: str, a: Any) -> Any:
    if be.is_array(a):
        return a
    if isinstance(a, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an array or a sequence of numbers, got {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} could not be converted to an array: {e}") from e
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return be.asarray(arr)


def _batches(be: Backend, tracked: Any) -> int | None:
    if tracked is None:
        return None
    t = np.asarray(tracked if isinstance(tracked, (int, np.integer)) else be.to_numpy(tracked)).reshape(-1)
    if t.size != 1 or not np.issubdtype(t.dtype, np.integer) or int(t[0]) < 0:
        raise ValueError(
            f"state.num_batches_tracked must be a non-negative integer (or None when unknown), got {tracked!r}"
        )
    return int(t[0])


def _decay(conv: Convention, t: int | None) -> float:
    """``P_t = prod (1 - a_i)``: how much of the initial running variance is left after t batches."""
    if t is None:
        return 0.0
    weights = conv.update_weights()
    if weights is None:  # cumulative average: a_1 = 1 discards the initial value
        return 1.0 if t == 0 else 0.0
    return float(weights[0]) ** t


def _check_nonneg(values: np.ndarray, what: str, hint: str = "") -> None:
    bad = np.flatnonzero(values < 0)
    if bad.size:
        raise ValueError(
            f"{what} would make the running variance negative at channels {_channels(bad)} "
            f"({_values(values, bad)})" + (f": {hint}" if hint else "")
        )


def _channels(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:8])
    return f"[{shown}{', ...' if idx.size > 8 else ''}] ({idx.size} in all)" if idx.size > 8 else f"[{shown}]"


def _values(values: np.ndarray, idx: np.ndarray) -> str:
    return ", ".join(f"{float(values[i]):.6g}" for i in idx[:4]) + (", ..." if idx.size > 4 else "")


def _span(a: np.ndarray) -> str:
    lo, hi = float(np.min(a)), float(np.max(a))
    return f"{lo:.4g}" if lo == hi else f"in [{lo:.4g}, {hi:.4g}]"
