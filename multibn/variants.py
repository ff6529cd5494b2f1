"""The BN variants' arguments and views: batch renormalisation's clipping, and ghost batch norm as plain BN of a
rearranged view of ``x`` (so that the one algorithm, its kernels and its derivatives serve it unchanged).

Ghost batch norm (Hoffer et al., 2017) with virtual batch size ``k`` normalises each of the ``G = N / k``
sub-batches along the batch axis (axis 0) with its own statistics. The view puts the sub-batch index beside the
channel axis and merges the two: ``x`` of shape ``(N, ..., C, ...)`` becomes ``(k, ..., G * C, ...)``, whose
channel ``g * C + c`` is channel ``c`` of sub-batch ``g``; gamma and beta repeat ``G`` times. The running
statistics move once per call with the mean over the sub-batches of their means and of their variances (TF Keras
2's ``virtual_batch_size`` rule), under the convention's running-variance rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .algorithm import Renorm, Stats
from .backends.base import Array, Backend

RENORM_KEYS = ("rmin", "rmax", "dmax")


def parse_renorm(renorm: object) -> Renorm | None:
    """``renorm=`` as a :class:`~multibn.algorithm.Renorm` (None or False: no renormalisation; a dict with keys among
    ``rmin``, ``rmax``, ``dmax``, as Keras's ``renorm_clipping``, missing keys unclipped)."""
    if renorm is None or renorm is False:
        return None
    if not isinstance(renorm, dict):
        raise TypeError(f"renorm must be None or a dict with keys among {', '.join(RENORM_KEYS)} (Keras's "
                        f"renorm_clipping; {{}} for no clipping), got {type(renorm).__name__} {renorm!r}")
    unknown = sorted(set(renorm) - set(RENORM_KEYS))
    if unknown:
        raise ValueError(f"renorm has unknown keys {unknown}; the keys are {', '.join(RENORM_KEYS)}")
    values = {}
    for k, v in renorm.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"renorm[{k!r}] must be a finite number or None, got {v!r}")
        values[k] = float(v)
    if "rmin" in values and "rmax" in values and values["rmax"] < values["rmin"]:
        raise ValueError(f"renorm: rmax ({values['rmax']}) must be >= rmin ({values['rmin']})")
    if values.get("dmax", 0.0) < 0:
        raise ValueError(f"renorm['dmax'] must be >= 0, got {values['dmax']}")
    return Renorm(values.get("rmin"), values.get("rmax"), values.get("dmax"))


def check_renorm_momentum(m: object) -> float:
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= float(m) <= 1.0:
        raise ValueError(f"renorm_momentum must be a float in [0, 1], got {m!r}")
    return float(m)


def check_virtual_batch_size(k: object) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"virtual_batch_size must be None or a positive int, got {k!r}")
    return k


class GhostView(NamedTuple):
    """How ``x`` of ``shape`` is seen for ghost BN: ``groups`` sub-batches, the channel axis ``axis``."""

    shape: tuple[int, ...]
    axis: int
    groups: int

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int, k: int) -> GhostView:
        if shape[0] % k:
            raise ValueError(f"virtual_batch_size={k} must divide the batch size, x.shape[0] = {shape[0]} "
                             f"(x of shape {tuple(shape)})")
        return cls(tuple(shape), axis, shape[0] // k)

    def _split(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The split shape ``(G, k, *rest)`` and the permutation that puts ``G`` just before the channel axis."""
        split = (self.groups, self.shape[0] // self.groups, *self.shape[1:])
        perm = (*range(1, self.axis + 1), 0, *range(self.axis + 1, len(split)))
        return split, perm

    def to_view(self, be: Backend, a: Array) -> Array:
        """``(N, ..., C, ...)`` -> ``(k, ..., G * C, ...)``."""
        split, perm = self._split()
        moved = be.xp.permute_dims(be.xp.reshape(a, split), perm)
        shape = tuple(moved.shape)
        return be.xp.reshape(moved, (*shape[:self.axis], self.groups * shape[self.axis + 1], *shape[self.axis + 2:]))

    def from_view(self, be: Backend, a: Array) -> Array:
        """The inverse of :meth:`to_view`."""
        split, perm = self._split()
        moved_shape = tuple(split[i] for i in perm)
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        return be.xp.reshape(be.xp.permute_dims(be.xp.reshape(a, moved_shape), inverse), self.shape)

    def repeat(self, be: Backend, v: Array) -> Array:
        """A per-channel vector repeated for every sub-batch."""
        return be.xp.concat([v] * self.groups)

    def fold(self, be: Backend, v: Array) -> Array:
        """A per-(sub-batch, channel) vector summed over the sub-batches."""
        return be.xp.sum(be.xp.reshape(v, (self.groups, -1)), axis=(0,))

    def averaged(self, be: Backend, st: Stats) -> Stats:
        """The sub-batches' statistics as one summary whose mean and stored variance are the mean over the
        sub-batches of theirs (every sub-batch has the same count)."""
        return Stats(st.count, self.fold(be, st.mean) / self.groups, self.fold(be, st.m2) / self.groups)


def combinations_refused(renorm: Renorm | None, k: int | None, masked: bool, synced: bool) -> str | None:
    """Why this combination of the variants with ``mask=``/``sync=`` is refused, or None."""
    if k is not None and renorm is not None:
        return "virtual_batch_size with renorm (ghost batch renormalisation is not defined here)"
    if k is not None and masked:
        return "virtual_batch_size with mask= (sub-batches of unequal counts have no agreed running update)"
    if k is not None and synced:
        return "virtual_batch_size with sync= (ghost sub-batches are local to each replica: pass sync=None)"
    return None
