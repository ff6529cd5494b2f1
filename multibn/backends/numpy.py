"""NumPy adapter: ``array_api_compat.numpy``; no autodiff (use :func:`multibn.batch_norm_vjp`)."""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator, Sequence
from typing import Any

import array_api_compat.numpy as compat
import numpy as np

from ._chunks import ROW_BLOCK, channel_view_shape, sum_rows
from .base import Array, Backend


def _reshape(x: Array, /, shape: tuple[int, ...], *, copy: bool | None = None) -> Array:
    """``array_api_compat.numpy.reshape``, without its layers of Python wrappers when no copy is asked."""
    return x.reshape(shape) if copy is None and isinstance(x, np.ndarray) else compat.reshape(x, shape, copy=copy)


def _astype(x: Array, dtype: Any, /, *, copy: bool = True, device: object = None) -> Array:
    """``array_api_compat.numpy.astype``, without its device check when no device is named."""
    return x.astype(dtype, copy=copy) if device is None else compat.astype(x, dtype, copy=copy, device=device)


def _clip(x: Array, /, min: float | None = None, max: float | None = None) -> Array:
    """``array_api_compat.numpy.clip``: ``np.clip`` itself for a float array and float bounds (the wrapper's per-call
    overhead is skipped, and the algorithm calls clip several times a call)."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" and all(b is None or type(b) is float for b in (min, max)):
        return np.clip(x, min, max)
    return compat.clip(x, min, max)


#: ``array_api_compat.numpy`` with reshape, astype and clip made cheap (the algorithm calls them several times a call)
xp = types.SimpleNamespace(**{**{k: getattr(compat, k) for k in dir(compat) if not k.startswith("__")},
                              "reshape": _reshape, "astype": _astype, "clip": _clip})


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (np.ndarray, np.generic))

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if device not in (None, "cpu"):
            raise ValueError(f"device for the numpy backend must be None or 'cpu', got {device!r}")
        return np.asarray(obj, dtype=dtype)

    def signature(self, arrays: Sequence[object]) -> tuple | None:
        return tuple(None if a is None else (type(a), a.dtype) for a in arrays)

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def quiet(self) -> contextlib.AbstractContextManager:
        return np.errstate(divide="ignore", invalid="ignore")

    def dtype(self, name: str) -> object:
        if name == "bfloat16":
            raise TypeError("the numpy backend has no bfloat16 dtype")
        return np.dtype(name)

    # ---- fast kernels -------------------------------------------------------------------------------------------
    # The same quantities as the generic kernels with in-place ufuncs (``out=``) on tiles of about _CHUNK elements:
    # x is viewed as (P, C, Q) and streamed tile by tile (:class:`_Tiling`), so that a tile, its output and the
    # scratch buffers stay in L2 across the ufuncs on it; the only full-size allocation is the output. Sums: see
    # :class:`_Sums`.
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: Any) -> Array:
        v = _channel_view(x, axes)
        if v is None:
            return super().channel_sum(x, axes, dtype)
        tiling = _Tiling(v.shape)
        acc = _Sums(tiling, dtype)
        buf = None if v.dtype == dtype else _Scratch(dtype)
        with tiling.unbuffered():
            for t in tiling.tiles:
                acc.add(t, v[t] if buf is None else buf.copy_of(v[t]))
        return acc.total()

    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v = _channel_view(x, axes)
        if v is None:
            return super().channel_dev_sums(x, center, axes)
        tiling = _Tiling(v.shape)
        m = tiling.per_channel(center)
        s1, s2, buf = _Sums(tiling, center.dtype), _Sums(tiling, center.dtype), _Scratch(center.dtype)
        with tiling.unbuffered():
            for t in tiling.tiles:
                d = np.subtract(v[t], m[:, t[1]], out=buf.like(v[t]))
                s1.add(t, d)
                s2.add(t, d, d)
        return s1.total(), s2.total()

    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if scale.shape[i] == 1) if x.ndim == scale.ndim else ()
        v = _channel_view(x, axes)
        if v is None:
            return super().scale_shift(x, scale, shift)
        tiling = _Tiling(v.shape)
        out = np.empty_like(x)
        o = out.reshape(v.shape)
        s, b = tiling.per_channel(scale), tiling.per_channel(shift)
        buf = None if x.dtype == scale.dtype else _Scratch(scale.dtype)
        with tiling.unbuffered():
            for t in tiling.tiles:
                ch = t[1]
                w = o[t] if buf is None else buf.like(v[t])  # same dtype: work in the output itself
                np.multiply(v[t], s[:, ch], out=w)
                np.add(w, b[:, ch], out=o[t], casting="same_kind")  # rounded to x's dtype once, on the way out
        return out

    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v, g = _channel_view(x, axes), _channel_view(dy, axes)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_sums(dy, x, mean, axes)
        tiling = _Tiling(v.shape)
        m = tiling.per_channel(mean)
        s1, s2, buf = _Sums(tiling, mean.dtype), _Sums(tiling, mean.dtype), _Scratch(mean.dtype)
        gbuf = None if dy.dtype == mean.dtype else _Scratch(mean.dtype)
        with tiling.unbuffered():
            for t in tiling.tiles:
                gc = g[t] if gbuf is None else gbuf.copy_of(g[t])
                s1.add(t, gc)
                d = np.subtract(v[t], m[:, t[1]], out=buf.like(v[t]))
                s2.add(t, d, gc)
        return s1.total(), s2.total()

    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if mean.shape[i] == 1)
        v, g = _channel_view(x, axes), _channel_view(dy, axes)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_apply(dy, x, mean, a, b, c)
        tiling = _Tiling(v.shape)
        out = np.empty_like(x)
        o = out.reshape(v.shape)
        m, a, b, c = (tiling.per_channel(p) for p in (mean, a, b, c))
        same = x.dtype == a.dtype
        buf, scratch = _Scratch(a.dtype), _Scratch(a.dtype)
        with tiling.unbuffered():
            for t in tiling.tiles:
                ch = t[1]
                w = o[t] if same else buf.like(v[t])  # same dtype: work in the output itself
                np.subtract(v[t], m[:, ch], out=w)
                np.multiply(w, b[:, ch], out=w)  # (x - mean) * b
                np.add(w, c[:, ch], out=w)  # + c
                ga = np.multiply(g[t], a[:, ch], out=scratch.like(v[t]))
                np.add(w, ga, out=o[t], casting="same_kind")  # + dy * a, rounded to x's dtype once
        return out


#: elements per tile (1 MiB of float32): smaller tiles pay the fixed cost of a ufunc call more often, larger ones
#: push the tile's scratch and output out of L2
_CHUNK = 1 << 18
#: rows of Q at least this long take per-channel operands as they are, broadcast along the row; shorter ones get
#: them expanded along Q once per call (:meth:`_Tiling.per_channel`)
_LONG = 1024
#: expanded per-channel operands are at most this many elements (else broadcast, as for long rows)
_EXPAND_MAX = 1 << 20
#: the contiguous runs that einsum sums (in SIMD lanes: at most _RUN elements added one after the other, 16-64 with
#: AVX-512 to SSE); the runs' sums are then added pairwise
_RUN = 256
#: runs shorter than this keep NumPy's ufunc buffer (see _Tiling.unbuffered): an inner loop per run would cost more
_SHORT = 128


def _channel_view(x: np.ndarray, axes: Sequence[int]) -> np.ndarray | None:
    """x as a (P, C, Q) view, C the one axis not reduced; None when the fast path does not apply."""
    shape = channel_view_shape(x.shape, axes)
    if shape is None or not isinstance(x, np.ndarray) or x.size == 0 or not x.flags.c_contiguous:
        return None
    return x.reshape(shape)


class _Tiling:
    """How a kernel streams a (P, C, Q) view: ``tiles``, (rows of P, channels) slices of about _CHUNK elements
    (whole (C, Q) slabs while one fits, else slabs cut along C into near-equal parts; rows in whole groups of
    ``group``: ROW_BLOCK when Q == 1, the rows that :class:`_Sums` adds one after the other, else 1)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        p, c, q = self.shape = shape
        self.group = g = ROW_BLOCK if q == 1 else 1
        self.expand = 1 < q < _LONG and c * q <= _EXPAND_MAX
        rows = min(g, p)  # the fewest rows a tile can have
        if rows * c * q <= _CHUNK:
            k = max(1, _CHUNK // (g * c * q)) * g
            self.tiles = [(slice(i, i + k), slice(None)) for i in range(0, p, k)]
            self.run = c * q
        else:
            parts = -(-rows * c * q // _CHUNK)
            k = -(-c // parts)
            self.tiles = [(slice(i, i + g), slice(j, j + k)) for i in range(0, p, g) for j in range(0, c, k)]
            self.run = k * q
        if not self.expand and q > 1:
            self.run = q  # per-channel operands broadcast along each row of Q

    def per_channel(self, a: np.ndarray) -> np.ndarray:
        """A per-channel operand as a (1, C, Q) array (expanded along Q: the ufuncs on a tile then run along
        whole contiguous rows of it) or a (1, C, 1) view (broadcast along Q)."""
        a = a.reshape(1, -1, 1)
        return np.repeat(a, self.shape[2], axis=2) if self.expand else a

    @contextlib.contextmanager
    def unbuffered(self) -> Iterator[None]:
        """Ufuncs with a buffer no longer than the contiguous runs they work along: an operand broadcast along
        runs shorter than the default buffer (8192 elements) otherwise goes through it, copied out element by
        element (an extra copy per element instead of a contiguous inner loop)."""
        if self.run < _SHORT:
            yield
            return
        old = np.setbufsize(min(self.run, 8192) // 16 * 16)
        try:
            yield
        finally:
            np.setbufsize(old)


class _Scratch:
    """One reused buffer; ``like(a)`` is a contiguous array of a's shape in it (of this dtype)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype, self.flat = np.dtype(dtype), np.empty(0, dtype)

    def like(self, a: np.ndarray) -> np.ndarray:
        if self.flat.size < a.size:
            self.flat = np.empty(a.size, self.dtype)
        return self.flat[: a.size].reshape(a.shape)

    def copy_of(self, a: np.ndarray) -> np.ndarray:
        out = self.like(a)
        np.copyto(out, a)
        return out


class _Sums:
    """Per-channel sums of the tiles of a tiling: each tile's sums over Q and its groups of rows go to a small
    (groups, C) array, whose rows are summed blockwise at the end (:func:`sum_rows`)."""

    def __init__(self, tiling: _Tiling, dtype: Any) -> None:
        p, c, _ = tiling.shape
        self.g = tiling.group
        self.rows = np.empty((-(-p // self.g), c), dtype)

    def add(self, tile: tuple[slice, slice], a: np.ndarray, b: np.ndarray | None = None) -> None:
        """Record the tile ``a`` (``a * b`` if b is given), of the stats dtype, at ``tile``."""
        rows, ch = tile
        start = rows.start // self.g
        _tile_sums(a, b, self.g, self.rows[start: start + -(-a.shape[0] // self.g), ch])

    def total(self) -> np.ndarray:
        return sum_rows(self.rows)


def _tile_sums(a: np.ndarray, b: np.ndarray | None, g: int, out: np.ndarray) -> None:
    """Into ``out``: the sums of a (p, c, Q) tile ``a`` (of ``a * b``) over Q and over groups of g rows.

    Q > 1: np.einsum over runs of _RUN elements (its SIMD loop is faster than NumPy's pairwise sum and fuses
    the product), the runs' sums then added pairwise by ``sum``. Q == 1: rows added one after the other in blocks of
    g = ROW_BLOCK (as :func:`sum_rows`), by np.einsum (fusing the product) along the contiguous channels."""
    ops = (a,) if b is None else (a, b)
    p, c, q = a.shape
    if q == 1:
        full = p // g * g
        lhs = "pgc" if b is None else "pgc,pgc"
        if full:
            np.einsum(f"{lhs}->pc", *(t[:full, :, 0].reshape(-1, g, c) for t in ops), out=out[: full // g])
        if full < p:
            np.einsum(f"{lhs}->pc", *(t[full:, :, 0][None] for t in ops), out=out[full // g:])
        return
    run = _run_length(q)
    if run == q:
        np.einsum("pcq->pc" if b is None else "pcq,pcq->pc", *ops, out=out)
        return
    runs, head = q // run, q // run * run
    runs_of = (t[..., :head].reshape(p, c, runs, run) for t in ops)
    np.sum(np.einsum("pckr->pck" if b is None else "pckr,pckr->pck", *runs_of), axis=2, out=out)
    if head < q:
        out += np.einsum("pcq->pc" if b is None else "pcq,pcq->pc", *(t[..., head:] for t in ops))


@functools.cache
def _run_length(q: int) -> int:
    """The runs that rows of Q are cut into for einsum: q itself up to 2 _RUN, else a divisor of q in
    [_RUN / 2, _RUN] (no ragged tail to sum apart) if there is one, else _RUN."""
    if q <= 2 * _RUN:
        return q
    return next((r for r in range(_RUN, _RUN // 2 - 1, -1) if q % r == 0), _RUN)
