"""The Gluon layer's graph operator: one batch-norm node for hybridized Gluon blocks and exported symbols.

:class:`multibn.layers.gluon.BatchNorm` is a ``HybridBlock`` whose graph is one node, ``F.Custom(...,
op_type=OP_TYPE)``: this operator, registered with MXNet when this module is imported (by the layer, and by
``import multibn`` when MXNet is loaded, so that a process loading an exported symbol finds it). Its forward and
backward run :mod:`multibn.algorithm` through the adapters: on the CPU the NumPy adapter on zero-copy views of
the node's buffers (:class:`_HostBackend`), elsewhere the MXNet adapter. The running statistics are the node's
auxiliary states, updated in place like ``gluon.nn.BatchNorm``'s; ``num_batches_tracked`` is a per-layer counter
kept here (:func:`counter_of`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import algorithm as alg
from ..backends import get_backend
from ..backends._chunks import chunk_slices
from ..backends.base import Array
from ..backends.mxnet import _Destination, _host_view, _legacy, mx  # MXNet after the NumPy alias it needs
from ..backends.numpy import NumpyBackend
from ..conventions import Convention
from ..state import BNState

#: the registered name of the operator (``F.Custom(..., op_type=OP_TYPE)``); an exported symbol names it, so a
#: process loading that symbol must import multibn first (which registers it)
OP_TYPE = "multibn_batch_norm (registered by: import multibn)"
#: contexts on which the operator runs the algorithm on the NumPy adapter over zero-copy views of its buffers: no
#: MXNet engine push per array operation (each push is a fixed cost, paid per operator). Elsewhere (GPU) it runs on
#: MXNet's operators, waiting for them before its callback returns. On the CPU that second road is slower (it pays
#: the engine pushes the host road avoids) and unsafe for inputs in oneDNN's blocked layouts, which MXNet hands the
#: callback as temporary copies (the layer's reshape avoids them; a hand-built symbol may not).
HOST_DEVICES = ("cpu",)
#: when the running statistics change: in the training forward, or in the backward (MXNet's CPU timing)
UPDATES = ("forward", "backward")
_counters: dict[str, Array] = {}
_UPDATE_LOCK = threading.Lock()


def counter_of(key: str) -> Array:
    """The ``num_batches_tracked`` of the operator nodes that carry ``key``: an int64 NDArray of shape (1,) on the
    CPU, shared by them (and advanced in their callbacks, which MXNet runs asynchronously)."""
    if key not in _counters:
        counter = mx.nd.zeros((1,), ctx=mx.cpu(), dtype="int64")
        counter.wait_to_read()  # allocated and zeroed before a callback writes to it
        _counters[key] = counter
    return _counters[key]



def convention_attr(conv: Convention) -> str:
    """A convention as the string attribute a graph node stores (JSON of its fields)."""
    return json.dumps({k: v for k, v in dataclasses.asdict(conv).items() if k != "reproduces"}, sort_keys=True)


def _convention_from_attr(text: str) -> Convention:
    return Convention(**json.loads(text))


class _HostBackend(NumpyBackend):
    """The NumPy adapter for the graph operator: the full-size result of a call (y, dx) goes straight into the buffer
    MXNet gave the operator for it (a host view, named by ``destination``) instead of a new array then copied.
    The NumPy kernels run on chunks of rows along the first axis and each chunk is copied into the destination while
    in cache: the same operations on every element, a chunk-size temporary instead of a full-size one."""

    #: where the full-size ``scale_shift`` or ``backward_apply`` writes (a host view of MXNet's buffer), when named
    destination: _Destination = _Destination()

    def _into(self, x: np.ndarray, per_channel: np.ndarray, kernel: Callable[..., np.ndarray], *args: np.ndarray
              ) -> np.ndarray | None:
        """``kernel`` over chunks of rows of the full-size ``args`` (x among them) into the destination; None when
        there is none for ``x`` (or the channels are along the first axis, so that rows cannot be chunked)."""
        if x.ndim < 2 or per_channel.shape[0] != 1:
            return None
        view = self.destination.take(x)
        if view is None:
            return None
        _, slices = chunk_slices((x.shape[0], 1, x.size // x.shape[0]), HOST_CHUNK)
        for sl in slices:
            np.copyto(view[sl], kernel(*(a[sl] if a.shape == x.shape else a for a in args)))
        return view

    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        out = self._into(x, scale, super().scale_shift, x, scale, shift)
        return super().scale_shift(x, scale, shift) if out is None else out

    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        out = self._into(x, mean, super().backward_apply, dy, x, mean, a, b, c) if dy.shape == x.shape else None
        return super().backward_apply(dy, x, mean, a, b, c) if out is None else out


#: elements per chunk of the graph operator's results on the host (1 MiB of float32: small temporaries)
HOST_CHUNK = 1 << 18
_HOST = _HostBackend()


class _GraphBatchNorm(mx.operator.CustomOp):
    """The batch-norm node: ``forward`` and ``backward`` run :mod:`multibn.algorithm` (train or eval, by MXNet's
    ``is_train``), the running statistics are the node's auxiliary states, written in place at the forward or, under
    ``update="backward"``, at the backward (MXNet's CPU timing: each backward applies the update of its forward to
    the statistics of that moment, so several forwards before one backward chain their updates as in MXNet)."""

    def __init__(self, conv: Convention, axis: int, update: str, key: str, shapes: list, dtypes: list,
                 host: bool) -> None:
        super().__init__()
        self.conv, self.update, self.key = conv, update, key
        self.lay = alg.Layout.of(tuple(shapes[0]), axis)
        self.shapes = [tuple(s) for s in shapes]
        self.dtypes = [np.dtype(mx.ndarray.ndarray._DTYPE_MX_TO_NP[d]) for d in dtypes]
        self.host = host
        self.be = _HOST if host else get_backend("mxnet")
        norm = alg.Norm.of(conv)
        self.rules = {True: alg.train_rule(self.be, norm, axis), False: alg.eval_rule(self.be, norm, axis)}

    def _arrays(self, arrays: Sequence[Array], index: Sequence[int]) -> list[Array]:
        if self.host:
            return [_host_view(a, self.shapes[i], self.dtypes[i]) for a, i in zip(arrays, index, strict=True)]
        return [_legacy(a) for a in arrays]

    def _store(self, dst: Array, req: str, value: Array, i: int) -> None:
        if req == "null":
            return
        if self.host:
            view = _host_view(dst, self.shapes[i], self.dtypes[i])
            if value.ctypes.data == view.ctypes.data and value.shape == view.shape and value.dtype == view.dtype:
                return  # written in place by the kernel (``_writing_to``)
            if req == "add":
                view += value
            else:
                np.copyto(view, value, casting="unsafe")
            return
        dst = _legacy(dst)
        if req == "add":
            mx.nd.elemwise_add(dst, value.astype(dst.dtype, copy=False), out=dst)
        else:
            value.astype(dst.dtype, copy=False).copyto(dst)

    def _writing_to(self, dst: Array, req: str, i: int) -> contextlib.AbstractContextManager:
        """On the host, a context in which the kernels write the full-size result into ``dst`` itself (request
        "write" or "inplace"; MXNet's buffer is in the default layout and ready in the callback)."""
        if not self.host or req not in ("write", "inplace"):
            return contextlib.nullcontext()
        return self.be.destination.writing_to(_host_view(dst, self.shapes[i], self.dtypes[i]))

    def _state(self, aux: Sequence[Array]) -> BNState:
        rmean, rvar = self._arrays(aux, (3, 4))
        t = counter_of(self.key)
        return BNState(rmean, rvar, _host_view(t, (1,), np.dtype(np.int64)) if self.host else t.as_in_context(
            rmean.context))

    def _update(self, aux: Sequence[Array], stats: alg.Stats) -> None:
        # MXNet may run the backward nodes of two calls of one layer at once, on two threads, and does not order
        # their writes to the statistics: the read-update-write is made atomic here (and finished before the lock
        # is released on the MXNet path), so every update lands, applied to the statistics of its moment.
        with _UPDATE_LOCK:
            new = alg.update_state(self.be, self.conv, self._state(aux), stats)
            for dst, value, i in ((aux[0], new.running_mean, 3), (aux[1], new.running_var, 4)):
                self._store(dst, "write", value, i)
            if not self.host:
                for dst in aux:
                    dst.wait_to_read()
            t = counter_of(self.key)  # an MXNet batch is never empty: update_state counted it
            if self.host:
                _host_view(t, (1,), np.dtype(np.int64))[0] += 1
            else:
                t[:] += 1

    def forward(self, is_train: bool, req: list, in_data: list, out_data: list, aux: list) -> None:
        inputs = tuple(self._arrays(in_data, (0, 1, 2)))
        self.train = bool(is_train)
        rule = self.rules[self.train]
        with self.be.quiet(), self._writing_to(out_data[0], req[0], 0):
            if self.train:
                y, mean, m2 = outputs = tuple(rule.forward(None, *inputs))
                self.residuals = rule.residuals(None, inputs, outputs)
                stats = alg.Stats(self.lay.count, mean, m2)
                if self.update == "forward":
                    self._update(aux, stats)
                else:
                    self.stats = stats
            else:
                state = self._state(aux)
                inputs += (state.running_mean, state.running_var)
                (y,) = outputs = tuple(rule.forward(None, *inputs))
                self.residuals = rule.residuals(None, inputs, outputs)
        self._store(out_data[0], req[0], y, 0)
        self._settle(out_data[:1], [r for r in self.residuals if hasattr(r, "wait_to_read")])

    def backward(self, req: list, out_grad: list, in_data: list, out_data: list, in_grad: list, aux: list) -> None:
        x, gamma = self._arrays(in_data[:2], (0, 1))
        (dy,) = self._arrays(out_grad[:1], (0,))
        residuals = self.residuals._replace(x=x, gamma=gamma)  # the backward's own views of the inputs
        with self.be.quiet(), self._writing_to(in_grad[0], req[0], 0):
            if self.train:
                grads = self.rules[True].backward(residuals, (dy, None, None))
                if self.update == "backward":
                    self._update(aux, self.stats)
            else:
                grads = self.rules[False].backward(residuals, (dy,))[:3]
        for i, (dst, r, g) in enumerate(zip(in_grad, req, grads, strict=True)):
            self._store(dst, r, g, i)
        self._settle(in_grad)

    def _settle(self, *groups: Sequence[Array]) -> None:
        """On the MXNet path, wait for the operators pushed here: MXNet may hand the callback temporary copies of
        the inputs (oneDNN layouts reordered to the default one) that it frees when the callback returns, and it
        waits only for writes to the outputs, not for reads of the inputs."""
        if not self.host:
            for group in groups:
                for a in group:
                    a.wait_to_read()


@mx.operator.register(OP_TYPE)
class _GraphBatchNormProp(mx.operator.CustomOpProp):
    """Inputs ``data, gamma, beta``; auxiliary states ``moving_mean, moving_var``; output ``output``.

    Attributes (strings in the graph): ``convention`` (JSON, :func:`convention_attr`), ``axis``, ``update``
    (``"forward"`` or ``"backward"``) and ``key`` (which ``num_batches_tracked`` counter the node advances)."""

    def __init__(self, convention: str, axis: str = "1", update: str = "forward", key: str = "") -> None:
        super().__init__(need_top_grad=True)
        if update not in UPDATES:
            raise ValueError(f"update must be 'forward' or 'backward', got {update!r}")
        self.conv = _convention_from_attr(convention)
        self.axis, self.update, self.key = int(axis), update, key

    def list_arguments(self) -> list[str]:
        return ["data", "gamma", "beta"]

    def list_outputs(self) -> list[str]:
        return ["output"]

    def list_auxiliary_states(self) -> list[str]:
        return ["moving_mean", "moving_var"]

    def infer_shape(self, in_shape: list) -> tuple[list, list, list]:
        x = in_shape[0]
        c = (x[self.axis],)
        return [x, c, c], [x], [c, c]

    def infer_type(self, in_type: list) -> tuple[list, list, list]:
        p = in_type[1] if in_type[1] is not None else np.float32
        return [in_type[0], p, p], [in_type[0]], [p, p]

    def declare_backward_dependency(self, out_grad: list, in_data: list, out_data: list) -> list:
        return [out_grad[0], in_data[0], in_data[1]]

    def create_operator(self, ctx: Any, shapes: list, dtypes: list) -> _GraphBatchNorm:
        host = ctx.device_type in HOST_DEVICES
        return _GraphBatchNorm(self.conv, self.axis, self.update, self.key, shapes, dtypes, host)


