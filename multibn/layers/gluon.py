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
* ``"backward"``: MXNet's own CPU timing (``shared/bn-semantics.md`` §1.1): the statistics change only when a
  backward pass runs through the layer. A training forward with no backward (outside ``autograd.record()``,
  or never followed by ``backward()``) leaves them unchanged. The values written are those the forward
  computed from the statistics it saw, so a training loop (one forward, one backward per step) reproduces
  ``gluon.nn.BatchNorm`` step for step. Where MXNet chains updates and this layer does not: several forwards
  through the layer before one backward, or a second backward of a retained graph, write the value of one
  forward (MXNet applies one update per forward, per backward, each from the statistics of the moment).

The block computes nothing itself: the forward calls :func:`multibn.batch_norm` (differentiable through its
``mx.autograd.Function``) and writes the returned running statistics into the parameters. It is a
``gluon.Block`` (imperative NDArray code), so it cannot sit inside a hybridized ``HybridBlock``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..api import batch_norm
from ..backends.mxnet import mx  # imports MXNet 1.9 after restoring the NumPy alias it needs
from ..conventions import Convention, resolve_convention
from ..recompute import recompute_statistics_gluon as recompute_statistics
from ..state import BNState
from . import check_layer_args

autograd = mx.autograd
gluon = mx.gluon

__all__ = ["BatchNorm", "recompute_statistics"]

_UPDATES = ("forward", "backward")


class _UpdateOnBackward(autograd.Function):
    """Identity on ``y`` whose backward writes the pending running statistics: MXNet's backward-time update.

    The statistics cannot be written by a side effect of ``backward``: MXNet runs it later, on an engine
    thread, so a read of the statistics right after ``loss.backward()`` would race with the write. Instead the
    pending values are autograd variables whose gradient buffers are the running-statistics arrays themselves
    (``autograd.mark_variables``), and ``backward`` returns the pending values as their "gradients": MXNet's
    engine then orders the write like any gradient write, before every later read.
    """

    def __init__(self, pending: BNState) -> None:
        super().__init__()
        self._pending = pending

    def forward(self, *inputs: Any) -> Any:
        y = inputs[-1]
        return y.reshape(y.shape)  # a new handle on the same memory (MXNet refuses to return an input)

    def backward(self, dy: Any) -> tuple[Any, ...]:
        # The pending values come first: MXNet 1.9's Function stops writing gradients at the first input
        # whose gradient is not requested, and y's may not be.
        return (*self._pending, dy)


class BatchNorm(gluon.Block):
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Args:
        num_features: channels C, the size of the input along ``axis`` (``in_channels`` of ``gluon.nn.BatchNorm``).
        num_dims: the input rank the layer accepts, as in the textbook ``BatchNorm(num_features, num_dims)``:
            2 for (N, C) input, 4 for (N, C, H, W) input (any rank >= 2 may be named); None accepts any rank >= 2.
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"gluon"``: momentum 0.9 on the old value,
            eps 1e-5, biased running variance) or a :class:`multibn.Convention`.
        momentum, eps: override the convention's (None keeps them).
        affine: learn ``gamma`` and ``beta``. False normalises with gamma 1 and beta 0; the two parameters
            stay (ones and zeros, ``grad_req='null'``) so that files keep ``gluon.nn.BatchNorm``'s layout.
        axis: the channel axis of the input (1 by default; 3 or -1 for NHWC).
        update: ``"forward"`` or ``"backward"``, when the running statistics change (module docstring).
        prefix, params: as for every Gluon block.

    ``num_batches_tracked(ctx)`` counts the updates of the running statistics (it is not saved in parameter
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
        if update not in _UPDATES:
            raise ValueError(f"update must be 'forward' or 'backward', got {update!r}")
        self.convention = resolve_convention(convention, momentum, eps)
        self.num_features = num_features
        self.num_dims = num_dims
        self.momentum = self.convention.momentum
        self.eps = self.convention.eps
        self.affine = affine
        self.axis = axis
        self.update = update
        self._tracked: dict[Any, Any] = {}
        learn = "write" if affine else "null"
        with self.name_scope():
            self.gamma = self.params.get("gamma", grad_req=learn, shape=(num_features,), init="ones",
                                         allow_deferred_init=True, differentiable=affine)
            self.beta = self.params.get("beta", grad_req=learn, shape=(num_features,), init="zeros",
                                        allow_deferred_init=True, differentiable=affine)
            self.running_mean = self.params.get("running_mean", grad_req="null", shape=(num_features,),
                                                init="zeros", allow_deferred_init=True, differentiable=False)
            self.running_var = self.params.get("running_var", grad_req="null", shape=(num_features,),
                                               init="ones", allow_deferred_init=True, differentiable=False)

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

    # ---- state ------------------------------------------------------------------------------------------------
    def num_batches_tracked(self, ctx: Any = None) -> Any:
        """The update counter on ``ctx`` (default: the parameters' first context), an int64 NDArray of shape (1,)."""
        if ctx is None:
            ctx = self.running_mean.list_ctx()[0]
        if ctx not in self._tracked:
            self._tracked[ctx] = mx.nd.zeros((1,), ctx=ctx, dtype="int64")
        return self._tracked[ctx]

    def _state(self, ctx: Any) -> BNState:
        return BNState(self.running_mean.data(ctx), self.running_var.data(ctx), self.num_batches_tracked(ctx))

    def _write(self, ctx: Any, new: BNState) -> None:
        with autograd.pause():
            for dst, src in zip(self._state(ctx), new, strict=True):
                dst[:] = src

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Any) -> Any:
        if self.num_dims is not None and x.ndim != self.num_dims:
            raise ValueError(f"expected {self.num_dims}D input (got {x.ndim}D input)")
        ctx = x.context
        training = autograd.is_training()
        state = self._state(ctx)
        gamma = self.gamma.data(ctx) if self.affine else None
        beta = self.beta.data(ctx) if self.affine else None
        y, new = batch_norm(x, gamma, beta, state, training=training, convention=self.convention, axis=self.axis,
                            backend="mxnet")
        if not training:
            return y
        if self.update == "forward":
            self._write(ctx, new)
            return y
        if not autograd.is_recording():  # no backward can follow: MXNet never updates
            return y
        with autograd.pause():
            pending = BNState(*(a.detach() for a in new))
        autograd.mark_variables(list(pending), list(state), grad_reqs="write")
        return _UpdateOnBackward(pending)(*pending, y)
