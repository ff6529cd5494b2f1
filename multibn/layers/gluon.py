"""``BatchNorm``: an MXNet 1.9 Gluon block over :func:`multibn.batch_norm`, file-compatible with ``gluon.nn.BatchNorm``.

Its parameters are named as in ``mxnet.gluon.nn.BatchNorm`` (``gamma``, ``beta``, ``running_mean``,
``running_var``; the running ones with ``grad_req='null'``), so ``save_parameters``/``load_parameters`` files
interchange with it::

    from multibn.layers.gluon import BatchNorm
    bn = BatchNorm(16, 4)                 # textbook BatchNorm(num_features, num_dims): NCHW input
    bn.initialize()
    bn.load_parameters("native_bn.params")

The mode comes from ``mx.autograd.is_training()`` (True inside ``autograd.record()``), as in Gluon.

When the running statistics change (``update``):

* ``"forward"`` (default): in the training forward, as every other framework does;
* ``"backward"``: MXNet's own CPU timing: the statistics change only when a backward pass runs through the
  layer, each backward applying the update of its forward to the statistics of that moment. A training forward
  with no backward (outside ``autograd.record()``, or never followed by ``backward()``) leaves them unchanged;
  several forwards before one backward, or a second backward of a retained graph, chain their updates exactly as
  ``gluon.nn.BatchNorm`` does.

The block is a ``HybridBlock`` whose graph is one node, the operator ``multibn_batch_norm`` (registered by
``import multibn`` when MXNet is imported, and by importing this module): its forward and backward run
:mod:`multibn.algorithm` through the adapters (the NumPy adapter on zero-copy views of small CPU tensors, the
MXNet adapter otherwise); the running statistics are the node's auxiliary states, updated in place like
``gluon.nn.BatchNorm``'s. Hybridized or not, in ``HybridSequential`` or any ``HybridBlock``; ``net.export()``
writes that node, so a process that loads the exported symbol must ``import multibn`` first. Arrays of MXNet's
NumPy interface (``npx.set_np()``) work too and give ``mx.np`` arrays.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

from ..backends.mxnet import mx  # MXNet after the NumPy alias it needs
from ..conventions import Convention, resolve_convention
from ..moments import ChannelMoments
from . import _recompute, check_layer_args
from ._gluon_op import OP_TYPE, UPDATES, convention_attr, counter_of

autograd = mx.autograd
gluon = mx.gluon

__all__ = ["BatchNorm", "recompute_statistics"]

class BatchNorm(gluon.HybridBlock):
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Args:
        num_features: channels C, the size of the input along ``axis`` (``in_channels`` of ``gluon.nn.BatchNorm``).
        num_dims: the input rank the layer accepts, as in the textbook ``BatchNorm(num_features, num_dims)``:
            2 for (N, C) input, 4 for (N, C, H, W) input (any rank >= 2 may be named); None accepts any rank >= 2.
            Checked on imperative calls (a hybridized graph knows no ranks).
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"gluon"``: momentum 0.9 on the old value,
            eps 1e-5, biased running variance) or a :class:`multibn.Convention`.
        momentum, eps: override the convention's (None keeps them).
        affine: learn ``gamma`` and ``beta``. False normalises with gamma 1 and beta 0; the two parameters
            stay (ones and zeros, ``grad_req='null'``) so that files keep ``gluon.nn.BatchNorm``'s layout.
        axis: the channel axis of the input (1 by default; 3 or -1 for NHWC).
        update: ``"forward"`` or ``"backward"``, when the running statistics change (module docstring).
        prefix, params: as for every Gluon block.

    ``num_batches_tracked()`` counts the updates of the running statistics (it is not saved in parameter
    files; ``gluon.nn.BatchNorm`` has no such counter). It matters only for the cumulative-average
    convention ``torch_cma``.
    """

    def __init__(
        self,
        num_features: int,
        num_dims: int | None = None,
        *,
        convention: str | Convention = "gluon",
        momentum: float | None = None,
        eps: float | None = None,
        affine: bool = True,
        axis: int = 1,
        update: str = "forward",
        prefix: str | None = None,
        params: Any = None,
    ) -> None:
        super().__init__(prefix=prefix, params=params)
        check_layer_args(num_features, num_dims, axis)
        if update not in UPDATES:
            raise ValueError(f"update must be 'forward' or 'backward', got {update!r}")
        self.convention = resolve_convention(convention, momentum, eps)
        if num_dims is not None and not -num_dims <= axis < num_dims:
            raise ValueError(f"axis must be in [{-num_dims}, {num_dims}) for num_dims={num_dims}, got {axis}")
        self.num_features = num_features
        self.num_dims = num_dims
        self.momentum = self.convention.momentum
        self.eps = self.convention.eps
        self.affine = affine
        self.axis = axis
        self.update = update
        self._key = uuid.uuid4().hex
        self._attrs = {"convention": convention_attr(self.convention), "axis": str(axis), "update": update,
                       "key": self._key}
        learn = "write" if affine else "null"
        with self.name_scope():
            self.gamma = self.params.get("gamma", grad_req=learn, shape=(num_features,), init="ones",
                                         allow_deferred_init=True, differentiable=affine)
            self.beta = self.params.get("beta", grad_req=learn, shape=(num_features,), init="zeros",
                                        allow_deferred_init=True, differentiable=affine)
            self.running_mean = self._statistic("running_mean", "zeros")
            self.running_var = self._statistic("running_var", "ones")

    def _statistic(self, name: str, init: str) -> Any:
        kw = {"grad_req": "null", "shape": (self.num_features,), "init": init, "allow_deferred_init": True,
              "differentiable": False}
        full = self.params.prefix + name
        if self.update == "backward" and self.params._get_impl(full) is None:
            self.params._params[full] = _Statistic(self.gamma, full, **kw)
        return self.params.get(name, **kw)

    def cast(self, dtype: Any) -> None:
        # As gluon.nn.BatchNorm: float16 models keep float32 statistics and parameters.
        if np.dtype(dtype).name == "float16":
            dtype = "float32"
        super().cast(dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, num_dims={self.num_dims}, "
            f"convention={self.convention.name!r}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, axis={self.axis}, update={self.update!r})"
        )

    def num_batches_tracked(self, ctx: Any = None) -> Any:
        """The number of updates of the running statistics: an int64 NDArray of shape (1,), the layer's own on the
        CPU (writing to it sets the count), a copy on ``ctx`` otherwise."""
        if ctx is None:
            ctx = self.running_mean.list_ctx()[0]
        mx.nd.waitall()  # the operator counts in its callbacks, which MXNet runs asynchronously
        counter = counter_of(self._key)
        return counter if ctx == counter.context else counter.copyto(ctx)

    def forward(self, x: Any, *args: Any) -> Any:
        if isinstance(x, mx.nd.NDArray) and self.num_dims is not None and x.ndim != self.num_dims:
            raise ValueError(f"expected {self.num_dims}D input (got {x.ndim}D input)")
        return super().forward(x, *args)

    def hybrid_forward(self, F: Any, x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any) -> Any:
        """One graph node (the registered operator ``multibn_batch_norm``) that runs :mod:`multibn.algorithm`:
        training or eval by ``autograd.is_training()`` at run time, as ``gluon.nn.BatchNorm``."""
        np_arrays = _is_np(x)
        if np_arrays:  # MXNet's NumPy interface: the operator takes and gives legacy arrays on the same memory
            x, gamma, beta, running_mean, running_var = (
                a.as_nd_ndarray() for a in (x, gamma, beta, running_mean, running_var))
        # The operator's Python code must get x in MXNet's default layout. A convolution's output may be in one of
        # oneDNN's blocked layouts, which the operator's callback reads wrongly now and then; a reshape makes MXNet
        # reorder it first. The reshape is the identity (-2: every axis as it is), so that the operator's output
        # has the shape of x: no reshape back, which would copy y (and dy) in a hybridized graph.
        x = F.reshape(x, shape=(-2,))
        y = F.Custom(x, gamma, beta, running_mean, running_var, op_type=OP_TYPE, name="fwd", **self._attrs)
        return y.as_np_ndarray() if np_arrays else y


class _Statistic(gluon.Parameter):
    """A running statistic of a layer with ``update="backward"``: its arrays are handed out only once the backward
    passes in flight through the layer have written it.

    MXNet's engine does not know that a custom operator's backward writes its auxiliary states (``_backward_Custom``
    declares them as read), so a read pushed right after ``loss.backward()`` could overtake that write. The same
    backward writes the layer's ``gamma`` gradient, which the engine does track: waiting for that gradient (or for
    the whole engine, when gamma has none) orders the read. Later operators that take the statistics (the next
    forward, eval included) are ordered by MXNet itself.
    """

    def __init__(self, gamma: Any, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._gamma = gamma

    def _settle(self) -> None:
        g = self._gamma
        if g.grad_req != "null" and g._grad is not None:
            for a in g.list_grad():
                a.wait_to_read()
        else:
            mx.nd.waitall()

    def data(self, ctx: Any = None) -> Any:
        self._settle()
        return super().data(ctx)

    def list_data(self) -> list:
        self._settle()
        return super().list_data()


def _is_np(a: Any) -> bool:
    return isinstance(a, (mx.np.ndarray, mx.symbol.numpy._Symbol))


# ---- exact population statistics (multibn.layers._recompute has the definition) ------------------------------
def recompute_statistics(
    net: gluon.Block, batches: Iterable[Any], *, num_batches: int | None = None, progress: bool | TextIO = True,
    ctx: Any = None,
) -> gluon.Block:
    """Set every BN block's ``running_mean`` and ``running_var`` to the exact statistics of its training-mode
    inputs (:mod:`multibn.layers._recompute` has the definition).

    Args:
        net: a Gluon ``Block`` with initialised parameters. Its BN blocks are ``gluon.nn.BatchNorm`` (and its
            subclasses, ``contrib.nn.SyncBatchNorm`` among them) and :class:`BatchNorm`.
        batches, num_batches, progress: as for :func:`multibn.layers.torch.recompute_statistics`.
        ctx: copy each input to this context first (default: as given).

    The net runs in training mode, not recording (``autograd.pause(train_mode=True)``); hybridized blocks run
    imperatively for the duration (so that each BN block sees its input) and are hybridized again afterwards.
    Stored, on every context: ``mean`` and ``M2 / N`` (Gluon's biased variance), or ``M2 / (N - 1)`` for a
    multibn block with an unbiased convention. Every other parameter and the multibn block's update counter
    keep their values. Returns ``net``.
    """
    if not isinstance(net, gluon.Block):
        raise TypeError(f"net must be an mxnet.gluon.Block, got {type(net).__name__}")
    seen: dict[int, Any] = {}
    net.apply(lambda b: seen.setdefault(id(b), b))  # a block shared by several parents counts once
    blocks = list(seen.values())
    layers: dict[Any, tuple[str, int, bool]] = {}
    for b in blocks:
        if isinstance(b, BatchNorm):
            layers[b] = (b.name, b.axis, b.convention.unbiased_running_var)
        elif isinstance(b, gluon.nn.BatchNorm):
            layers[b] = (b.name, b._kwargs["axis"], False)
    if not layers:
        _recompute.warn_no_layers("the net has no batch-norm block (a SymbolBlock's layers are not blocks)")
        return net
    try:
        saved = {b: _snapshot(b) for b in layers}
    except gluon.parameter.DeferredInitializationError as e:
        raise ValueError(f"net's parameters are not initialised yet ({e}): initialise or load them first") from e
    moments = {b: ChannelMoments(axis) for b, (_, axis, _) in layers.items()}

    def capture(block: Any, inputs: tuple[Any, ...]) -> None:
        moments[block].partial_fit(inputs[0])

    def step(x: Any) -> None:
        if ctx is not None:
            x = x.as_in_context(ctx) if isinstance(x, mx.nd.NDArray) else mx.nd.array(x, ctx=ctx)
        net(x)

    hybrid = [b for b in blocks if isinstance(b, gluon.HybridBlock) and b._active]
    handles = [b.register_forward_pre_hook(capture) for b in layers]
    try:
        for b in hybrid:
            b._active = False  # imperative for the duration: a hybridized parent would skip its children's hooks
        with autograd.pause(train_mode=True):
            _recompute.run(batches, num_batches, progress, step)
    finally:
        for h in handles:
            h.detach()
        for b in hybrid:
            b._active = True  # the cached graph is still valid: the parameters were written in place
        for restore in saved.values():
            restore()
    for b, (_, _, unbiased) in layers.items():
        m = moments[b]
        if m.count > 0:
            b.running_mean.set_data(m.mean.astype(b.running_mean.dtype))
            b.running_var.set_data(_recompute.stored_variance(m.stats, unbiased).astype(b.running_var.dtype))
    _recompute.warn_unreached([name for b, (name, _, _) in layers.items() if moments[b].count == 0])
    mx.nd.waitall()
    return net


def _snapshot(block: Any) -> Callable[[], None]:
    """A function that puts back every parameter of ``block`` (on every context) and its update counter."""
    arrays = [a for p in block.collect_params().values() for a in p.list_data()]
    if isinstance(block, BatchNorm):  # multibn's block keeps a per-context counter outside its parameters
        arrays += [block.num_batches_tracked(c) for c in block.running_mean.list_ctx()]
    copies = [a.copy() for a in arrays]

    def restore() -> None:
        mx.nd.waitall()  # multibn's operator counts in callbacks MXNet runs later: let them land first
        for a, c in zip(arrays, copies, strict=True):
            a[:] = c

    return restore
