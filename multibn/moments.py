"""``ChannelMoments``: the exact per-channel mean and variance of many arrays, fed one at a time.

::

    m = multibn.ChannelMoments(axis=1)          # channels on axis 1, every other axis reduced
    for x in batches:                           # NumPy, PyTorch, JAX or MXNet arrays, any sizes
        m.partial_fit(x)                        # or m.update(x)
    m.count, m.mean, m.var(), m.var(ddof=1)     # as np.mean / np.var of the concatenation, per channel

Each array's summary ``(n, mean, M2)`` is computed by the two-pass method (:func:`multibn.algorithm.batch_stats`,
the statistics batch norm uses) and merged into the running one by Chan et al.'s count-weighted formula
(:func:`multibn.algorithm.merge_stats`, the merge of synchronised BN): ``n = n_a + n_b``,
``mean = (n_a mean_a + n_b mean_b) / n``, ``M2 = M2_a + M2_b + sum_k n_k (mean_k - mean)^2``. The result is the
mean and variance of the concatenated arrays up to rounding, whatever the split, in O(channels) memory; unlike
an average of per-array variances, it does not depend on how the data was split into arrays.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np

from .algorithm import Layout, Stats, batch_stats, merge_stats
from .backends import backend_name_of, get_backend
from .backends.base import FLOAT_DTYPES, Array

__all__ = ["ChannelMoments"]


class _Parts:
    """Several parts' per-channel arrays side by side, with elementwise ``+ - * /``: the "leading axis" over which
    :func:`merge_stats` sums (``sum`` below), without stacking arrays (MXNet's namespace has no ``stack``)."""

    def __init__(self, items: tuple[Any, ...]) -> None:
        self.items = items

    def _map(self, other: Any, op: Callable[[Any, Any], Any]) -> _Parts:
        others = other.items if isinstance(other, _Parts) else (other,) * len(self.items)
        return _Parts(tuple(op(a, b) for a, b in zip(self.items, others, strict=True)))

    def __add__(self, other: Any) -> _Parts:
        return self._map(other, operator.add)

    def __sub__(self, other: Any) -> _Parts:
        return self._map(other, operator.sub)

    def __mul__(self, other: Any) -> _Parts:
        return self._map(other, operator.mul)

    def __truediv__(self, other: Any) -> _Parts:
        return self._map(other, operator.truediv)

    def sum(self) -> Any:
        return reduce(operator.add, self.items)


def merge_summaries(*parts: Stats) -> Stats:
    """The exact summary of the concatenation of ``parts`` (same backend, dtype and channels) by
    :func:`multibn.algorithm.merge_stats`; parts with no elements are skipped."""
    nonempty = [p for p in parts if p.count > 0]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else parts[0]
    stacked = Stats(_Parts(tuple(p.count for p in nonempty)), _Parts(tuple(p.mean for p in nonempty)),
                    _Parts(tuple(p.m2 for p in nonempty)))
    return merge_stats(stacked, sum(p.count for p in nonempty), _Parts.sum)


def _narrower(dt: str, than: str) -> bool:
    """Whether the floating dtype ``dt`` holds fewer bits than ``than``."""
    return np.dtype("float16" if dt == "bfloat16" else dt).itemsize < np.dtype(than).itemsize and dt != than


def accumulator_dtype(backend: str, x: Array) -> str:
    """float64 where ``x``'s backend and device hold it: everywhere but JAX without ``jax_enable_x64`` and
    PyTorch on Apple's MPS; float32 there."""
    if backend == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    if backend == "torch" and x.device.type == "mps":
        return "float32"
    return "float64"


class ChannelMoments:
    """Streaming per-channel count, mean and variance over arrays of any backend, exact under any split.

    Args:
        axis: the channel axis; every other axis is reduced (as in batch norm and ``np.var(x, axis=...)`` over
            the others). Negative values count from the end.
        dtype: the dtype of the accumulated mean and M2: ``"float64"`` or ``"float32"``; None (default) is
            float64 wherever the backend and device hold it (not JAX without ``jax_enable_x64``, not MPS).

    ``partial_fit(x)`` (alias ``update``) adds an array; the first one fixes the backend, the device and the
    number of channels, later ones must match. Arrays narrower than the accumulator dtype (integers, booleans,
    float32 and narrower under a float64 accumulator) are converted to it first, so that each array's summary
    holds its exact mean: the result is then that of the float64 concatenation whatever the split, also for data
    whose mean is large against its spread; float64 arrays under a float32 accumulator are summarised in float64.
    ``merge(other)`` adds another ``ChannelMoments`` (or an :class:`multibn.algorithm.Stats` summary), so that
    moments gathered separately, on several workers say, combine exactly. The results are arrays of the input's backend:

    * ``count``: elements per channel seen so far (an int);
    * ``mean``: ``sum x / count``;
    * ``var(ddof=0)``: ``M2 / (count - ddof)`` with ``M2 = sum (x - mean)^2`` (``ddof=1``: the unbiased
      estimate); ``std(ddof=0)``: its square root.
    """

    def __init__(self, axis: int = 1, *, dtype: str | None = None) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
        if dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}")
        self.axis = axis
        self.dtype = dtype
        self._backend: str | None = None
        self._stats: Stats | None = None

    def __repr__(self) -> str:
        where = "" if self._stats is None else f", backend={self._backend!r}, channels={self.num_features}"
        return f"ChannelMoments(axis={self.axis}, count={self.count}{where})"

    # ---- feeding ----------------------------------------------------------------------------------------------
    def partial_fit(self, x: Any) -> ChannelMoments:
        """Add the elements of ``x`` (an array of any backend, or anything ``np.asarray`` takes); returns self."""
        if isinstance(x, np.ma.MaskedArray):  # its mask would be ignored
            raise TypeError("x is a numpy.ma.MaskedArray: ChannelMoments has no mask; pass the kept elements, e.g. "
                            "one array per channel group, or np.ma.getdata(x) where nothing is masked")
        name = backend_name_of(x)
        if name is None:
            x, name = np.asarray(x), "numpy"
        be = get_backend(name)
        if x.ndim == 0:
            raise ValueError(f"x must have at least one dimension (the channel axis {self.axis}), got a scalar")
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis {self.axis} is out of range for x of shape {tuple(x.shape)}")
        dtype = self._dtype_for(name, x)
        with be.untracked():  # statistics, not part of any autodiff graph (torch, MXNet)
            if be.dtype_name(x) not in FLOAT_DTYPES or _narrower(be.dtype_name(x), dtype):
                # summarised in the accumulator dtype: a float32 batch mean would be rounded to float32 before the
                # float64 merge, an error of ulp(mean) / 2 each (1e-3 at mean 1e4), which the merge's
                # n_k (mean_k - mean)^2 turns into a variance error that depends on the split
                x = be.xp.astype(x, be.dtype(dtype))
            st = batch_stats(be, x, Layout.of(tuple(x.shape), self.axis))
            st = Stats(st.count, *(be.xp.astype(a, be.dtype(dtype)) for a in (st.mean, st.m2)))
            return self._add(name, st)

    update = partial_fit

    def merge(self, other: ChannelMoments | Stats) -> ChannelMoments:
        """Add what ``other`` has seen (a ``ChannelMoments`` or a ``Stats(count, mean, m2)`` summary of the same
        backend and number of channels); ``other`` is unchanged. Returns self."""
        if isinstance(other, ChannelMoments):
            if other._stats is None:
                return self
            return self._add(other._backend, other._stats)
        if not isinstance(other, Stats):
            raise TypeError(f"other must be a ChannelMoments or a multibn.algorithm.Stats, got {type(other).__name__}")
        name = backend_name_of(other.mean)
        if name is None:
            raise TypeError(f"other.mean must be an array of an installed backend, got {type(other.mean).__name__}")
        if isinstance(other.count, bool) or not isinstance(other.count, (int, np.integer)) or other.count < 0:
            raise ValueError(f"other.count must be a non-negative int, got {other.count!r}")
        be = get_backend(name)
        dt = be.dtype(self._dtype_for(name, other.mean))
        with be.untracked():
            return self._add(name, Stats(int(other.count), be.xp.astype(other.mean, dt), be.xp.astype(other.m2, dt)))

    def _dtype_for(self, name: str, x: Array) -> str:
        return self.dtype or accumulator_dtype(name, x)

    def _add(self, name: str, st: Stats) -> ChannelMoments:
        if self._stats is None:
            self._backend, self._stats = name, st
            return self
        if name != self._backend:
            raise TypeError(f"x is a {name} array, but this ChannelMoments holds {self._backend} arrays")
        if tuple(st.mean.shape) != tuple(self._stats.mean.shape):
            raise ValueError(
                f"x has {st.mean.shape[0]} channels along axis {self.axis}, but the arrays before had "
                f"{self._stats.mean.shape[0]}"
            )
        self._stats = merge_summaries(self._stats, st)
        return self

    # ---- results ----------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Elements per channel seen so far."""
        return 0 if self._stats is None else int(self._stats.count)

    @property
    def num_features(self) -> int | None:
        """Channels (None before the first array)."""
        return None if self._stats is None else int(self._stats.mean.shape[0])

    @property
    def stats(self) -> Stats:
        """The summary ``Stats(count, mean, m2)``; ValueError before the first array."""
        if self._stats is None:
            raise ValueError("ChannelMoments has seen no array yet: call partial_fit(x) first")
        return self._stats

    @property
    def mean(self) -> Array:
        """Per-channel mean (0 for channels of an all-empty input)."""
        return self.stats.mean

    def var(self, ddof: int = 0) -> Array:
        """``M2 / (count - ddof)``; ValueError when ``count <= ddof``."""
        st = self.stats
        if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
        if st.count <= ddof:
            raise ValueError(f"var(ddof={ddof}) needs more than {ddof} elements per channel, got {st.count}")
        return st.m2 / (st.count - ddof)

    def std(self, ddof: int = 0) -> Array:
        """``sqrt(var(ddof))``."""
        return get_backend(self._backend).xp.sqrt(self.var(ddof))
