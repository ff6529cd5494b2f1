"""The one batch-norm algorithm, written once for every backend.

Notation, per channel c, with R the reduced axes (all but the channel axis) and n = |R|:

* statistics, as a mergeable summary (n, mean, M2) by the corrected two-pass method (:func:`_local_stats`):
  ``mean = c + S / n``, ``M2 = Q - S^2 / n`` with ``S = sum_R (x - c)``, ``Q = sum_R (x - c)^2`` about a centre
  ``c``: the pass-1 mean, or the channel's first element when that is as close (exact for a constant channel);
  batch variance ``var = M2 / n`` (biased); synchronised BN merges the replicas' summaries exactly
  (:func:`merge_stats`) and all-reduces the two backward sums;
* normalisation, one pass: ``y = x * scale + shift`` with ``s = 1 / sqrt(var + eps)``, ``scale = gamma * s``,
  ``shift = beta - mean * scale``; the zero-variance guard sets ``s = 0`` where ``var == 0`` and ``eps == 0``;
* running update: ``R <- keep * R + take * stat`` with the stored variance ``M2 / n`` or ``M2 / (n - 1)``;
* backward (training), with ``xhat = (x - mean) * s``:
  ``dbeta = sum_R dy``, ``dgamma = sum_R dy * xhat``,
  ``dx = gamma * s * (dy - mean_R(dy) - xhat * mean_R(dy * xhat))``;
  (eval) ``dx = dy * scale``, ``dgamma = sum_R dy * (x - running_mean) * s``.

Statistics are computed in ``promote(x.dtype, float32)``; ``y`` and ``dx`` keep the dtype of ``x``.
Everything here is pure: inputs are never written to (so ``astype`` need not copy). The full-size passes go
through the adapter's five kernels (:class:`multibn.backends.base.Backend`); the rest is array-API code on
per-channel vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from .backends.base import Array, Backend
from .conventions import Convention
from .state import BNState, RenormState


class Layout(NamedTuple):
    """Where the channels are in ``x``: which axes are reduced and how per-channel vectors broadcast. Made from
    ``x.shape`` at every call (sizes may be symbolic under ``torch.compile(dynamic=True)``), never kept."""

    axis: int
    channels: int
    reduce_axes: tuple[int, ...]
    count: int  # n, elements per channel
    bshape: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int) -> Layout:
        ndim = len(shape)
        ax = axis % ndim
        reduce_axes = tuple(i for i in range(ndim) if i != ax)
        count = 1
        for i in reduce_axes:
            count *= shape[i]
        bshape = tuple(shape[ax] if i == ax else 1 for i in range(ndim))
        return cls(ax, shape[ax], reduce_axes, count, bshape)

    def first_index(self) -> tuple[Any, ...]:
        """The index of each channel's first element: ``x[lay.first_index()]`` has shape ``(channels,)``."""
        return tuple(slice(None) if i == self.axis else 0 for i in range(len(self.bshape)))


class Norm(NamedTuple):
    """What the differentiable maps read of a convention: eps, whether gamma is fixed to 1, and the zero-variance
    guard. The ops are made per ``Norm`` (and channel axis and mode), so that a momentum schedule, another
    convention with the same normalisation, or a new shape makes no new op."""

    eps: float
    fix_gamma: bool
    zero_var_guard: bool

    @classmethod
    def of(cls, conv: Convention) -> Norm:
        return cls(conv.eps, conv.fix_gamma, conv.zero_var_guard)


class Stats(NamedTuple):
    """A mergeable per-channel summary: ``count`` elements (a Python int, or a per-channel array under a mask),
    their ``mean`` and ``m2 = sum (x - mean)^2``."""

    count: Any
    mean: Array
    m2: Array


def stats_dtype(be: Backend, x: Array) -> str:
    """``promote(x.dtype, float32)``: float64 stays float64, everything narrower computes in float32."""
    return "float64" if be.dtype_name(x) == "float64" else "float32"


class Sync(NamedTuple):
    """Synchronised BN: the framework's group (a torch process group, a JAX axis name) and the element count
    per channel of every replica, in replica order."""

    group: Any
    counts: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.counts)


class Renorm(NamedTuple):
    """Batch renormalisation (Ioffe, 2017; Keras's ``renorm_clipping``): the corrections ``r`` and ``d`` clipped to
    ``[rmin, rmax]`` and ``[-dmax, dmax]``, None leaving that side unclipped."""

    rmin: float | None = None
    rmax: float | None = None
    dmax: float | None = None


def renorm_corrections(be: Backend, norm: Norm, renorm: Renorm, mean: Array, var: Array, renorm_mean: Array,
                       renorm_std: Array) -> tuple[Array, Array]:
    """``(r, d)`` for the batch ``mean`` and biased ``var``, constants for differentiation:
    ``std = sqrt(var + eps)``, ``rstd = max(renorm_std, sqrt(eps))``, ``r = clip(std / rstd, rmin, rmax)``,
    ``d = clip((mean - renorm_mean) / rstd, -dmax, dmax)``."""
    xp = be.xp
    rstd = xp.astype(renorm_std, mean.dtype, copy=False)
    rstd = xp.where(rstd < math.sqrt(norm.eps), xp.zeros_like(rstd) + math.sqrt(norm.eps), rstd)
    r = xp.sqrt(var + norm.eps) / rstd
    d = (mean - xp.astype(renorm_mean, mean.dtype, copy=False)) / rstd
    if renorm.rmin is not None:
        r = xp.where(r < renorm.rmin, xp.zeros_like(r) + renorm.rmin, r)
    if renorm.rmax is not None:
        r = xp.where(r > renorm.rmax, xp.zeros_like(r) + renorm.rmax, r)
    if renorm.dmax is not None:
        d = xp.where(d > renorm.dmax, xp.zeros_like(d) + renorm.dmax, d)
        d = xp.where(d < -renorm.dmax, xp.zeros_like(d) - renorm.dmax, d)
    return r, d


def per_channel_counts(be: Backend, n: Any) -> bool:
    """Whether the count ``n`` is per channel (an array, under a mask) rather than one number for every channel
    (an int, or a symbolic int under ``torch.compile``)."""
    return be.is_array(n)


def _scalar(n: Any) -> Any:
    """An element count as a number to divide by: a Python int as a float (NumPy 1.x divides a float32 array by an
    int over 65535 in float64, by a float in float32); a symbolic size as it is (``float()`` would specialise it)."""
    return float(n) if isinstance(n, int) else n


def _nonzero(be: Backend, n: Any) -> Any:
    """``n`` with 0 replaced by 1, for ``sum / n`` where an empty channel has sum 0. A symbolic count is never 0
    (``torch.compile`` specialises sizes 0 and 1)."""
    if per_channel_counts(be, n):
        return be.xp.where(n > 0, n, be.xp.ones_like(n))
    return _scalar(max(n, 1) if isinstance(n, int) else n)


def _per_count(be: Backend, a: Array, n: Any) -> Array:
    """``a / n`` (0 where ``n == 0``)."""
    return a / _nonzero(be, n)


def _local_stats(be: Backend, x: Array, lay: Layout, mask: Array | None) -> Stats:
    """Per-channel statistics of this replica's ``x`` (of its elements where ``mask`` is True), in two passes.

    Pass 1: ``mean0 = sum x / n``. Pass 2, about a centre ``c``: ``S = sum (x - c)``, ``Q = sum (x - c)^2``, then
    ``mean = c + S / n`` and ``M2 = Q - S^2 / n`` (the corrected two-pass algorithm: ``S`` repairs the rounding of
    ``mean0``). ``c`` is ``mean0``, or the channel's first element ``k`` where ``k`` lies within ``2^-16 |mean0|``
    of it: a constant channel then has ``c = k`` exactly, so ``S = Q = 0``, ``mean = k`` and ``M2 = 0`` exactly,
    whatever the summation order or the rounding of ``/ n`` (XLA turns it into ``* (1 / n)``).
    """
    xp = be.xp
    dt = be.dtype(stats_dtype(be, x))
    if mask is None:
        n = lay.count
        if n == 0:
            zeros = xp.zeros((lay.channels,), dtype=dt, device=be.device_of(x))
            return Stats(0, zeros, zeros)
        mean0 = be.channel_sum(x, lay.reduce_axes, dt) / _scalar(n)
        k = xp.astype(x[lay.first_index()], dt, copy=False)
        c = xp.where(xp.abs(k - mean0) <= xp.abs(mean0) * 2.0**-16, k, mean0)
        xm = x
    else:
        n = mask_count(be, lay, mask, dt)
        mean0 = _per_count(be, be.channel_sum(xp.where(mask, x, xp.zeros_like(x)), lay.reduce_axes, dt), n)
        c = mean0
        xd = xp.astype(x, dt, copy=False)
        xm = xp.where(mask, xd, xp.zeros_like(xd) + xp.reshape(c, lay.bshape))  # masked-out elements add 0 to S, Q
    s, q = be.channel_dev_sums(xm, xp.reshape(c, lay.bshape), lay.reduce_axes)
    s_n = _per_count(be, s, n)
    m2 = q - s * s_n
    return Stats(n, c + s_n, xp.clip(m2, min=0.0))  # rounding may dip below 0; NaN stays


def mask_count(be: Backend, lay: Layout, mask: Array, dt: Any) -> Array:
    """The per-channel number of elements where ``mask`` is True, in the stats dtype."""
    return be.channel_sum(be.xp.astype(mask, dt, copy=False), lay.reduce_axes, dt)


def batch_stats(be: Backend, x: Array, lay: Layout, sync: Sync | None = None, mask: Array | None = None) -> Stats:
    """Two-pass per-channel statistics of ``x`` (of its elements where ``mask`` is True; an empty channel gives
    zeros); under ``sync``, of the whole batch across replicas, merged from every replica's summary."""
    local = _local_stats(be, x, lay, mask)
    if sync is None:
        return local

    def reduce_sum(a: Array) -> Array:
        return be.all_reduce_sum(a, sync.group)

    total = sync.count if mask is None else reduce_sum(local.count)
    return merge_stats(local, total, reduce_sum)


def merge_stats(part: Stats, total: Any, reduce_sum: Callable[[Array], Array]) -> Stats:
    """The exact statistics of the concatenation of several parts, ``part`` being one of them, by Chan et
    al.'s count-weighted merge: ``n = sum n_k``, ``mean = sum (n_k / n) mean_k``,
    ``M2 = sum (M2_k + n_k (mean_k - mean)^2)``. ``reduce_sum`` sums over the parts (an all-reduce across
    replicas, or a sum over a leading axis); ``total`` is ``n`` (an int, or per-channel counts). Parts with
    ``n_k = 0`` contribute nothing.
    """
    if isinstance(total, int) and total == 0:
        return Stats(0, part.mean, part.m2)
    weight = part.count / _scalar(total) if isinstance(total, int) else part.count / (total + (total == 0))
    mean = reduce_sum(part.mean * weight)
    d = part.mean - mean
    return Stats(total, mean, reduce_sum(part.m2 + d * d * part.count))


def inv_std(be: Backend, var: Array, eps: float, guard: bool) -> Array:
    """``1 / sqrt(var + eps)``; with the guard and ``eps == 0``, 0 where ``var == 0`` (PyTorch, MXNet)."""
    xp = be.xp
    if guard and eps == 0.0:
        zero = var == 0
        return xp.where(zero, xp.zeros_like(var), be.reciprocal(xp.sqrt(xp.where(zero, xp.ones_like(var), var))))
    return be.reciprocal(xp.sqrt(var + eps))


def effective_gamma(be: Backend, norm: Norm, gamma: Array, dt: Any) -> Array:
    """gamma in the stats dtype, or ones under ``fix_gamma`` (MXNet: gamma is ignored)."""
    if norm.fix_gamma:
        return be.xp.ones_like(be.xp.astype(gamma, dt, copy=False))
    return be.xp.astype(gamma, dt, copy=False)


def _normalize(
    be: Backend, norm: Norm, lay: Layout, x: Array, gamma: Array, beta: Array, mean: Array, s: Array,
    r: Array | None = None, d: Array | None = None,
) -> Array:
    """``y = x * scale + shift`` with ``scale = gamma * s`` and ``shift = beta - mean * scale``; under batch
    renormalisation ``scale = gamma * r * s`` and ``shift = beta + gamma * d - mean * scale``."""
    xp = be.xp
    g = effective_gamma(be, norm, gamma, mean.dtype)
    scale = g * s if r is None else g * r * s
    shift = xp.astype(beta, scale.dtype, copy=False) - mean * scale
    if d is not None:
        shift = shift + g * d
    return be.scale_shift(x, xp.reshape(scale, lay.bshape), xp.reshape(shift, lay.bshape))


def _affine_map(be: Backend, lay: Layout, u: Array, x: Array, mean: Array, a: Array, b: Array, c: Array,
                mask: Array | None = None) -> Array:
    """``a * u + b * (x - mean) + c`` per channel, where ``mask`` is True (everywhere without one), and
    ``a * u`` elsewhere: the shape of every derivative of BN."""
    xp = be.xp
    a, b, c = (xp.reshape(v, lay.bshape) for v in (a, b, c))
    full = be.backward_apply(u, x, xp.reshape(mean, lay.bshape), a, b, c)
    if mask is None:
        return full
    return xp.where(mask, full, be.scale_shift(u, a, xp.zeros_like(a)))


def _zeros_if_none(be: Backend, t: Array | None, like: Array) -> Array:
    return be.xp.zeros_like(like) if t is None else t


# ---- the two differentiable maps ----------------------------------------------------------------------------------
class Rule(NamedTuple):
    """One differentiable BN map, as every backend's autodiff hook wires it. Its functions hold no shape: the layout
    comes from ``x`` at each call, so one rule (and one op) serves every batch size and spatial size.

    * ``forward(sync, *inputs) -> outputs``; ``sync`` (a :class:`Sync`, or None) is the one argument that is not an
      array: a backend passes it through as a constant;
    * ``residuals(sync, inputs, outputs)``: what the derivatives need, from the inputs and the outputs numbered in
      ``kept`` (the others may be None), with per-channel work only, so that a backend may save just those inputs
      and outputs, and differentiate through them again;
    * ``backward(residuals, cotangents)``: the cotangents of the first ``n_diff`` inputs (VJP), one per output
      cotangent (None meaning zero);
    * ``jvp(residuals, tangents)``: the tangents of the outputs for tangents of the first ``n_diff`` inputs
      (None meaning zero). The one tangent rule: forward-mode AD, and reverse mode by transposition on JAX.
    """

    forward: Callable[..., tuple[Array, ...]]
    residuals: Callable[[Sync | None, tuple[Array, ...], tuple[Array, ...]], Any]
    backward: Callable[[Any, tuple[Array | None, ...]], tuple[Array, ...]]
    jvp: Callable[[Any, tuple[Array | None, ...]], tuple[Array, ...]]
    n_diff: int
    kept: tuple[int, ...]  # the outputs that ``residuals`` reads: a backend need not keep y alive for a backward


def train_rule(be: Backend, norm: Norm, axis: int, renorm: Renorm | None = None) -> Rule:
    """BN with batch statistics over every axis but ``axis``: inputs ``(x, gamma, beta[, mask])``, and with
    ``renorm`` also ``(renorm_mean, renorm_std)`` last; outputs ``(y, mean, m2)`` (all three differentiable: the
    running update reads ``mean`` and ``m2``)."""
    return Rule(partial(train_forward, be, norm, axis, renorm=renorm),
                partial(train_residuals, be, norm, axis, renorm=renorm),
                partial(train_backward, be, norm), partial(train_jvp, be, norm), 3, (1, 2))


def eval_rule(be: Backend, norm: Norm, axis: int) -> Rule:
    """BN with the running statistics: inputs ``(x, gamma, beta, running_mean, running_var)``, output ``(y,)``;
    all five inputs are differentiable (an affine map of each)."""
    return Rule(partial(eval_forward, be, norm, axis), partial(eval_residuals, be, norm, axis),
                partial(eval_backward, be, norm), partial(eval_jvp, be, norm), 5, ())


# ---- training: batch statistics ----------------------------------------------------------------------------
class TrainResiduals(NamedTuple):
    x: Array
    gamma: Array
    mean: Array
    s: Array  # 1 / sqrt(var + eps), per channel
    count: Any  # n, the (global) count per channel: an int, or an array under a mask
    mask: Array | None
    lay: Layout
    sync: Sync | None
    r: Array | None  # batch renormalisation's corrections (None without it)
    d: Array | None


def _train_inputs(renorm: Renorm | None, inputs: tuple[Array, ...]) -> tuple[Array | None, tuple[Array, ...]]:
    """``(mask, (renorm_mean, renorm_std))`` from the inputs after ``(x, gamma, beta)``."""
    rest = inputs[3:]
    stats = () if renorm is None else rest[-2:]
    rest = rest if renorm is None else rest[:-2]
    return (rest[0] if rest else None), stats


def _corrections(be: Backend, norm: Norm, renorm: Renorm | None, renorm_stats: tuple[Array, ...], mean: Array,
                 m2: Array, n: Any) -> tuple[Array | None, Array | None]:
    """Batch renormalisation's ``(r, d)`` (None, None without it); an empty channel gets ``r = 1, d = 0``."""
    if renorm is None:
        return None, None
    r, d = renorm_corrections(be, norm, renorm, mean, _per_count(be, m2, n), *renorm_stats)
    if per_channel_counts(be, n):
        r = be.xp.where(n > 0, r, be.xp.ones_like(r))
        d = be.xp.where(n > 0, d, be.xp.zeros_like(d))
    return r, d


def train_forward(
    be: Backend, norm: Norm, axis: int, sync: Sync | None, x: Array, gamma: Array, beta: Array, *rest: Array,
    renorm: Renorm | None = None,
) -> tuple[Array, Array, Array]:
    """``(y, mean, m2)`` for BN with batch statistics (of all replicas under ``sync``; of the elements where
    ``mask`` is True, every element being normalised); with ``renorm``, corrected by ``r`` and ``d``."""
    mask, renorm_stats = _train_inputs(renorm, (x, gamma, beta, *rest))
    lay = Layout.of(x.shape, axis)
    st = batch_stats(be, x, lay, sync, mask)
    s = _inv_std_of(be, norm, st.m2, st.count)
    r, d = _corrections(be, norm, renorm, renorm_stats, st.mean, st.m2, st.count)
    return _normalize(be, norm, lay, x, gamma, beta, st.mean, s, r, d), st.mean, st.m2


def _inv_std_of(be: Backend, norm: Norm, m2: Array, n: Any) -> Array:
    """``s`` from ``M2`` and the count; 0 for an empty channel (its output is beta)."""
    if not per_channel_counts(be, n):
        if n == 0:
            return be.xp.zeros_like(m2)
        return inv_std(be, m2 / _scalar(n), norm.eps, norm.zero_var_guard)
    s = inv_std(be, m2 / _nonzero(be, n), norm.eps, norm.zero_var_guard)
    return be.xp.where(n > 0, s, be.xp.zeros_like(s))


def train_residuals(
    be: Backend, norm: Norm, axis: int, sync: Sync | None, inputs: tuple[Array, ...], outputs: tuple[Array, ...],
    *, renorm: Renorm | None = None,
) -> TrainResiduals:
    """What the derivatives need: ``s`` from ``M2`` and the count (recounted from the mask, if any), and batch
    renormalisation's ``r`` and ``d``."""
    x, gamma = inputs[0], inputs[1]
    mask, renorm_stats = _train_inputs(renorm, inputs)
    _, mean, m2 = outputs
    lay = Layout.of(x.shape, axis)
    if mask is None:
        n = lay.count if sync is None else sync.count
    else:
        n = mask_count(be, lay, mask, mean.dtype)
        if sync is not None:
            n = be.all_reduce_sum(n, sync.group)
    r, d = _corrections(be, norm, renorm, renorm_stats, mean, m2, n)
    return TrainResiduals(x, gamma, mean, _inv_std_of(be, norm, m2, n), n, mask, lay, sync, r, d)


def _all_reduce(be: Backend, sync: Sync | None, *vs: Array) -> tuple[Array, ...]:
    """The per-channel vectors ``vs`` summed over the replicas (as they are without ``sync``), in one call."""
    if sync is None:
        return vs
    both = be.all_reduce_sum(be.xp.stack(vs), sync.group)
    return tuple(both[i] for i in range(len(vs)))


def train_jvp(
    be: Backend, norm: Norm, res: TrainResiduals, tangents: tuple[Array | None, ...]
) -> tuple[Array, Array, Array]:
    """Tangents ``(ty, tmean, tm2)`` for tangents ``(tx, tgamma, tbeta)``. With ``S1 = sum_R m tx`` and
    ``S2 = sum_R m tx (x - mean)`` (``m`` the mask, 1 without one; summed over the replicas under ``sync``):
    ``tmean = S1 / n``, ``tm2 = 2 S2``, ``ty = a tx + b (x - mean) + c`` with ``a = gamma s``,
    ``b = tgamma s - gamma s^3 S2 / n``, ``c = tbeta - gamma s S1 / n``. Under batch renormalisation (``r``,
    ``d`` constants) ``gamma r`` stands for ``gamma``, ``tgamma r`` for ``tgamma``, and ``c`` gains ``tgamma d``."""
    xp = be.xp
    x, gamma, mean, s, n, mask, lay, sync, r, d = res
    tx, tg, tb = (_zeros_if_none(be, t, p) for t, p in zip(tangents, (x, gamma, gamma), strict=True))
    # once: every use of tx, and so its transpose (dx), accumulates in the stats dtype
    tx = xp.astype(tx, s.dtype, copy=False)
    txm = tx if mask is None else xp.where(mask, tx, xp.zeros_like(tx))
    s1, s2 = _all_reduce(be, sync, *be.backward_sums(txm, x, xp.reshape(mean, lay.bshape), lay.reduce_axes))
    g = effective_gamma(be, norm, gamma, mean.dtype)
    tg = xp.zeros_like(s) if norm.fix_gamma else xp.astype(tg, s.dtype, copy=False)
    c = xp.astype(tb, s.dtype, copy=False)
    if r is not None:
        g, c, tg = g * r, c + tg * d, tg * r
    a = g * s
    tmean = _per_count(be, s1, n)
    b = tg * s - (a * s * s) * _per_count(be, s2, n)
    c = c - a * tmean
    ty = xp.astype(_affine_map(be, lay, tx, x, mean, a, b, c), x.dtype, copy=False)
    return ty, tmean, 2 * s2


def train_backward(
    be: Backend, norm: Norm, res: TrainResiduals, cotangents: tuple[Array | None, ...]
) -> tuple[Array, Array, Array]:
    """``(dx, dgamma, dbeta)`` for cotangents ``(dy, dmean, dm2)``: the transpose of :func:`train_jvp`.

    With ``T1 = sum_R dy``, ``T2 = sum_R dy (x - mean)`` (over every element, summed over the replicas under
    ``sync``): ``dx = a dy + m (b (x - mean) + c)`` with ``a = gamma s``, ``b = 2 dm2 - gamma s^3 T2 / n``,
    ``c = (dmean - gamma s T1) / n``; ``dgamma = s T2``, ``dbeta = T1`` (this replica's sums: the data-parallel
    gradient reduction combines them). The textbook form: ``dx = gamma s (dy - mean(dy) - xhat mean(dy xhat))``.
    Under batch renormalisation (``r``, ``d`` constants): ``gamma r`` stands for ``gamma``, and
    ``dgamma = r s T2 + d T1``.
    """
    xp = be.xp
    x, gamma, mean, s, n, mask, lay, sync, r, d = res
    dy, dmean, dm2 = cotangents
    dy = _zeros_if_none(be, dy, x)
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, xp.reshape(mean, lay.bshape), lay.reduce_axes)
    extra = tuple(v for v in (dmean, dm2) if v is not None)
    all_dy, all_dy_xc, *extra = _all_reduce(be, sync, sum_dy, sum_dy_xc, *extra)
    it = iter(extra)
    dmean = next(it) if dmean is not None else None
    dm2 = next(it) if dm2 is not None else None
    g = effective_gamma(be, norm, gamma, mean.dtype)
    a = g * s if r is None else g * r * s
    b = -(a * s * s) * _per_count(be, all_dy_xc, n)
    c = -a * all_dy
    if dm2 is not None:
        b = b + 2 * dm2
    if dmean is not None:
        c = c + dmean
    dx = _affine_map(be, lay, dy, x, mean, a, b, _per_count(be, c, n), mask)
    if norm.fix_gamma:
        dgamma = xp.zeros_like(sum_dy)
    else:
        dgamma = sum_dy_xc * s if r is None else sum_dy_xc * s * r + sum_dy * d
    return dx, xp.astype(dgamma, gamma.dtype, copy=False), xp.astype(sum_dy, gamma.dtype, copy=False)


# ---- eval: running statistics ---------------------------------------------------------------------------------
class EvalResiduals(NamedTuple):
    x: Array
    gamma: Array
    mean: Array  # the running mean, in the stats dtype
    s: Array  # 1 / sqrt(running_var + eps)
    running_mean: Array
    running_var: Array
    lay: Layout


def eval_forward(
    be: Backend, norm: Norm, axis: int, sync: None, x: Array, gamma: Array, beta: Array, rmean: Array, rvar: Array
) -> tuple[Array]:
    """``(y,)`` for BN with the running statistics (no zero-variance guard, as everywhere)."""
    res = eval_residuals(be, norm, axis, sync, (x, gamma, beta, rmean, rvar), ())
    return (_normalize(be, norm, res.lay, x, gamma, beta, res.mean, res.s),)


def eval_residuals(
    be: Backend, norm: Norm, axis: int, sync: None, inputs: tuple[Array, ...], outputs: tuple[Array, ...]
) -> EvalResiduals:
    x, gamma, _, rmean, rvar = inputs
    dt = be.dtype(stats_dtype(be, x))
    s = inv_std(be, be.xp.astype(rvar, dt, copy=False), norm.eps, guard=False)
    return EvalResiduals(x, gamma, be.xp.astype(rmean, dt, copy=False), s, rmean, rvar, Layout.of(x.shape, axis))


def eval_jvp(be: Backend, norm: Norm, res: EvalResiduals, tangents: tuple[Array | None, ...]) -> tuple[Array]:
    """``(ty,)`` for tangents of ``(x, gamma, beta, running_mean, running_var)``:
    ``ty = a tx + b (x - mean) + c`` with ``a = gamma s``, ``b = tgamma s - gamma s^3 tvar / 2``,
    ``c = tbeta - gamma s tmean``."""
    xp = be.xp
    x, gamma, mean, s, rmean, rvar, lay = res
    tx, tg, tb, tm, tv = (_zeros_if_none(be, t, p) for t, p in zip(tangents, (x, gamma, gamma, rmean, rvar),
                                                                    strict=True))
    tx = xp.astype(tx, s.dtype, copy=False)
    a = effective_gamma(be, norm, gamma, mean.dtype) * s
    tg = xp.zeros_like(s) if norm.fix_gamma else xp.astype(tg, s.dtype, copy=False)
    b = tg * s - (a * s * s) * xp.astype(tv, s.dtype, copy=False) / 2
    c = xp.astype(tb, s.dtype, copy=False) - a * xp.astype(tm, s.dtype, copy=False)
    return (xp.astype(_affine_map(be, lay, tx, x, mean, a, b, c), x.dtype, copy=False),)


def eval_backward(
    be: Backend, norm: Norm, res: EvalResiduals, cotangents: tuple[Array | None, ...]
) -> tuple[Array, Array, Array, Array, Array]:
    """``(dx, dgamma, dbeta, drunning_mean, drunning_var)``, the transpose of :func:`eval_jvp`: with
    ``T1 = sum_R dy``, ``T2 = sum_R dy (x - mean)``: ``dx = dy gamma s`` (finite wherever dy is, whatever x holds),
    ``dgamma = s T2``, ``dbeta = T1``, ``dmean = -gamma s T1``, ``dvar = -gamma s^3 T2 / 2`` (0 for an empty
    batch)."""
    xp = be.xp
    x, gamma, mean, s, rmean, rvar, lay = res
    dy = _zeros_if_none(be, cotangents[0], x)
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, xp.reshape(mean, lay.bshape), lay.reduce_axes)
    a = effective_gamma(be, norm, gamma, mean.dtype) * s
    dx = be.scale_shift(dy, xp.reshape(a, lay.bshape), xp.reshape(xp.zeros_like(a), lay.bshape))
    if lay.count == 0:
        zero = xp.zeros_like(sum_dy)
        dgamma, dmean, dvar = zero, zero, zero
    else:
        dgamma = xp.zeros_like(sum_dy) if norm.fix_gamma else sum_dy_xc * s
        dmean = -a * sum_dy
        dvar = -(a * s * s) * sum_dy_xc / 2
    return (dx, xp.astype(dgamma, gamma.dtype, copy=False), xp.astype(sum_dy, gamma.dtype, copy=False),
            xp.astype(dmean, rmean.dtype, copy=False), xp.astype(dvar, rvar.dtype, copy=False))


# ---- running statistics ---------------------------------------------------------------------------------------
def update_state(be: Backend, conv: Convention, state: BNState | RenormState, st: Stats,
                 renorm_momentum: float = 0.99) -> BNState | RenormState:
    """The state after one training batch with statistics ``st``.

    ``t = num_batches_tracked + 1``; ``stat_var = M2 / (n - 1)`` (unbiased conventions) or ``M2 / n``;
    ``R <- keep * R + take * stat`` with ``(keep, take)`` from the convention, or ``take = 1 / t`` for the
    cumulative average. An empty batch changes no statistic (and counts only if the convention says so). Under a
    mask (per-channel counts) the same holds per channel: an empty channel keeps its statistics, a channel with
    one value keeps its unbiased variance, and the batch counts if any channel was not empty.

    A :class:`~multibn.state.RenormState` (batch renormalisation, Keras's rules): the running standard deviation
    moves instead of the variance, ``running_std <- keep * running_std + take * sqrt(stat_var + eps)``, and
    ``running_var = max(running_std^2 - eps, 0)``; ``renorm_mean`` and ``renorm_std`` move towards the batch's
    ``mean`` and ``sqrt(M2 / n + eps)`` with ``renorm_momentum`` weighing the old value.
    """
    xp = be.xp
    renorm = isinstance(state, RenormState)
    rmean, rvar, tracked = state[:3]
    t = tracked + 1
    n = st.count
    per_channel = per_channel_counts(be, n)
    if not per_channel and n == 0:
        return state._replace(num_batches_tracked=t if conv.count_empty_batches else tracked)
    dt = st.mean.dtype
    if per_channel:
        var = st.m2 / _nonzero(be, n - 1 if conv.unbiased_running_var else n)
    else:
        var = st.m2 / _scalar(n - 1 if conv.unbiased_running_var else n)
    weights = conv.update_weights()
    if weights is None:
        take = 1 / xp.astype(t, dt, copy=False)
        keep = 1 - take
    else:
        keep, take = weights
    var_seen = n > (1 if conv.unbiased_running_var else 0) if per_channel else None

    def moved(old: Array, stat: Array, keep: Any, take: Any, seen: Array | None) -> Array:
        old = xp.astype(old, dt, copy=False)
        new = be.blend(keep, old, take, stat)
        return new if seen is None else xp.where(seen, new, old)

    seen = n > 0 if per_channel else None
    new_mean = moved(rmean, st.mean, keep, take, seen)
    if per_channel and not conv.count_empty_batches:
        t = xp.where(xp.any(n > 0), t, tracked)
    if not renorm:
        new_var = moved(rvar, var, keep, take, var_seen)
        return BNState(xp.astype(new_mean, rmean.dtype, copy=False), xp.astype(new_var, rvar.dtype, copy=False), t)
    eps = conv.eps
    new_std = moved(state.running_std, xp.sqrt(var + eps), keep, take, var_seen)
    new_var = xp.where(var_seen, xp.clip(new_std * new_std - eps, min=0.0), xp.astype(rvar, dt, copy=False)) \
        if per_channel else xp.clip(new_std * new_std - eps, min=0.0)
    batch_std = xp.sqrt(_per_count(be, st.m2, n) + eps)
    m = float(renorm_momentum)
    return RenormState(
        xp.astype(new_mean, rmean.dtype, copy=False), xp.astype(new_var, rvar.dtype, copy=False), t,
        xp.astype(new_std, state.running_std.dtype, copy=False),
        xp.astype(moved(state.renorm_mean, st.mean, m, 1.0 - m, seen), state.renorm_mean.dtype, copy=False),
        xp.astype(moved(state.renorm_std, batch_std, m, 1.0 - m, seen), state.renorm_std.dtype, copy=False),
    )
