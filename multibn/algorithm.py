"""The one batch-norm algorithm, written once for every backend.

Notation, per channel c, with R the reduced axes (all but the channel axis) and n = |R|:

* statistics, as a mergeable summary (n, mean, M2) by the two-pass method:
  ``mean = sum_R x / n``, ``M2 = sum_R (x - mean)^2``; batch variance ``var = M2 / n`` (biased);
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


def batch_stats(be: Backend, x: Array, lay: Layout) -> Stats:
    """Two-pass per-channel statistics of ``x`` (an empty batch gives zeros)."""
    dt = be.dtype(stats_dtype(be, x))
    if lay.count == 0:
        zeros = be.xp.zeros((lay.channels,), dtype=dt, device=be.device_of(x))
        return Stats(0, zeros, zeros)
    mean = be.channel_sum(x, lay.reduce_axes, dt) / lay.count
    m2 = be.channel_sq_dev_sum(x, be.xp.reshape(mean, lay.bshape), lay.reduce_axes)
    return Stats(lay.count, mean, m2)


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Chan's exact merge of two summaries: the statistics of the concatenated data.

    ``n = na + nb``, ``mean = ma + (mb - ma) * nb / n``, ``M2 = M2a + M2b + (mb - ma)^2 * na * nb / n``.
    An empty summary is the identity.
    """
    n = a.count + b.count
    delta = b.mean - a.mean
    w = b.count / n if n else 0.0
    return Stats(n, a.mean + delta * w, a.m2 + b.m2 + delta * delta * (a.count * w))


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
def train_residuals(be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array) -> tuple[Array, ...]:
    """``(x, gamma, mean, s, m2)``: what the training forward computes and its backward reuses."""
    st = batch_stats(be, x, lay)
    if lay.count == 0:
        s = be.xp.zeros_like(st.mean)
    else:
        s = inv_std(be, st.m2 / lay.count, conv.eps, conv.zero_var_guard)
    return x, gamma, st.mean, s, st.m2


def train_forward(
    be: Backend, conv: Convention, lay: Layout, x: Array, gamma: Array, beta: Array
) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    """``(y, mean, m2), residuals`` for BN with batch statistics."""
    residuals = train_residuals(be, conv, lay, x, gamma)
    _, _, mean, s, m2 = residuals
    return (_normalize(be, conv, lay, x, gamma, beta, mean, s), mean, m2), residuals


def train_backward(
    be: Backend, conv: Convention, lay: Layout, residuals: tuple[Array, ...], dy: Array
) -> tuple[Array, Array, Array]:
    """``(dx, dgamma, dbeta)`` of :func:`train_forward`, from its saved mean and inverse std."""
    xp = be.xp
    x, gamma, mean, s, _ = residuals
    n = max(lay.count, 1)
    mean_b = xp.reshape(mean, lay.bshape)
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, mean_b, lay.reduce_axes)
    g = effective_gamma(be, conv, gamma, mean.dtype)
    a = g * s
    b = -(a * s * s) * (sum_dy_xc / n)
    c = -a * (sum_dy / n)
    dx = be.backward_apply(dy, x, mean_b, *(xp.reshape(v, lay.bshape) for v in (a, b, c)))
    dgamma = xp.zeros_like(sum_dy) if conv.fix_gamma else sum_dy_xc * s
    return dx, xp.astype(dgamma, gamma.dtype), xp.astype(sum_dy, gamma.dtype)


# ---- eval: running statistics -------------------------------------------------------------------------------
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
    """``(dx, dgamma, dbeta)`` of :func:`eval_forward`: ``dx = dy * gamma * s``."""
    xp = be.xp
    x, gamma, mean, s = residuals
    mean_b = xp.reshape(mean, lay.bshape)
    sum_dy, sum_dy_xc = be.backward_sums(dy, x, mean_b, lay.reduce_axes)
    a = effective_gamma(be, conv, gamma, mean.dtype) * s
    zero = xp.zeros_like(a)
    dx = be.backward_apply(dy, x, mean_b, *(xp.reshape(v, lay.bshape) for v in (a, zero, zero)))
    dgamma = xp.zeros_like(sum_dy) if conv.fix_gamma else sum_dy_xc * s
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
