"""Batch-norm layers native to each framework, all running the one algorithm of :func:`multibn.batch_norm`.

* :mod:`multibn.layers.torch`: ``BatchNorm``, a ``torch.nn.Module`` whose ``state_dict`` interchanges with
  ``nn.BatchNorm1d/2d/3d``;
* :mod:`multibn.layers.gluon`: ``BatchNorm``, an MXNet Gluon block whose parameter files interchange with
  ``mxnet.gluon.nn.BatchNorm`` (with MXNet's backward-time update of the running statistics on request);
* :mod:`multibn.layers.jax`: ``BatchNorm``, a pure ``init``/``apply`` pair for ``jax.jit``/``jax.grad``.

The layers hold no batch-norm maths: each calls :func:`multibn.batch_norm` and keeps the state it returns.
Importing this package imports no framework; import the submodule of the framework you use.
"""

__all__: list[str] = []
