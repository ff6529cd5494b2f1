"""Streaming a full-size tensor in chunks: what the fast kernels of the adapters share (NumPy, torch, MXNet).

A kernel views ``x`` as ``(P, C, Q)``, its one kept (channel) axis in the middle (:func:`channel_view_shape`),
and works on chunks of rows along P of about a given number of elements (:func:`chunk_slices`), each time in
the same scratch buffer (:func:`chunks`), adding each chunk's per-channel sums to the total
(:func:`accumulate`). What each framework does inside a chunk, and how large a chunk is, stays in its adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Array = Any


def channel_view_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, int, int] | None:
    """``(P, C, Q)``: ``x`` seen with its one kept axis in the middle, when every other axis is reduced."""
    if len(axes) != len(shape) - 1:
        return None
    ax = next(i for i in range(len(shape)) if i not in axes)
    return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])


def chunk_slices(view_shape: Sequence[int], elements: int) -> tuple[int, list[slice]]:
    """Rows along P per chunk of about ``elements`` elements (at least one row), and the chunks' slices."""
    p, c, q = view_shape
    k = max(1, elements // max(1, c * q))
    return min(k, p), [slice(i, i + k) for i in range(0, p, k)]


def scratch(view_shape: Sequence[int], elements: int, empty: Callable[[tuple[int, ...]], Array]) -> Array:
    """A scratch buffer ``empty(shape)`` for one chunk (of about ``elements`` elements) of a (P, C, Q) array."""
    rows, _ = chunk_slices(view_shape, elements)
    return empty((rows, *view_shape[1:]))


def chunks(vs: Sequence[Array], elements: int, empty: Callable[[tuple[int, ...]], Array] | None
           ) -> Iterator[tuple[tuple[Array, ...], Array | None]]:
    """Chunks along P (of about ``elements`` elements) of (P, C, Q) arrays of one shape, each with one reused
    scratch buffer of the chunk's shape (made by ``empty(shape)``; None without ``empty``)."""
    _, slices = chunk_slices(vs[0].shape, elements)
    buf = None if empty is None else scratch(vs[0].shape, elements, empty)
    for sl in slices:
        chunk = tuple(t[sl] for t in vs)
        n = chunk[0].shape[0]
        yield chunk, (buf if buf is None or n == buf.shape[0] else buf[:n])


def accumulate(acc: Array | None, part: Array) -> Array:
    """The running total of per-channel sums: ``part`` first, then added into ``acc`` (an array the kernel made,
    so adding in place is safe)."""
    if acc is None:
        return part
    acc += part
    return acc


#: rows added one after the other by :func:`sum_rows` before their sums are added the same way
ROW_BLOCK = 64


def sum_rows(a: Array) -> Array:
    """Sum of a (p, C) array (NumPy or torch) over p: in blocks of ROW_BLOCK rows, then over the blocks' sums the
    same way. NumPy adds the rows of a non-contiguous axis one after the other (error growing with p, even for a
    constant channel); blocks bound it by about 64 + log64(p) units of roundoff, in one pass, and on torch the
    blocked sum is also faster than its plain sum over the outer axis."""
    m = a.shape[0] // ROW_BLOCK * ROW_BLOCK
    if m == 0:
        return a.sum(0)
    blocks = sum_rows(a[:m].reshape(-1, ROW_BLOCK, a.shape[1]).sum(1))
    return blocks + a[m:].sum(0) if m < a.shape[0] else blocks
