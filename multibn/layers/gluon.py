"""``BatchNorm``: an MXNet 1.9 Gluon block over :func:`multibn.batch_norm`, file-compatible with ``gluon.nn.BatchNorm``.

Its parameters are named as in ``mxnet.gluon.nn.BatchNorm`` (``gamma``, ``beta``, ``running_mean``,
``running_var``; the running ones with ``grad_req='null'``), so ``save_parameters``/``load_parameters`` files
interchange with it::

    from multibn.layers.gluon import BatchNorm
    bn = BatchNorm(16, 4)                 # textbook BatchNorm(num_features, num_dims): NCHW input
    bn.initialize()
    bn.load_parameters("native_bn.params")

It also takes ``gluon.nn.BatchNorm``'s arguments, as keywords (``BatchNorm()`` learns its channels from the first
input, as Gluon's deferred ``in_channels=0``; the class docstring has the rule that tells the two forms apart), and
every other name of ``mxnet.gluon.nn`` is reached through this module, so a model written against
``from mxnet.gluon import nn`` runs on multibn's layer with that one import changed to
``from multibn.layers import gluon as nn``.

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

The BN variants take Keras's names, as the other layers: ``renorm=True`` (with ``renorm_clipping``,
``renorm_momentum``) is batch renormalisation, its extra statistics kept as the parameters ``running_std``,
``renorm_mean``, ``renorm_std`` (``grad_req='null'``, saved by ``save_parameters``); ``virtual_batch_size=k`` is
ghost batch norm in training. Eval is plain BN with ``running_mean``/``running_var`` under both::

    bn = BatchNorm(16, 4, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    ghost = BatchNorm(16, 4, virtual_batch_size=8)
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

from ..backends.mxnet import mx  # MXNet after the NumPy alias it needs
from ..conventions import Convention, resolve_convention
from ..moments import ChannelMoments
from ..variants import check_renorm_momentum, check_virtual_batch_size, combinations_refused, parse_renorm
from . import _recompute, check_layer_args
from ._gluon_op import OP_TYPE, UPDATES, convention_attr, counter_of, renorm_attr

autograd = mx.autograd
gluon = mx.gluon

__all__ = ["BatchNorm", "recompute_statistics"]

class BatchNorm(gluon.HybridBlock):
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Two ways to call it, told apart by ``num_features``, the first positional argument: given, it is the textbook
    ``BatchNorm(num_features, num_dims)``; not given, it is ``gluon.nn.BatchNorm``, whose arguments (``axis,
    momentum, epsilon, center, scale, use_global_stats, beta_initializer, gamma_initializer,
    running_mean_initializer, running_variance_initializer, in_channels``) are all accepted as keywords, with
    Gluon's meanings and defaults, in both forms. So ``nn.BatchNorm()`` learns its channels at the first forward
    (Gluon's deferred initialisation, ``in_channels=0``) and ``nn.BatchNorm(axis=3, epsilon=1e-3, center=False)``
    works as in Gluon. Gluon's arguments are keywords only: ``gluon.nn.BatchNorm(1, 0.9)`` (axis, momentum given
    by position) is refused with that hint, since the textbook form reads it as ``num_features=1``.

    Args:
        num_features: channels C, the size of the input along ``axis``; None (and ``in_channels`` 0): learnt from
            the first input, as Gluon's ``in_channels=0``.
        num_dims: the input rank the layer accepts, as in the textbook ``BatchNorm(num_features, num_dims)``:
            2 for (N, C) input, 4 for (N, C, H, W) input (any rank >= 2 may be named); None accepts any rank >= 2.
            Checked on imperative calls (a hybridized graph knows no ranks).
        axis, momentum, epsilon, beta_initializer, gamma_initializer, running_mean_initializer,
            running_variance_initializer, in_channels: as in ``gluon.nn.BatchNorm`` (momentum weighs the old value
            under the default convention; None keeps the convention's). ``in_channels`` is ``num_features``.
        center: False keeps ``beta`` at its initial value (``grad_req='null'``); it is still added, as in Gluon.
        scale: False fixes gamma to 1 (MXNet's ``fix_gamma``; ``gamma`` gets ``grad_req='null'``). MXNet also
            writes 1 into the stored ``gamma`` at each forward; multibn leaves the stored value as it is.
        use_global_stats: True normalises with the running statistics in training too (their gradients included)
            and never moves them, as Gluon.
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"gluon"``: momentum 0.9 on the old value,
            eps 1e-5, biased running variance) or a :class:`multibn.Convention`.
        eps: ``epsilon`` by its multibn name (give one of the two).
        affine: learn ``gamma`` and ``beta``. False normalises with gamma 1 and beta 0; the two parameters
            stay (ones and zeros, ``grad_req='null'``) so that files keep ``gluon.nn.BatchNorm``'s layout.
        update: ``"forward"`` or ``"backward"``, when the running statistics change (module docstring).
        renorm, renorm_clipping, renorm_momentum: batch renormalisation, with Keras's names and meanings
            (:func:`multibn.batch_norm`'s ``renorm=``); the layer then also keeps the parameters ``running_std``
            (init 1), ``renorm_mean`` (0) and ``renorm_std`` (1), ``grad_req='null'``, which move with the running
            statistics (``running_mean``/``running_var`` stay the inference statistics). Not with
            ``use_global_stats`` (it needs the batch statistics and moving running ones).
        virtual_batch_size: ghost batch norm in training, sub-batches of this many samples along axis 0 (it must
            divide the batch, and the channel axis must not be 0); not with ``renorm`` nor ``use_global_stats``.
        prefix, params: as for every Gluon block.

    ``num_batches_tracked()`` counts the updates of the running statistics (it is not saved in parameter
    files; ``gluon.nn.BatchNorm`` has no such counter). It matters only for the cumulative-average
    convention ``torch_cma``.
    """

    def __init__(
        self,
        num_features: int | None = None,
        num_dims: int | None = None,
        *,
        axis: int = 1,
        momentum: float | None = None,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        use_global_stats: bool = False,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        running_mean_initializer: Any = "zeros",
        running_variance_initializer: Any = "ones",
        in_channels: int = 0,
        convention: str | Convention = "gluon",
        eps: float | None = None,
        affine: bool = True,
        update: str = "forward",
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        prefix: str | None = None,
        params: Any = None,
    ) -> None:
        super().__init__(prefix=prefix, params=params)
        if isinstance(num_dims, float):
            raise TypeError(
                f"num_dims must be None or an int (the input rank), got float {num_dims!r}; gluon.nn.BatchNorm's "
                "positional arguments (axis, momentum, epsilon, ...) are keywords here: BatchNorm(axis=1, momentum=0.9)"
            )
        channels = _channels(num_features, in_channels)
        check_layer_args(channels or 1, num_dims, axis)
        if update not in UPDATES:
            raise ValueError(f"update must be 'forward' or 'backward', got {update!r}")
        if epsilon is not None and eps is not None and epsilon != eps:
            raise ValueError(f"epsilon and eps are the same argument: give one, got epsilon={epsilon!r}, eps={eps!r}")
        conv = resolve_convention(convention, momentum, eps if epsilon is None else epsilon)
        self.convention = conv if scale else dataclasses.replace(conv, fix_gamma=True)
        if num_dims is not None and not -num_dims <= axis < num_dims:
            raise ValueError(f"axis must be in [{-num_dims}, {num_dims}) for num_dims={num_dims}, got {axis}")
        self.num_dims = num_dims
        self.momentum = self.convention.momentum
        self.eps = self.convention.eps
        self.affine = affine
        self.center, self.scale, self.use_global_stats = center, scale, bool(use_global_stats)
        self.axis = axis
        self.update = update
        self._set_variants(renorm, renorm_clipping, renorm_momentum, virtual_batch_size)
        self._key = uuid.uuid4().hex
        self._attrs = {"convention": convention_attr(self.convention), "axis": str(axis), "update": update,
                       "key": self._key, "use_global_stats": str(self.use_global_stats)}
        if self.renorm:  # attributes only where set: graphs of plain layers stay as they were
            self._attrs.update(renorm=renorm_attr(self._renorm), renorm_momentum=repr(self.renorm_momentum))
        if self.virtual_batch_size:
            self._attrs["virtual_batch_size"] = str(self.virtual_batch_size)
        shape = (channels,)  # (0,): deferred, the operator infers C from the first input
        with self.name_scope():
            self.gamma = self.params.get(
                "gamma", grad_req="write" if affine and scale else "null", shape=shape,
                init=gamma_initializer if affine else "ones", allow_deferred_init=True,
                differentiable=affine and scale)
            self.beta = self.params.get(
                "beta", grad_req="write" if affine and center else "null", shape=shape,
                init=beta_initializer if affine else "zeros", allow_deferred_init=True,
                differentiable=affine and center)
            self.running_mean = self._statistic("running_mean", running_mean_initializer, shape)
            self.running_var = self._statistic("running_var", running_variance_initializer, shape)
            if self.renorm:
                self.running_std = self._statistic("running_std", "ones", shape)
                self.renorm_mean = self._statistic("renorm_mean", "zeros", shape)
                self.renorm_std = self._statistic("renorm_std", "ones", shape)

    def _set_variants(self, renorm: bool, clipping: dict[str, float] | None, momentum: float, k: int | None) -> None:
        """Check and keep the BN variants' arguments; ValueError/TypeError as :func:`multibn.batch_norm` for the
        same values and combinations, and for either with ``use_global_stats``."""
        if not isinstance(renorm, bool):
            raise TypeError(f"renorm must be a bool (the clipping goes in renorm_clipping), got {renorm!r}")
        self._renorm = parse_renorm({} if clipping is None else clipping) if renorm else None
        self.renorm, self.renorm_clipping = renorm, dict(clipping or {})
        self.renorm_momentum = check_renorm_momentum(momentum)
        self.virtual_batch_size = check_virtual_batch_size(k)
        if k is not None and self.axis == 0:
            raise ValueError("virtual_batch_size splits the batch axis 0, so the channel axis must not be 0, got "
                             "axis=0")
        if why := combinations_refused(self._renorm, self.virtual_batch_size, False, False):
            raise ValueError(f"refused: {why}")
        if self.use_global_stats and (renorm or k is not None):
            raise ValueError(
                f"{'renorm=True' if renorm else f'virtual_batch_size={k}'} with use_global_stats=True: the variant "
                "needs the batch statistics in training and running statistics that move, use_global_stats uses "
                "neither (give one of the two)")

    @property
    def num_features(self) -> int:
        """C, the channels: 0 until a layer made without them has seen its first input (Gluon's ``in_channels``)."""
        shape = self.gamma.shape
        return int(shape[0]) if shape else 0

    def _statistic(self, name: str, init: Any, shape: tuple[int]) -> Any:
        kw = {"grad_req": "null", "shape": shape, "init": init, "allow_deferred_init": True,
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
        gluon_args = "".join(f", {k}={v}" for k, v, default in (
            ("center", self.center, True), ("scale", self.scale, True),
            ("use_global_stats", self.use_global_stats, False), ("renorm", self.renorm, False),
            ("renorm_clipping", self.renorm_clipping, {}), ("renorm_momentum", self.renorm_momentum, 0.99),
            ("virtual_batch_size", self.virtual_batch_size, None)) if v != default)
        return (
            f"{type(self).__name__}({self.num_features}, num_dims={self.num_dims}, "
            f"convention={self.convention.name!r}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, axis={self.axis}, update={self.update!r}{gluon_args})"
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
        k = self.virtual_batch_size
        if (k is not None and isinstance(x, mx.nd.NDArray) and autograd.is_training() and x.ndim
                and x.shape[0] % k):  # before the graph runs: the operator's callback cannot raise cleanly
            raise ValueError(f"virtual_batch_size={k} must divide the batch size, x.shape[0] = {x.shape[0]} "
                             f"(x of shape {tuple(x.shape)})")
        return super().forward(x, *args)

    def hybrid_forward(self, F: Any, x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                       running_std: Any = None, renorm_mean: Any = None, renorm_std: Any = None) -> Any:
        """One graph node (the registered operator ``multibn_batch_norm``) that runs :mod:`multibn.algorithm`:
        training or eval by ``autograd.is_training()`` at run time, as ``gluon.nn.BatchNorm``."""
        arrays = [x, gamma, beta, running_mean, running_var]
        if self.renorm:  # the renorm statistics: the node's last auxiliary states
            arrays += [running_std, renorm_mean, renorm_std]
        np_arrays = _is_np(x)
        if np_arrays:  # MXNet's NumPy interface: the operator takes and gives legacy arrays on the same memory
            arrays = [a.as_nd_ndarray() for a in arrays]
        x = arrays[0]
        # The operator's Python code must get x in MXNet's default layout. A convolution's output may be in one of
        # oneDNN's blocked layouts, which the operator's callback reads wrongly now and then; a reshape makes MXNet
        # reorder it first. The reshape is the identity (-2: every axis as it is), so that the operator's output
        # has the shape of x: no reshape back, which would copy y (and dy) in a hybridized graph.
        x = F.reshape(x, shape=(-2,))
        y = F.Custom(x, *arrays[1:], op_type=OP_TYPE, name="fwd", **self._attrs)
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


def _channels(num_features: int | None, in_channels: int) -> int:
    """C from the textbook's ``num_features`` or Gluon's ``in_channels`` (0: deferred); ValueError if they differ."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 0:
        raise ValueError(
            f"in_channels must be a non-negative int (0: learnt from the first input), got {in_channels!r}")
    if num_features is None:
        return in_channels
    check_layer_args(num_features, None, 1)
    if in_channels not in (0, num_features):
        raise ValueError(f"num_features and in_channels are the same argument: give one, got num_features="
                         f"{num_features!r}, in_channels={in_channels!r}")
    return num_features


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
            var = _recompute.stored_variance(m.stats, unbiased)
            b.running_mean.set_data(m.mean.astype(b.running_mean.dtype))
            b.running_var.set_data(var.astype(b.running_var.dtype))
            if getattr(b, "renorm", False) is True:  # renorm derives running_var from running_std: keep them agreeing
                b.running_std.set_data(((var + b.eps) ** 0.5).astype(b.running_std.dtype))
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


def __getattr__(name: str) -> Any:
    """Every other name of ``mxnet.gluon.nn``, so that ``from multibn.layers import gluon as nn`` in place of
    ``from mxnet.gluon import nn`` runs a model's code unchanged, its ``nn.BatchNorm`` being multibn's."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(gluon.nn, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has mxnet.gluon.nn)") from None
