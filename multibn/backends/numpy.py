"""NumPy adapter: ``array_api_compat.numpy``; no autodiff (use :func:`multibn.batch_norm_vjp`)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import array_api_compat.numpy as compat
import numpy as np

from .base import Array, Backend, channel_view_shape, chunk_slices


def _reshape(x: Array, /, shape: tuple[int, ...], *, copy: bool | None = None) -> Array:
    """``array_api_compat.numpy.reshape``, without its layers of Python wrappers when no copy is asked."""
    return x.reshape(shape) if copy is None and isinstance(x, np.ndarray) else compat.reshape(x, shape, copy=copy)


def _astype(x: Array, dtype: Any, /, *, copy: bool = True, device: object = None) -> Array:
    """``array_api_compat.numpy.astype``, without its device check when no device is named."""
    return x.astype(dtype, copy=copy) if device is None else compat.astype(x, dtype, copy=copy, device=device)


#: ``array_api_compat.numpy`` with reshape and astype made cheap (the algorithm calls them several times a call)
xp = types.SimpleNamespace(**{**{k: getattr(compat, k) for k in dir(compat) if not k.startswith("__")},
                              "reshape": _reshape, "astype": _astype})


class NumpyBackend(Backend):
    name = "numpy"
    extra = "numpy"
    xp = xp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (np.ndarray, np.generic))

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if device not in (None, "cpu"):
            raise ValueError(f"device for the numpy backend must be None or 'cpu', got {device!r}")
        return np.asarray(obj, dtype=dtype)

    def signature(self, arrays: Sequence[object]) -> tuple | None:
        return tuple(None if a is None else (type(a), a.shape, a.dtype) for a in arrays)

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def quiet(self) -> contextlib.AbstractContextManager:
        return np.errstate(divide="ignore", invalid="ignore")

    def dtype(self, name: str) -> object:
        if name == "bfloat16":
            raise TypeError("the numpy backend has no bfloat16 dtype")
        return np.dtype(name)

    # ---- fast kernels -------------------------------------------------------------------------------------------
    # The same quantities as the generic kernels with in-place ufuncs (``out=``) on chunks of about _CHUNK elements:
    # x is viewed as (P, C, Q) and streamed along P, so the one scratch buffer stays in cache and the only
    # full-size allocation is the output. Reductions are NumPy's pairwise sum over the contiguous Q axis, then P.
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: Any) -> Array:
        v = _pcq(x, axes)
        if v is None:
            return super().channel_sum(x, axes, dtype)
        if v.dtype == dtype:
            return _reduce(v)
        acc = None
        for (xc,), buf in _chunks(dtype, v):
            np.copyto(buf, xc)
            acc = _accumulate(acc, _reduce(buf))
        return acc

    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v = _pcq(x, axes)
        if v is None:
            return super().channel_dev_sums(x, center, axes)
        m = center.reshape(1, -1, 1)
        s1 = s2 = None
        for (xc,), buf in _chunks(center.dtype, v):
            np.subtract(xc, m, out=buf)
            s1 = _accumulate(s1, _reduce(buf))
            np.multiply(buf, buf, out=buf)
            s2 = _accumulate(s2, _reduce(buf))
        return s1, s2

    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if scale.shape[i] == 1) if x.ndim == scale.ndim else ()
        v = _pcq(x, axes)
        if v is None:
            return super().scale_shift(x, scale, shift)
        out = np.empty_like(x)
        s, t = scale.reshape(1, -1, 1), shift.reshape(1, -1, 1)
        same = x.dtype == scale.dtype
        for (xc, oc), buf in _chunks(scale.dtype, v, out.reshape(v.shape), need_buf=not same):
            w = oc if same else buf
            np.multiply(xc, s, out=w)
            np.add(w, t, out=w)
            if not same:
                np.copyto(oc, w, casting="same_kind")
        return out

    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v, g = _pcq(x, axes), _pcq(dy, axes)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_sums(dy, x, mean, axes)
        m = mean.reshape(1, -1, 1)
        s1 = s2 = None
        for (xc, gc), buf in _chunks(mean.dtype, v, g):
            s1 = _accumulate(s1, _reduce(gc, mean.dtype))
            np.subtract(xc, m, out=buf)
            np.multiply(buf, gc, out=buf)
            s2 = _accumulate(s2, _reduce(buf))
        return s1, s2

    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if mean.shape[i] == 1)
        v, g = _pcq(x, axes), _pcq(dy, axes)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_apply(dy, x, mean, a, b, c)
        out = np.empty_like(x)
        m, a, b, c = (t.reshape(1, -1, 1) for t in (mean, a, b, c))
        same = x.dtype == a.dtype
        scratch = np.empty_like(next(_chunks(a.dtype, v))[1])
        for (xc, gc, oc), buf in _chunks(a.dtype, v, g, out.reshape(v.shape)):
            w = oc if same else buf  # same dtype: work in the output itself
            t = scratch[: xc.shape[0]]
            np.subtract(xc, m, out=w)
            np.multiply(w, b, out=w)  # (x - mean) * b
            np.add(w, c, out=w)  # + c
            np.multiply(gc, a, out=t)
            np.add(w, t, out=w)  # + dy * a
            if not same:
                np.copyto(oc, w, casting="same_kind")
        return out

#: elements per chunk (4 MiB of float32): the scratch buffer stays in L2/L3 between the ufuncs of one chunk
_CHUNK = 1 << 20


def _pcq(x: np.ndarray, axes: Sequence[int]) -> np.ndarray | None:
    """x as a (P, C, Q) view, C the one axis not reduced; None when the fast path does not apply."""
    shape = channel_view_shape(x.shape, axes)
    if shape is None or not isinstance(x, np.ndarray) or x.size == 0 or not x.flags.c_contiguous:
        return None
    return x.reshape(shape)


def _reduce(v: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Sum of a (p, C, Q) array over p and Q: pairwise over the contiguous Q first, then blockwise over p."""
    return _sum_rows(v[:, :, 0] if v.shape[2] == 1 else v.sum(2, dtype=dtype), dtype)


def _sum_rows(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Sum of a (p, C) array over p in blocks of 64 rows, then over the blocks' sums the same way: NumPy adds the
    rows of a non-contiguous axis one after the other (error growing with p: a constant channel of 200k float32
    values got a mean off by 1e-3); blocks bound it by about 64 + log64(p) units of roundoff, in one pass."""
    m = a.shape[0] // 64 * 64
    if m == 0:
        return a.sum(0, dtype=dtype)
    blocks = _sum_rows(a[:m].reshape(-1, 64, a.shape[1]).sum(1, dtype=dtype))
    return blocks + a[m:].sum(0, dtype=dtype) if m < a.shape[0] else blocks


def _accumulate(acc: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    if acc is None:
        return part
    acc += part
    return acc


def _chunks(dtype: Any, *vs: np.ndarray, need_buf: bool = True) -> Iterator[tuple[tuple[np.ndarray, ...], Any]]:
    """Chunks along P of (P, C, Q) arrays of one shape, each time with a reused buffer of the chunk's shape."""
    rows, slices = chunk_slices(vs[0].shape, _CHUNK)
    buf = np.empty((rows, *vs[0].shape[1:]), dtype=dtype) if need_buf else None
    for sl in slices:
        chunk = tuple(t[sl] for t in vs)
        yield chunk, (buf[: chunk[0].shape[0]] if buf is not None else None)
