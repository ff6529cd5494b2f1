"""PyTorch adapter (CPU and CUDA): ``array_api_compat.torch``, autodiff through ``torch.autograd.Function``."""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import array_api_compat.torch as compat
import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch._C import _functorch

from ._chunks import accumulate, channel_view_shape, chunks, scratch, sum_rows
from .base import Array, Backend, Rule


def _astype(x: Array, dtype: Any, /, *, copy: bool = True, device: object = None) -> Array:
    """``array_api_compat.torch.astype``, returning ``x`` itself at once when no copy or conversion is asked."""
    if not copy and device is None and x.dtype == dtype:
        return x
    return compat.astype(x, dtype, copy=copy, device=device)


def _reshape(x: Array, /, shape: tuple[int, ...], *, copy: bool | None = None) -> Array:
    """``array_api_compat.torch.reshape`` without its wrapper when no copy is asked."""
    return torch.reshape(x, shape) if copy is None else compat.reshape(x, shape, copy=copy)


def _clip(x: Array, /, min: float | None = None, max: float | None = None) -> Array:
    """``array_api_compat.torch.clip``: ``torch.clamp`` itself for a float tensor and non-NaN float bounds."""
    if x.is_floating_point() and all(b is None or (type(b) is float and b == b) for b in (min, max)):
        return torch.clamp(x, min, max)
    return compat.clip(x, min, max)


#: ``array_api_compat.torch`` with astype, reshape and clip made cheap (the algorithm calls them often on small
#: vectors)
xp = types.SimpleNamespace(**{**{k: getattr(compat, k) for k in dir(compat) if not k.startswith("__")},
                              "astype": _astype, "reshape": _reshape, "clip": _clip})


class TorchBackend(Backend):
    name = "torch"
    xp = xp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, torch.Tensor)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        return torch.as_tensor(obj, dtype=None if dtype is None else self.dtype(dtype), device=device)

    def signature(self, arrays: Sequence[object]) -> tuple | None:
        # the layout: a sparse tensor's type, dtype and device are a dense one's (a nested one raises at .shape)
        return tuple(None if a is None else (type(a), a.dtype, a.device, a.layout) for a in arrays)

    def check_layout(self, name: str, a: Array) -> None:
        if a.is_nested:
            raise TypeError(
                f"{name} is a nested tensor; batch_norm takes dense tensors: pad it "
                f"(torch.nested.to_padded_tensor) and pass mask= to leave the padding out of the statistics"
            )
        if a.layout != torch.strided:
            raise TypeError(
                f"{name} is a sparse tensor (layout {a.layout}); batch_norm takes dense tensors: pass {name}.to_dense()"
            )

    def device_of(self, a: Array) -> Any:
        return a.device  # not array_api_compat.device: its cached type tests make torch.compile warn

    def to_numpy(self, a: Array) -> np.ndarray:
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()

    def concrete(self, a: Array) -> bool:
        return not torch.compiler.is_compiling() and not _functorch.is_functorch_wrapped_tensor(a)

    def untracked(self) -> contextlib.AbstractContextManager:
        return torch.no_grad()

    def sync_group(self, sync: object) -> object:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync needs torch.distributed initialised: call torch.distributed.init_process_group")
        if sync is True:
            return None  # the default process group
        if isinstance(sync, dist.ProcessGroup):
            return sync
        raise TypeError(f"sync on the torch backend must be True or a torch.distributed.ProcessGroup, got {sync!r}")

    def gather_ints(self, values: tuple[int, ...], group: object) -> tuple[tuple[int, ...], ...]:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        return tuple(tuple(int(v) for v in t.tolist()) for t in every)

    def all_reduce_sum(self, a: Array, group: object) -> Array:
        import torch.distributed as dist

        if (torch.is_grad_enabled() and a.requires_grad) or _functorch.is_functorch_wrapped_tensor(a):
            raise NotImplementedError(
                "multibn.batch_norm(..., sync=...) on torch cannot be differentiated twice or under torch.func: "
                "torch.distributed.all_reduce has no derivative (first derivatives and forward-mode AD work)"
            )
        a = a.clone()
        dist.all_reduce(a, op=dist.ReduceOp.SUM, group=group)
        return a

    def blend(self, keep: Any, a: Array, take: Any, b: Array) -> Array:
        if isinstance(keep, float) and isinstance(take, float):
            return torch.add(a * keep, b, alpha=take)  # two ops instead of three
        return super().blend(keep, a, take, b)

    def reciprocal(self, a: Array) -> Array:
        return torch.reciprocal(a)  # what 1 / a runs, without its Python wrapper and its extra `* 1`

    def custom_op(self, make_rule: Callable[[Backend], Rule]) -> Callable[..., tuple[Array, ...]]:
        rule = make_rule(self)

        class BatchNormFunction(torch.autograd.Function):
            """Reverse mode by ``rule.backward``, forward mode by ``rule.jvp``, vmap by running both batched.

            The backward reads only saved inputs and statistics, through differentiable ops, so under
            ``create_graph`` autograd differentiates it again: through the outputs ``mean`` and ``m2`` that
            brings it back here with their cotangents, which ``rule.backward`` takes (exact double backward)."""

            generate_vmap_rule = True

            @staticmethod
            def forward(sync: Any, *inputs: Array) -> tuple[Array, ...]:  # type: ignore[override]
                return tuple(rule.forward(sync, *inputs))

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Array, ...]) -> None:
                ctx.set_materialize_grads(False)
                ctx.sync = inputs[0]
                ctx.n_inputs, ctx.n_outputs = len(inputs) - 1, len(output)
                # only the outputs the residuals read, not y: saving y would keep it alive and forbid in-place
                # ops on it (BN -> ReLU(inplace=True)), as native BN allows
                kept = tuple(output[i] for i in rule.kept)
                ctx.save_for_backward(*inputs[1:], *kept)
                ctx.save_for_forward(*inputs[1:], *kept)

            @staticmethod
            def backward(ctx: Any, *cotangents: Array | None) -> tuple[Array | None, ...]:  # type: ignore[override]
                if all(c is None for c in cotangents):
                    return (None,) * (ctx.n_inputs + 1)
                x = ctx.saved_tensors[0]
                cotangents = tuple(None if c is None else _dense_like(c, x) for c in cotangents)
                grads = rule.backward(residuals(ctx), cotangents)
                grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=False)]
                return (None, *grads, *([None] * (ctx.n_inputs - rule.n_diff)))

            @staticmethod
            def jvp(ctx: Any, *tangents: Array | None) -> tuple[Array, ...]:
                return tuple(rule.jvp(residuals(ctx), tangents[1:rule.n_diff + 1]))

        def residuals(ctx: Any) -> tuple[Array, ...]:
            saved = ctx.saved_tensors
            outputs: list[Array | None] = [None] * ctx.n_outputs
            for i, t in zip(rule.kept, saved[ctx.n_inputs :], strict=True):
                outputs[i] = t
            return rule.residuals(ctx.sync, saved[: ctx.n_inputs], tuple(outputs))

        # Function.apply binds the arguments to forward's signature on every call: give it the signature once
        BatchNormFunction.forward.__signature__ = inspect.signature(BatchNormFunction.forward)

        class CompiledBatchNormFunction(BatchNormFunction):
            jvp = staticmethod(torch.autograd.Function.jvp)  # torch.compile refuses a custom jvp: none when compiling

        def op(sync: Any, *inputs: Array) -> tuple[Array, ...]:
            if _plain(*inputs):  # nothing to differentiate: no autograd node, no saved tensors
                return tuple(rule.forward(sync, *inputs))
            fn = CompiledBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
            return tuple(fn.apply(sync, *inputs))

        return op

    # ---- fast kernels -------------------------------------------------------------------------------------------
    # The same quantities as the generic kernels, with at most one full-size tensor (the output) per call: x is
    # viewed as (P, C, Q) (channel axis in the middle) and streamed in chunks of about _CHUNK elements along P, so
    # every temporary fits in cache and is reused; reductions run over the contiguous Q axis, then over P (faster
    # than torch's sum over several axes). float16/bfloat16 chunks are first converted into a float32 buffer
    # (torch's mixed-dtype elementwise ops take a slow generic loop on CPU). Tensors that need autograd through the
    # kernels (create_graph), strided tensors and graphs being compiled (torch.compile fuses the generic ops
    # itself) take the generic path.
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: Any) -> Array:
        v = _channel_view(x, axes)
        if v is None:
            return super().channel_sum(x, axes, dtype)
        if v.dtype == dtype:
            return _reduce(v)
        acc = None
        for (xc,), buf in _chunks(dtype, v):
            acc = accumulate(acc, _reduce(buf.copy_(xc)))
        return acc

    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v = _channel_view(x, axes)
        if v is None or not _plain(center):
            return super().channel_dev_sums(x, center, axes)
        m = center.reshape(1, -1, 1)
        s1 = s2 = None
        for (xc,), buf in _chunks(center.dtype, v):
            _sub(xc, m, buf)
            s1 = accumulate(s1, _reduce(buf))
            s2 = accumulate(s2, _reduce_squares(buf))
        return s1, s2

    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        same = x.dtype == scale.dtype == shift.dtype and x.ndim == scale.ndim
        if not _plain(x, scale, shift) or x.ndim != scale.ndim:
            return super().scale_shift(x, scale, shift)
        axes = tuple(i for i in range(x.ndim) if scale.shape[i] == 1)
        # under _SMALL elements, 2-D x, a GPU (one fused op already), a strided x: one op, no temporary besides the
        # output (the (P, C, Q) view below pays only on larger tensors with Q > 1: see _expanded)
        v = _channel_view(x, axes) if x.ndim > 2 or not same else None
        if v is None:
            return torch.addcmul(shift, x, scale) if same else super().scale_shift(x, scale, shift)
        out = torch.empty_like(x)  # x's memory layout (channels_last stays channels_last)
        o = _channel_view(out, axes)
        scale, shift = _expanded(scale, v), _expanded(shift, v)
        if same:
            torch.addcmul(shift, v, scale, out=o)
            return out
        for (xc, oc), buf in _chunks(scale.dtype, v, o):
            torch.addcmul(shift, buf.copy_(xc), scale, out=buf)
            oc.copy_(buf)
        return out

    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        v, g = _channel_view(x, axes), _channel_view(dy, axes)
        if v is None or g is None or not _same_layout(dy, x) or not _plain(mean):
            return super().backward_sums(dy, x, mean, axes)
        m = mean.reshape(1, -1, 1)
        s1 = s2 = None
        gbuf = None if dy.dtype == mean.dtype else _buffer(mean.dtype, v)
        for (xc, gc), buf in _chunks(mean.dtype, v, g):
            gc = gc if gbuf is None else gbuf[: gc.shape[0]].copy_(gc)
            s1 = accumulate(s1, _reduce(gc))
            s2 = accumulate(s2, _reduce(_sub(xc, m, buf).mul_(gc)))
        return s1, s2

    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        axes = tuple(i for i in range(x.ndim) if mean.shape[i] == 1)
        one_dtype = dy.dtype == x.dtype == a.dtype
        v, g = (_channel_view(x, axes), _channel_view(dy, axes)) if x.ndim > 2 or not one_dtype else (None, None)
        if v is None or g is None or not _same_layout(dy, x) or not _plain(mean, a, b, c):
            if one_dtype and _plain(dy, x, mean, a, b, c):
                t = torch.sub(x, mean)  # the loop below in one piece: three ops, no temporary but the output
                return torch.addcmul(c, t, b, out=t).addcmul_(dy, a)
            return super().backward_apply(dy, x, mean, a, b, c)
        out = torch.empty_like(x)  # x's memory layout
        m = mean.reshape(1, -1, 1)
        a, b, c = (_expanded(t, v) for t in (a, b, c))
        same = x.dtype == a.dtype
        gbuf = None if dy.dtype == a.dtype else _buffer(a.dtype, v)
        for (xc, gc, oc), buf in _chunks(a.dtype, v, g, _channel_view(out, axes), need_buf=not same):
            t = oc if same else buf  # float32 output: work in the output itself, no scratch buffer
            gc = gc if gbuf is None else gbuf[: gc.shape[0]].copy_(gc)
            _sub(xc, m, t)
            torch.addcmul(c, t, b, out=t)  # c + (x - mean) * b
            t.addcmul_(gc, a)  # + dy * a
            if not same:
                oc.copy_(t)
        return out


#: elements per chunk: 16 MiB of float32, which stays in L3 between the ops of one chunk. Every op is an OpenMP
#: parallel region, and with other processes on the cores each region's barrier can wait a scheduler tick, so
#: fewer, larger chunks (fewer barriers) are the robust choice, even where smaller ones win on an idle machine.
_CHUNK = 1 << 22
_SMALL = 1 << 16


def _eligible(*ts: torch.Tensor) -> bool:
    """Whether the chunked kernels may run: plain CPU tensors, not under compile, not recorded by autograd, not
    wrapped by a torch.func transform or carrying forward-mode tangents (the generic ops handle those); the
    layout (contiguous, or channels last in memory) is :func:`_channel_view`'s to check."""
    # CPU only: on a GPU the generic kernels are already single fused passes and chunk loops only add launches;
    # tensors of under _SMALL elements: one generic op costs less Python than a chunk loop (checked first: cheapest)
    return all(t.numel() >= _SMALL and t.device.type == "cpu" for t in ts) and _plain(*ts)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and same strides: their (P, C, Q) views walk the same elements in the same order."""
    return a.shape == b.shape and a.stride() == b.stride()


def _dense_like(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A cotangent for the kernels: as it is when it has x's layout, else contiguous in x's memory format (a
    channels_last x gets a channels_last cotangent, as the layers after a channels_last BN give)."""
    if _same_layout(c, x):
        return c
    if c.shape == x.shape and x.ndim in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return c.contiguous(memory_format=fmt)
    return c.contiguous()


def _plain(*ts: torch.Tensor) -> bool:
    """No compile, no autograd recording, no torch.func wrapper, no forward-mode tangent on any of ``ts``."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    if any(map(_functorch.is_functorch_wrapped_tensor, ts)):
        return False
    return _fwd_level() < 0 or not any(map(_fwd_dual, ts))


def _fwd_dual(t: torch.Tensor) -> bool:
    """Whether ``t`` carries a forward-mode AD tangent."""
    return fwAD.unpack_dual(t).tangent is not None


def _fwd_level() -> int:
    return fwAD._current_level


def _channel_view(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor | None:
    """x as a (P, C, Q) view (:func:`_layout_view`) where the chunked kernels apply (:func:`_eligible`); else None."""
    if x.numel() < _SMALL or not _eligible(x):
        return None
    return _layout_view(x, axes)


def _layout_view(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor | None:
    """x as a (P, C, Q) view, C the one axis not reduced; None when x's layout has none. A contiguous x: its shape
    split around the channel axis; an x whose memory has the channel axis last (channels_last NCHW,
    channels_last_3d NCDHW, any permutation with the channel axis of stride 1 and the others dense in order):
    (elements / C, C, 1), the layout the Q = 1 kernels read row by row."""
    shape = channel_view_shape(x.shape, axes)
    if shape is None:
        return None
    if x.is_contiguous():
        return x.view(shape)
    ax = next(i for i in range(x.ndim) if i not in axes)
    last = x.permute(*(i for i in range(x.ndim) if i != ax), ax)
    return last.view(-1, shape[1], 1) if last.is_contiguous() else None


def _expanded(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector for elementwise ops on the (P, C, Q) view ``v``: (1, C, Q), each channel's value
    repeated along Q (one row of v, contiguous), so that the op broadcasts over the outer axis P only. torch's
    CPU addcmul with a (1, C, 1) operand broadcast along a short contiguous Q runs 3-4x slower than with the
    expanded row (measured at the ResNet stage shapes); Q = 1 (channels last) needs no expansion. Each expanded
    vector holds 1/P of x: only from ``_EXPAND_ROWS`` rows up (three of them in the backward: under a tenth of
    an activation), so that the peak memory stays that of the native BN."""
    t = t.reshape(1, -1, 1)
    if v.shape[2] == 1 or v.shape[0] < _EXPAND_ROWS:
        return t
    return t.expand(1, v.shape[1], v.shape[2]).contiguous()


#: the fewest rows P of a (P, C, Q) view for which :func:`_expanded` expands the per-channel vectors
_EXPAND_ROWS = 32


def _reduce(v: torch.Tensor) -> torch.Tensor:
    """Sum of a (p, C, Q) tensor over p and Q: the contiguous Q first, then p; with Q = 1 (channels last), rows in
    blocks (:func:`~multibn.backends._chunks.sum_rows`: faster than torch's sum over the outer axis)."""
    return v.sum(2).sum(0) if v.shape[2] != 1 else sum_rows(v.select(2, 0))


def _reduce_squares(buf: torch.Tensor) -> torch.Tensor:
    """Sum of the squares of a (p, C, Q) scratch buffer over p and Q (the buffer may be overwritten). Q > 1: the
    square of the 2-norm of each run along Q, one reduction that reads the run once where ``square_`` then ``sum``
    also wrote it (less memory traffic; one more rounding per run, still exactly 0 for zeros); Q = 1: squared in
    place and summed as :func:`_reduce` does (a norm across rows, a strided axis, is slower)."""
    if buf.shape[2] == 1:
        return _reduce(buf.square_())
    return torch.linalg.vector_norm(buf, dim=2).square_().sum(0)


def _sub(xc: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = xc - m`` in the dtype of ``out`` (converting a narrower xc first: the fast road on CPU)."""
    if xc.dtype == out.dtype:
        return torch.sub(xc, m, out=out)
    return out.copy_(xc).sub_(m)


def _elements(dtype: torch.dtype, v: torch.Tensor) -> int:
    """Elements per chunk of the (P, C, Q) tensor ``v`` worked on in ``dtype``. x narrower than the buffer
    (float16/bfloat16 into float32): a quarter of _CHUNK, so that the buffers (two in the backward) stay small
    beside one activation."""
    return _CHUNK if v.dtype.itemsize >= dtype.itemsize else _CHUNK // 4


#: this thread's scratch buffers, kept between calls: (dtype, device, slot) -> a flat tensor
_SCRATCH = threading.local()


def _kept(dtype: torch.dtype, device: torch.device, slot: int) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """``empty(shape)`` served from a flat buffer of this thread kept between calls (grown when too small).

    A fresh buffer of a megabyte or more costs its page faults at every call (glibc maps large blocks anew, or
    trims the heap they came from), which is several times the arithmetic written into it: the streaming ops of a
    mid-size BN (1 MiB) ran 10x slower into a fresh buffer than in place. So each thread keeps one buffer per
    dtype, device and slot (slot 1: the dy buffer of a backward beside the chunk buffer, slot 0), of at most one
    chunk (``_CHUNK`` elements, 16 MiB in float32), resident after the first call. No kernel returns a view of
    it, and kernels do not nest, so reusing it is safe; each thread has its own."""
    def empty(shape: tuple[int, ...]) -> torch.Tensor:
        bufs = _SCRATCH.__dict__.setdefault("bufs", {})
        n = math.prod(shape)
        buf = bufs.get((dtype, device, slot))
        if buf is None or buf.numel() < n:
            buf = bufs[(dtype, device, slot)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    return empty


def _buffer(dtype: torch.dtype, v: torch.Tensor) -> torch.Tensor:
    """A scratch buffer in ``dtype`` for one chunk of the (P, C, Q) tensor ``v`` (slot 1 of :func:`_kept`)."""
    return scratch(v.shape, _elements(dtype, v), _kept(dtype, v.device, 1))


def _chunks(dtype: torch.dtype, *vs: torch.Tensor, need_buf: bool = True
            ) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
    """Chunks along P of (P, C, Q) tensors of one shape, each time with a reused buffer in ``dtype`` of the chunk's
    shape (None without ``need_buf``; slot 0 of :func:`_kept`)."""
    return chunks(vs, _elements(dtype, vs[0]), _kept(dtype, vs[0].device, 0) if need_buf else None)
