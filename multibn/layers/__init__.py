"""Batch-norm layers native to each framework, all running the one algorithm of :func:`multibn.batch_norm`.

* :mod:`multibn.layers.torch`: ``BatchNorm``, a ``torch.nn.Module`` whose ``state_dict`` interchanges with
  ``nn.BatchNorm1d/2d/3d``;
* :mod:`multibn.layers.gluon`: ``BatchNorm``, an MXNet Gluon block whose parameter files interchange with
  ``mxnet.gluon.nn.BatchNorm`` (with MXNet's backward-time update of the running statistics on request);
* :mod:`multibn.layers.flax`: ``BatchNorm``, a ``flax.linen`` module that replaces ``flax.linen.BatchNorm``
  (same fields and variables, plus ``convention=``);
* :mod:`multibn.layers.nnx`: ``BatchNorm``, a ``flax.nnx`` module that replaces ``flax.nnx.BatchNorm``;
* :mod:`multibn.layers.jax`: ``BatchNorm``, a pure ``init``/``apply`` pair for ``jax.jit``/``jax.grad``, for
  JAX code without Flax.

The layers hold no batch-norm maths: each calls :func:`multibn.batch_norm` and keeps the state it returns.
The torch, Gluon and Flax modules also have ``recompute_statistics`` (exact population statistics of a trained
model) over one framework-free driver, :mod:`multibn.layers._recompute`; the Gluon block's graph operator is
:mod:`multibn.layers._gluon_op`.
Importing this package imports no framework; import the submodule of the framework you use.
"""

__all__: list[str] = []


def check_layer_args(num_features: object, num_dims: object, axis: object, *, axis_may_be_none: bool = False) -> None:
    """The constructor checks every layer shares: ValueError/TypeError naming the argument and what it got."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if num_dims is not None and (isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 2):
        raise ValueError(f"num_dims must be None or an int >= 2 (2: (N, C) input, 4: (N, C, H, W)), got {num_dims!r}")
    if axis is None and axis_may_be_none:
        return
    if isinstance(axis, bool) or not isinstance(axis, int):
        expected = "None or an int" if axis_may_be_none else "an int"
        raise TypeError(f"axis must be {expected}, got {type(axis).__name__} {axis!r}")
