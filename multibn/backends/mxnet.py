"""MXNet 1.9 adapter: a hand-written array namespace over ``mx.nd`` (MXNet has no array-API support) and
autodiff through ``mxnet.autograd.Function``.

MXNet quirks handled here: it uses the alias ``np.bool`` that NumPy >= 1.24 removed (restored before the
import); importing it drops torch's thread count to 1 (restored if torch is already imported); it cannot
make zero-size arrays (an empty batch is refused); it has no bfloat16. ``num_batches_tracked`` has shape
(1,) since legacy NDArrays have no 0-d shape.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

if "bool" not in np.__dict__:  # MXNet 1.9 uses np.bool, removed in NumPy 1.24 (NumPy 2 re-added it)
    np.bool = np.bool_  # type: ignore[attr-defined]

_torch = sys.modules.get("torch")
_torch_threads = _torch.get_num_threads() if _torch is not None else None
with warnings.catch_warnings():  # MXNet 1.9 warns about NumPy/SciPy/distutils APIs it uses on import
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx

if _torch is not None and _torch_threads is not None:
    _torch.set_num_threads(_torch_threads)

from ._chunks import accumulate, channel_view_shape, chunks, scratch  # noqa: E402
from .base import Array, Backend, Rule  # noqa: E402


class _BatchNormFunction(mx.autograd.Function):
    """``mx.autograd.Function`` with MXNet 1.9's recording, and a backward entry that honours every gradient
    request: MXNet's own stops at the first input with ``grad_req='null'`` (so gamma got no gradient when x
    needed none) and compares ``'add'`` with the integer 3 it is given (so ``grad_req='add'`` got nothing).
    The inputs the backward keeps are copied at the forward: the backward runs on an engine thread after
    ``loss.backward()`` returns, and reading the caller's arrays there deadlocks an in-place update of them
    (an SGD step on gamma waits for gamma's gradient, which waits for the read)."""

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self._rule = rule

    def forward(self, *inputs: Array) -> tuple[Array, ...]:
        outputs = tuple(self._rule.forward(None, *inputs))
        residuals = self._rule.residuals(None, inputs, outputs)
        # outputs among the residuals (mean) are detached: their autograd entry points at this node, which holds
        # this function, so keeping them as they are would keep the node, and the copy of x, alive for good
        self.residuals = type(residuals)(*(r.copy() if any(r is a for a in inputs) else
                                           r.detach() if any(r is o for o in outputs) else r for r in residuals))
        self.consts = inputs[self._rule.n_diff:]
        return outputs

    def backward(self, *cotangents: Array) -> tuple[Array, ...]:
        return (*self._rule.backward(self.residuals, cotangents), *(mx.nd.zeros_like(c) for c in self.consts))

    def __call__(self, *inputs: Array) -> tuple[Array, ...]:
        ag = mx.autograd
        recording = ag.set_recording(False)
        outputs = self.forward(*inputs)
        ag.set_recording(recording)
        if not recording:
            return outputs
        key = ag.Function._registry.inc()

        def backward_entry(num_ograds, num_igrads, ptrs, reqs, is_train, _):
            try:
                ograds = [mx.nd.NDArray(ctypes.cast(p, ag.NDArrayHandle), writable=False) for p in ptrs[:num_ograds]]
                igrads = [mx.nd.NDArray(ctypes.cast(p, ag.NDArrayHandle), writable=True)
                          for p in ptrs[num_ograds:num_ograds + num_igrads]]
                # dx straight into its gradient buffer where that is written, not overwritten in place
                with _backend("mxnet").destination.writing_to(igrads[0] if reqs[0] == 1 else None):
                    grads = self.backward(*ograds)
                for igrad, grad, req in zip(igrads, grads, (reqs[i] for i in range(num_igrads)), strict=True):
                    if grad is igrad:
                        continue
                    if req in (1, 2):  # write, inplace
                        igrad[:] = grad
                    elif req == 3:  # add
                        igrad[:] += grad
            except Exception:  # MXNet's callback must not raise: report and fail the backward
                traceback.print_exc()
                return False
            return True

        def delete_entry(_):
            ag.Function._registry.ref_holder.pop(key, None)
            return True

        callbacks = [ctypes.cast(f, ctypes.CFUNCTYPE(ctypes.c_int)) for f in (
            ag.Function._bwd_functype(backward_entry), ag.Function._del_functype(delete_entry))]
        context = ag.MXCallbackList(
            ctypes.c_int(len(callbacks)),
            ctypes.cast(ag.c_array(ctypes.CFUNCTYPE(ctypes.c_int), callbacks),
                        ctypes.POINTER(ctypes.CFUNCTYPE(ctypes.c_int))),
            ctypes.cast(ag.c_array(ctypes.c_void_p, [None] * len(callbacks)), ctypes.POINTER(ctypes.c_void_p)),
        )
        ag.Function._registry.ref_holder[key] = context
        ag.check_call(ag._LIB.MXCustomFunctionRecord(
            ctypes.c_int(len(inputs)), ag.c_handle_array(inputs),
            ctypes.c_int(len(outputs)), ag.c_handle_array(outputs), ctypes.byref(context)))
        return outputs


class _HostFunction(_BatchNormFunction):
    """The same op with the algorithm on the NumPy adapter: inputs copied to the host at the forward (the copies
    are also what the backward keeps), results copied back."""

    def forward(self, *inputs: Array) -> tuple[Array, ...]:
        self.ctx = inputs[0].context
        host = tuple(a.asnumpy() for a in inputs)
        with _backend("numpy").quiet():  # inf and NaN arise silently, as on MXNet
            outputs = tuple(self._rule.forward(None, *host))
            self.residuals = self._rule.residuals(None, host, outputs)
        self.consts = inputs[self._rule.n_diff:]
        return tuple(_from_host(o, self.ctx) for o in outputs)

    def backward(self, *cotangents: Array) -> tuple[Array, ...]:
        with _backend("numpy").quiet():
            grads = self._rule.backward(self.residuals, tuple(c.asnumpy() for c in cotangents))
        return (*(_from_host(g, self.ctx) for g in grads), *(mx.nd.zeros_like(c) for c in self.consts))


_DTYPE_NAMES = {t: np.dtype(t).name for t in (np.float16, np.float32, np.float64, np.int64, np.int32, np.uint8)}
#: the functional API runs arrays of at most this many elements on the NumPy adapter (single-threaded; above it,
#: MXNet's multi-threaded BLAS and oneDNN kernels win)
HOST_MAX_ELEMENTS = 1 << 17


def _from_host(a: np.ndarray, ctx: mx.Context) -> Array:
    """A new CPU NDArray holding ``a``, written through a host view: the array is new, so no engine operation can
    be pending on it, and the write skips ``_sync_copyfrom``'s engine round trip (a wait on the engine, which costs
    more than the copy of a small array)."""
    out = mx.nd.empty(a.shape, ctx=ctx, dtype=a.dtype)
    np.copyto(_host_view(out, a.shape, np.dtype(a.dtype)), a)
    return out


def _ctx(device: object) -> mx.Context | None:
    if device is None or isinstance(device, mx.Context):
        return device
    kind, _, index = str(device).partition(":")
    return mx.Context("cpu" if kind == "cpu" else "gpu", int(index or 0))


def _np_mode() -> bool:
    return bool(mx.util.is_np_array())


def _as_np(a: Array) -> Array:
    return a.as_np_ndarray() if isinstance(a, mx.nd.NDArray) and not isinstance(a, mx.np.ndarray) else a


def _keeps_np(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` over legacy NDArrays, taking and giving ``mx.np`` arrays where it is given one (MXNet's NumPy
    interface shares memory with the legacy arrays that ``mx.nd`` operators need)."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, mx.np.ndarray) for a in args):
            return fn(*args, **kwargs)
        out = fn(*(_legacy(a) for a in args), **kwargs)
        return tuple(map(_as_np, out)) if isinstance(out, tuple) else _as_np(out)

    return wrapped


def _made(a: Array) -> Array:
    """A new array in the kind the caller works with: ``mx.np`` under ``npx.set_np()``."""
    return _as_np(a) if _np_mode() else a


@_keeps_np
def _where(cond: Array, a: Array, b: Array) -> Array:
    return mx.nd.where(cond, a, b)


class MXNetNamespace:
    """The handful of array-API functions the algorithm uses, over ``mx.nd`` (``mx.np`` arrays in, ``mx.np`` out)."""

    float16, float32, float64, int64 = (np.dtype(n) for n in ("float16", "float32", "float64", "int64"))

    @staticmethod
    @_keeps_np
    def sum(x: Array, axis: Sequence[int] | None = None) -> Array:
        return mx.nd.sum(x, axis=tuple(axis) if axis is not None else ())

    @staticmethod
    def astype(x: Array, dtype: object, copy: bool = True) -> Array:
        # never a copy of an array already in ``dtype``: the algorithm writes to no array, and each copy is one
        # more engine push (a fixed cost per operator)
        return x.astype(dtype, copy=False)

    @staticmethod
    def reshape(x: Array, shape: Sequence[int]) -> Array:
        return x.reshape(tuple(shape))

    @staticmethod
    @_keeps_np
    def sqrt(x: Array) -> Array:
        return mx.nd.sqrt(x)

    @staticmethod
    def where(cond: Array, a: Array, b: Array) -> Array:
        if isinstance(cond, mx.np.ndarray) and cond.dtype == np.bool_:  # mx.np comparisons give bool, which
            cond = cond.astype(np.float32)  # mx.nd.where does not take (legacy comparisons give 0/1 floats)
        return _where(cond, a, b)

    @staticmethod
    def clip(x: Array, min: float) -> Array:
        """``x`` with values below ``min`` raised to it; NaN stays NaN (``mx.nd.maximum`` would give ``min``)."""
        low = MXNetNamespace.zeros_like(x)
        return MXNetNamespace.where(x < min, low if min == 0 else low + min, x)

    @staticmethod
    @_keeps_np
    def abs(x: Array) -> Array:
        return mx.nd.abs(x)

    @staticmethod
    @_keeps_np
    def permute_dims(x: Array, axes: Sequence[int]) -> Array:
        return mx.nd.transpose(x, axes=tuple(axes))

    @staticmethod
    def concat(arrays: Sequence[Array], axis: int = 0) -> Array:
        arrays = list(arrays)
        if isinstance(arrays[0], mx.np.ndarray):
            return _as_np(mx.nd.concat(*map(_legacy, arrays), dim=axis))
        return mx.nd.concat(*arrays, dim=axis)

    @staticmethod
    @_keeps_np
    def any(x: Array) -> Array:
        return mx.nd.max(x != 0).reshape((1,))

    @staticmethod
    @_keeps_np
    def zeros_like(x: Array) -> Array:
        return mx.nd.zeros_like(x)

    @staticmethod
    @_keeps_np
    def ones_like(x: Array) -> Array:
        return mx.nd.ones_like(x)

    @staticmethod
    def zeros(shape: Sequence[int], dtype: object = None, device: object = None) -> Array:
        return _made(mx.nd.zeros(tuple(shape), ctx=_ctx(device), dtype=dtype or "float32"))

    @staticmethod
    def full(shape: Sequence[int], value: float, dtype: object = None, device: object = None) -> Array:
        return _made(mx.nd.full(tuple(shape), value, ctx=_ctx(device), dtype=dtype or "float32"))

    @staticmethod
    def asarray(obj: object, dtype: object = None, device: object = None) -> Array:
        return _made(mx.nd.array(np.asarray(obj), ctx=_ctx(device), dtype=dtype))


class _Destination:
    """The array the next full-size result of a kernel goes into instead of a new one, named per thread (MXNet runs
    its callbacks on several engine threads) for the span of :meth:`writing_to`, and taken by the first result of
    its shape, dtype and device."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def writing_to(self, dst: Any) -> Iterator[None]:
        """Within this context ``dst`` (None: no destination) takes the first result that fits. It must not overlap
        the kernel's operands (the chunk loops write a chunk before reading the next one's)."""
        self._local.dst = dst
        try:
            yield
        finally:
            self._local.dst = None

    def take(self, x: Any) -> Any:
        """The destination for a result like ``x`` (same shape, dtype and device), once; None otherwise."""
        dst = getattr(self._local, "dst", None)
        if (dst is None or dst.shape != x.shape or dst.dtype != x.dtype
                or getattr(dst, "context", None) != getattr(x, "context", None)):
            return None
        self._local.dst = None
        return dst


class MXNetBackend(Backend):
    name = "mxnet"
    xp = MXNetNamespace()

    #: where ``backward_apply`` on the fast path writes its result (dx into ``x.grad``), when one is named
    destination: _Destination = _Destination()

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, mx.nd.NDArray)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if isinstance(obj, mx.nd.NDArray):
            return obj if dtype is None else obj.astype(self.dtype(dtype), copy=False)
        a = np.asarray(obj)
        if a.size == 0:
            raise ValueError(f"the mxnet backend cannot hold zero-size arrays (MXNet 1.x), got shape {a.shape}")
        return _made(mx.nd.array(a, ctx=_ctx(device), dtype=self.dtype(dtype) if dtype else a.dtype))

    def to_numpy(self, a: Array) -> np.ndarray:
        return a.asnumpy()

    def dtype_name(self, a: Array) -> str:
        t = a.dtype  # NDArray.dtype gives a NumPy scalar type
        return _DTYPE_NAMES.get(t) or np.dtype(t).name

    def dtype(self, name: str) -> object:
        if name == "bfloat16":
            raise TypeError("the mxnet backend has no bfloat16 dtype (MXNet 1.9 NDArray)")
        return np.dtype(name)

    def device_of(self, a: Array) -> object:
        return a.context

    def counter(self, value: int = 0, device: object = None) -> Array:
        return _made(mx.nd.array([value], ctx=_ctx(device), dtype="int64"))

    def as_mask(self, mask: object, shape: tuple[int, ...], device: object = None) -> Array:
        # MXNet's where and casts do not take its bool arrays: the mask travels as float32 0/1
        mask = mask.astype("float32") if self.is_array(mask) else mx.nd.array(np.asarray(mask, np.float32),
                                                                               ctx=_ctx(device))
        return mx.nd.broadcast_to(mask, shape)

    def untracked(self) -> contextlib.AbstractContextManager:
        return mx.autograd.pause()

    def custom_op(self, make_rule: Callable[[Backend], Rule]) -> Callable[..., tuple[Array, ...]]:
        """The op through ``mxnet.autograd.Function``; on small CPU arrays the same rule runs on the NumPy adapter
        on host copies: MXNet pushes each operator to its engine at a fixed cost apiece, and NumPy runs the whole
        small batch norm in less than those pushes add up to. MXNet has no collectives: ``sync`` is always None here."""
        rule, host_rule = make_rule(self), make_rule(_backend("numpy"))

        def op(sync: None, *inputs: Array) -> tuple[Array, ...]:
            np_arrays = isinstance(inputs[0], mx.np.ndarray)
            if np_arrays:
                inputs = tuple(map(_legacy, inputs))
            x = inputs[0]
            if len(inputs) == rule.n_diff and x.size <= HOST_MAX_ELEMENTS and x.context.device_type == "cpu":
                outputs = _HostFunction(host_rule)(*inputs)
            else:
                outputs = _BatchNormFunction(rule)(*inputs)
            return tuple(map(_as_np, outputs)) if np_arrays else outputs

        return op

    # ---- fast kernels -------------------------------------------------------------------------------------------
    # MXNet 1.9's reductions over several axes and its broadcast operators are far slower than its BLAS and oneDNN
    # kernels (generic kernels, and the wheel is built without AVX). So, for float32/float64 x with the channel axis
    # viewed as (P, C, Q): every per-channel sum is a matrix product with a ones vector (BLAS); the per-channel affine
    # maps x * scale + shift and (x - mean) * b + c of float32 4-D data are oneDNN's inference-mode BatchNorm with
    # moving_var + eps == 1 exactly, i.e. gamma * (x - moving_mean) + beta; everything else streams in chunks along P
    # through reused buffers (``out=``). float16 x streams the same way through float32 buffers (a cast per chunk, then
    # the generic kernels' operators in their order), so that no full-size float32 temporary exists. Under
    # autograd.record the generic kernels run.
    @_keeps_np
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: Any) -> Array:
        v = _channel_view(x, axes, dtype)
        if v is None:
            return super().channel_sum(x, axes, dtype)
        if v.dtype == dtype:
            return _rsum(v)
        acc = None
        for (xc,), buf in _chunks(v, dtype=dtype):
            acc = accumulate(acc, _rsum(_cast(xc, buf)))
        return acc

    @_keeps_np
    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v = _channel_view(x, axes, center.dtype)
        if v is None:
            return super().channel_dev_sums(x, center, axes)
        m = center.reshape((1, -1, 1))
        s1 = s2 = None
        for (xc,), buf in _chunks(v, dtype=center.dtype):
            _sub(xc, m, buf)
            s1 = accumulate(s1, _rsum(buf))
            mx.nd.elemwise_mul(buf, buf, out=buf)  # the square, twice as fast as mx.nd.square
            s2 = accumulate(s2, _rsum(buf))
        return s1, s2

    @_keeps_np
    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if scale.shape[i] == 1) if x.ndim == scale.ndim else ()
        v = _channel_view(x, axes, scale.dtype)
        if v is None:
            return super().scale_shift(x, scale, shift)
        same = v.dtype == scale.dtype
        if same and _onednn(v):
            return _affine(v, scale, shift).reshape(x.shape)
        out = mx.nd.empty(v.shape, ctx=v.context, dtype=v.dtype)
        s, t = scale.reshape((1, -1, 1)), shift.reshape((1, -1, 1))
        for (xc, oc), buf in _chunks(v, out, dtype=scale.dtype, need_buf=not same):
            w = oc if same else buf
            mx.nd.broadcast_mul(xc if same else _cast(xc, buf), s, out=w)
            mx.nd.broadcast_add(w, t, out=w)
            if not same:
                mx.nd.Cast(w, dtype=oc.dtype, out=oc)
        return out.reshape(x.shape)

    @_keeps_np
    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v, g = _channel_view(x, axes, mean.dtype), _channel_view(dy, axes, mean.dtype)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_sums(dy, x, mean, axes)
        m = mean.reshape((1, -1, 1))
        s1 = _rsum(g) if g.dtype == mean.dtype else None
        s2 = None
        gbuf = None if g.dtype == mean.dtype else _buffer(v, mean.dtype)
        for (xc, gc), buf in _chunks(v, g, dtype=mean.dtype):
            if gbuf is not None:
                gc = _cast(gc, gbuf[: gc.shape[0]])
                s1 = accumulate(s1, _rsum(gc))
            _sub(xc, m, buf)
            mx.nd.elemwise_mul(buf, gc, out=buf)
            s2 = accumulate(s2, _rsum(buf))
        return s1, s2

    @_keeps_np
    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if mean.shape[i] == 1)
        v, g = _channel_view(x, axes, a.dtype), _channel_view(dy, axes, a.dtype)
        if v is None or g is None or dy.shape != x.shape:
            return super().backward_apply(dy, x, mean, a, b, c)
        dst = self.destination.take(x)
        result = mx.nd.empty(x.shape, ctx=v.context, dtype=v.dtype) if dst is None else dst
        out = result.reshape(v.shape)
        if v.dtype == g.dtype == a.dtype and _onednn(v):
            zero = mx.nd.zeros(a.shape, ctx=a.context, dtype=a.dtype)
            for (xc, gc, oc), _ in _chunks(v, g, out, need_buf=False):
                # ((x - mean) * b + c) + dy * a: two oneDNN affine maps and one add, in cache
                mx.nd.elemwise_add(_affine(xc, b, c, mean), _affine(gc, a, zero), out=oc)
            return result
        m, a3, b3, c3 = (t.reshape((1, -1, 1)) for t in (mean, a, b, c))
        if v.dtype == g.dtype == a.dtype:
            for (xc, gc, oc), buf in _chunks(v, g, out):
                mx.nd.broadcast_sub(xc, m, out=oc)
                mx.nd.broadcast_mul(oc, b3, out=oc)
                mx.nd.broadcast_add(oc, c3, out=oc)
                mx.nd.broadcast_mul(gc, a3, out=buf)
                mx.nd.elemwise_add(oc, buf, out=oc)
            return result
        # narrow x or dy: the generic kernel's (dy * a + (x - mean) * b) + c, through two float32 buffers
        gbuf = _buffer(v, a.dtype)
        for (xc, gc, oc), buf in _chunks(v, g, out, dtype=a.dtype):
            t = gbuf[: buf.shape[0]]
            mx.nd.broadcast_sub(_cast(xc, buf), m, out=buf)
            mx.nd.broadcast_mul(buf, b3, out=buf)
            mx.nd.broadcast_mul(_cast(gc, t), a3, out=t)
            mx.nd.elemwise_add(t, buf, out=buf)
            mx.nd.broadcast_add(buf, c3, out=buf)
            if oc.dtype == buf.dtype:
                buf.copyto(oc)
            else:
                mx.nd.Cast(buf, dtype=oc.dtype, out=oc)
        return result


#: elements per chunk (4 MiB of float32): the scratch buffer stays in cache between the operators of one chunk
_CHUNK = 1 << 20
#: eps and moving_var for the affine BatchNorm: both exact in float32 and summing to exactly 1, so sqrt(...) == 1
_AFFINE_EPS = 2.0**-10


def _channel_view(x: Array, axes: Sequence[int], dtype: Any) -> Array | None:
    """x as a (P, C, Q) view, C the one axis not reduced; None when the fast path does not apply: ``dtype`` (the
    dtype of the computation) float32 or float64 and x in it, or x float16 with ``dtype`` float32."""
    shape = channel_view_shape(x.shape, axes)
    if shape is None or x.size == 0 or mx.autograd.is_recording():
        return None
    pair = np.dtype(x.dtype).name, np.dtype(dtype).name
    if pair not in (("float32", "float32"), ("float64", "float64"), ("float16", "float32")):
        return None
    return x.reshape(shape)


def _cast(src: Array, buf: Array) -> Array:
    """``src`` in the dtype of ``buf``: ``src`` itself when it already is, else converted into ``buf``."""
    if src.dtype == buf.dtype:
        return src
    mx.nd.Cast(src, dtype=buf.dtype, out=buf)
    return buf


def _onednn(v: Array) -> bool:
    """Whether the affine BatchNorm runs on oneDNN (fast): float32 with a spatial axis, on the CPU."""
    return v.shape[2] > 1 and np.dtype(v.dtype).name == "float32" and v.context.device_type == "cpu"


def _affine(v: Array, gamma: Array, beta: Array, mean: Array | None = None, out: Array | None = None) -> Array:
    """gamma * (v - mean) + beta per channel of a (p, C, Q) view, by inference-mode BatchNorm (into ``out``, an
    array of the shape of ``v``, if given)."""
    c = v.shape[1]
    ctx, dt = v.context, v.dtype
    mean = mx.nd.zeros((c,), ctx=ctx, dtype=dt) if mean is None else mean.reshape((c,))
    var = mx.nd.full((c,), 1.0 - _AFFINE_EPS, ctx=ctx, dtype=dt)
    shape4 = (v.shape[0], c, v.shape[2], 1)
    kw = {} if out is None else {"out": out.reshape(shape4)}
    y = mx.nd.BatchNorm(v.reshape(shape4), gamma.reshape((c,)), beta.reshape((c,)), mean, var, eps=_AFFINE_EPS,
                        use_global_stats=True, fix_gamma=False, **kw)
    return y.reshape(v.shape) if out is None else out


def _sub(xc: Array, m: Array, out: Array) -> Array:
    """``out = xc - m`` (m per channel, (1, C, 1)) in the dtype of ``out``. float32 with a spatial axis: oneDNN's
    affine BatchNorm with gamma 1 and beta 0, whose every step is exact but the subtraction, so the same numbers as
    ``broadcast_sub`` at about twice its speed."""
    if xc.dtype == out.dtype and _onednn(xc):
        c = xc.shape[1]
        ones = mx.nd.ones((c,), ctx=xc.context, dtype=xc.dtype)
        return _affine(xc, ones, mx.nd.zeros((c,), ctx=xc.context, dtype=xc.dtype), m, out=out)
    return mx.nd.broadcast_sub(_cast(xc, out), m, out=out)


def _rsum(v: Array) -> Array:
    """Sum of a (p, C, Q) array over p and Q as products with ones vectors (BLAS gemv)."""
    p, c, q = v.shape
    ctx, dt = v.context, v.dtype
    rows = v.reshape((p, c)) if q == 1 else mx.nd.dot(v.reshape((p * c, q)), mx.nd.ones((q, 1), ctx=ctx, dtype=dt))
    if p == 1:
        return rows.reshape((c,)).copy()  # never a view of the caller's buffer
    return mx.nd.dot(mx.nd.ones((1, p), ctx=ctx, dtype=dt), rows.reshape((p, c))).reshape((c,))


def _empty(v: Array, dtype: Any = None) -> Callable[[tuple[int, ...]], Array]:
    return lambda shape: mx.nd.empty(shape, ctx=v.context, dtype=v.dtype if dtype is None else dtype)


def _buffer(v: Array, dtype: Any = None) -> Array:
    """A scratch buffer for one chunk of the (P, C, Q) array ``v`` (in ``dtype``, default that of ``v``)."""
    return scratch(v.shape, _CHUNK, _empty(v, dtype))


def _chunks(*vs: Array, dtype: Any = None, need_buf: bool = True
            ) -> Iterator[tuple[tuple[Array, ...], Array | None]]:
    """Chunks along P of (P, C, Q) arrays of one shape, each time with a reused buffer of the chunk's shape (in
    ``dtype``, default that of the first array)."""
    return chunks(vs, _CHUNK, _empty(vs[0], dtype) if need_buf else None)


def _legacy(a: Array) -> Array:
    """An ``mx.np.ndarray`` as the legacy NDArray on the same memory (MXNet's ``mx.nd`` operators need those)."""
    return a.as_nd_ndarray() if isinstance(a, mx.np.ndarray) else a


_GetData = mx.base._LIB.MXNDArrayGetData


def _host_view(a: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A NumPy array on the memory of the CPU NDArray ``a``, without a copy and without a round trip through MXNet's
    engine (each costs about as much as the whole batch norm of a small tensor). Only for arrays no engine
    operation is pending on, in MXNet's default layout: new arrays, and the Gluon graph operator's own buffers
    (:mod:`multibn.layers._gluon_op`), which are ready when its callback runs (the layer reshapes x so that MXNet
    converts oneDNN's blocked layouts before the operator)."""
    ptr = ctypes.c_void_p()
    mx.base.check_call(_GetData(a.handle, ctypes.byref(ptr)))
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr.value), dtype=dtype).reshape(shape)


def _backend(name: str) -> Backend:
    from . import get_backend

    return get_backend(name)
