"""The one batch-norm algorithm, written once for every backend.

Notation, per channel c, with R the reduced axes (all but the channel axis) and n = |R|:

* statistics, as a mergeable summary (n, mean, M2) by the two-pass method:
  ``mean = sum_R x / n``, ``M2 = sum_R (x - mean)^2``; batch variance ``var = M2 / n`` (biased);
  synchronised BN merges the replicas' summaries exactly (:func:`merge_stats`) and all-reduces the two
  backward sums;
* normalisation, one pass: ``y = x * scale + shift`` with ``s = 1 / sqrt(var + eps)``, ``scale = gamma * s``,
  ``shift = beta - mean * scale``; the zero-variance guard sets ``s = 0`` where ``var == 0`` and ``eps == 0``;
* running update: ``R <- keep * R + take * stat`` with the stored variance ``M2 / n`` or ``M2 / (n - 1)``;
* backward (training), with ``xhat = (x - mean) * s``:
  ``dbeta = sum_R dy``, ``dgamma = sum_R dy * xhat``,
  ``dx = gamma * s * (dy - mean_R(dy) - xhat * mean_R(dy * xhat))``;
  (eval) ``dx = dy * scale``, ``dgamma = sum_R dy * (x - running_mean) * s``.

Statistics are computed in ``promote(x.dtype, float32)``; ``y`` and ``dx`` keep the dtype of ``x``.
Everything here is pure: inputs are never written to. The full-size passes go through the adapter's five
kernels (:class:`multibn.backends.base.Backend`); the rest is array-API code on per-channel vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .backends.base import Array, Backend
from .conventions import Convention
from .state import BNState


class Layout(NamedTuple):
    """Where the channels are in ``x``: which axes are reduced and how per-channel vectors broadcast."""

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


class Stats(NamedTuple):
    """A mergeable per-channel summary: ``count`` elements, their ``mean`` and ``m2 = sum (x - mean)^2``."""

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


def batch_stats(be: Backend, x: Array, lay: Layout, sync: Sync | None = None) -> Stats:
    """Two-pass per-channel statistics of ``x`` (an empty batch gives zeros); under ``sync``, of the whole
    batch across replicas, merged from every replica's summary."""
    dt = be.dtype(stats_dtype(be, x))
    if lay.count == 0:
        zeros = be.xp.zeros((lay.channels,), dtype=dt, device=be.device_of(x))
        local = Stats(0, zeros, zeros)
    else:
        mean = be.channel_sum(x, lay.reduce_axes, dt) / lay.count
        local = Stats(lay.count, mean, be.channel_sq_dev_sum(x, be.xp.reshape(mean, lay.bshape), lay.reduce_axes))
    if sync is None:
        return local
    return merge_stats(local, sync.count, lambda a: be.all_reduce_sum(a, sync.group))


def merge_stats(part: Stats, total: int, reduce_sum: Callable[[Array], Array]) -> Stats:
    """The exact statistics of the concatenation of several parts, ``part`` being one of them, by Chan et
    al.'s count-weighted merge: ``n = sum n_k``, ``mean = sum (n_k / n) mean_k``,
    ``M2 = sum (M2_k + n_k (mean_k - mean)^2)``. ``reduce_sum`` sums over the parts (an all-reduce across
    replicas, or a sum over a leading axis); ``total`` is ``n``. Parts with ``n_k = 0`` contribute nothing.
    """
    if total == 0:
        return Stats(0, part.mean, part.m2)
    mean = reduce_sum(part.mean * (part.count / total))
    d = part.mean - mean
    return Stats(total, mean, reduce_sum(part.m2 + d * d * part.count))


def inv_std(be: Backend, var: Array, eps: float, guard: bool) -> Array:
    """``1 / sqrt(var + eps)``; with the guard and ``eps == 0``, 0 where ``var == 0`` (PyTorch, MXNet)."""
    xp = be.xp
    if guard and eps == 0.0:
        zero = var == 0
        return xp.where(zero, xp.zeros_like(var), 1 / xp.sqrt(xp.where(zero, xp.ones_like(var), var)))
    return 1 / xp.sqrt(var + eps)


def effective_gamma(be: Backend, conv: Convention, gamma: Array, dt: Any) -> Array:
    """gamma in the stats dtype, or ones under ``fix_gamma`` (MXNet: gamma is ignored)."""
    if conv.fix_gamma:
        return be.xp.ones_like(be.xp.astype(gamma, dt))
    return be.xp.astype(gamma, dt)


def _normalize(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, beta: Array, mean: Array, s: Array
) -> Array:
    """``y = x * scale + shift`` with ``scale = gamma * s`` and ``shift = beta - mean * scale``."""
    xp = be.xp
    scale = effective_gamma(be, conv, gamma, mean.dtype) * s
    shift = xp.astype(beta, scale.dtype) - mean * scale
    return be.scale_shift(x, xp.reshape(scale, lay.bshape), xp.reshape(shift, lay.bshape))


# ---- training: batch statistics ----------------------------------------------------------------------------
def train_residuals(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, *, sync: Sync | None = None
) -> tuple[Array, ...]:
    """``(x, gamma, mean, s, m2)``: what the training forward computes and its backward reuses."""
    st = batch_stats(be, x, lay, sync)
    if st.count == 0:
        s = be.xp.zeros_like(st.mean)
    else:
        s = inv_std(be, st.m2 / st.count, conv.eps, conv.zero_var_guard)
    return x, gamma, st.mean, s, st.m2


def train_forward(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, beta: Array, *, sync: Sync | None = None
) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    """``(y, mean, m2), residuals`` for BN with batch statistics (of all replicas under ``sync``)."""
    residuals = train_residuals(be, conv, lay, x, gamma, sync=sync)
    _, _, mean, s, m2 = residuals
    return (_normalize(be, conv, lay, x, gamma, beta, mean, s), mean, m2), residuals


def train_backward(
    be: Backend, conv: Convention, lay: Layout, residuals: tuple[Array, ...], dy: Array, *, sync: Sync | None = None
) -> tuple[Array, Array, Array]:
    """``(dx, dgamma, dbeta)`` of :func:`train_forward`, from its saved mean and inverse std.

    Under ``sync`` the two sums in ``dx`` are all-reduced over the replicas (``n`` is the global count);
    ``dgamma``/``dbeta`` stay local, for the data-parallel gradient reduction to combine.
    """
    xp = be.xp
    x, gamma, mean, s, _ = residuals
    mean_b = xp.reshape(mean, lay.bshape)
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, mean_b, lay.reduce_axes)
    n, all_dy, all_dy_xc = lay.count, sum_dy, sum_dy_xc
    if sync is not None:
        n = sync.count
        both = be.all_reduce_sum(xp.stack([sum_dy, sum_dy_xc]), sync.group)
        all_dy, all_dy_xc = both[0], both[1]
    n = max(n, 1)
    g = effective_gamma(be, conv, gamma, mean.dtype)
    a = g * s
    b = -(a * s * s) * (all_dy_xc / n)
    c = -a * (all_dy / n)
    dx = be.backward_apply(dy, x, mean_b, *(xp.reshape(v, lay.bshape) for v in (a, b, c)))
    dgamma = xp.zeros_like(sum_dy) if conv.fix_gamma else sum_dy_xc * s
    return dx, xp.astype(dgamma, gamma.dtype), xp.astype(sum_dy, gamma.dtype)


def eval_residuals(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, rmean: Array, rvar: Array
) -> tuple[Array, ...]:
    """``(x, gamma, mean, s)`` from the running statistics (no zero-variance guard, as everywhere)."""
    dt = be.dtype(stats_dtype(be, x))
    s = inv_std(be, be.xp.astype(rvar, dt), conv.eps, guard=False)
    return x, gamma, be.xp.astype(rmean, dt), s


def eval_forward(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, beta: Array, rmean: Array, rvar: Array
) -> tuple[tuple[Array], tuple[Array, ...]]:
    """``(y,), residuals`` for BN with the running statistics."""
    residuals = eval_residuals(be, conv, lay, x, gamma, rmean, rvar)
    _, _, mean, s = residuals
    return (_normalize(be, conv, lay, x, gamma, beta, mean, s),), residuals


def eval_backward(
    be: Backend, conv: Convention, lay: Layout, residuals: tuple[Array, ...], dy: Array
) -> tuple[Array, Array, Array]:
    """``(dx, dgamma, dbeta)`` of :func:`eval_forward`: ``dx = dy * gamma * s`` (finite wherever dy is, whatever x
    holds), ``dgamma = sum_R dy * (x - mean) * s`` (0 for an empty batch)."""
    xp = be.xp
    x, gamma, mean, s = residuals
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, xp.reshape(mean, lay.bshape), lay.reduce_axes)
    a = effective_gamma(be, conv, gamma, mean.dtype) * s
    dx = be.scale_shift(dy, xp.reshape(a, lay.bshape), xp.reshape(xp.zeros_like(a), lay.bshape))
    dgamma = xp.zeros_like(sum_dy) if conv.fix_gamma or lay.count == 0 else sum_dy_xc * s
    return dx, xp.astype(dgamma, gamma.dtype), xp.astype(sum_dy, gamma.dtype)


# ---- running statistics ---------------------------------------------------------------------------------------
def update_state(be: Backend, conv: Convention, state: BNState, st: Stats) -> BNState:
    """The state after one training batch with statistics ``st``.

    ``t = num_batches_tracked + 1``; ``stat_var = M2 / (n - 1)`` (unbiased conventions) or ``M2 / n``;
    ``R <- keep * R + take * stat`` with ``(keep, take)`` from the convention, or ``take = 1 / t`` for the
    cumulative average. An empty batch changes no statistic (and counts only if the convention says so).
    """
    xp = be.xp
    rmean, rvar, tracked = state
    t = tracked + 1
    if st.count == 0:
        return BNState(rmean, rvar, t if conv.count_empty_batches else tracked)
    dt = st.mean.dtype
    var = st.m2 / (st.count - 1) if conv.unbiased_running_var else st.m2 / st.count
    weights = conv.update_weights()
    if weights is None:
        take = 1 / xp.astype(t, dt)
        keep = 1 - take
    else:
        keep, take = weights
    new_mean = take * st.mean + keep * xp.astype(rmean, dt)
    new_var = take * var + keep * xp.astype(rvar, dt)
    return BNState(xp.astype(new_mean, rmean.dtype), xp.astype(new_var, rvar.dtype), t)
