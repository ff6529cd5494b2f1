"""``multibn bench``: multibn against each framework's native batch norm and the memory roofline.

Every implementation of one (backend, case, dtype, pass) runs in one process, side by side: warm-up first, then
``reps`` timed repetitions interleaved (A B C A B C ...), each ended by the framework's device sync
(``mx.nd.waitall``, ``block_until_ready``, ``torch.cuda.synchronize`` on a GPU). Reported: median and
interquartile range in ms, and the ratios of the medians to the native BN and to the roofline of the same run.

* ``multibn``: :func:`multibn.batch_norm` (training, running statistics updated) and, for ``fwd+bwd``, its
  gradient through the framework's autodiff; under ``jax.jit`` on JAX.
* ``multibn-compiled`` (``--compiled``, torch): the same call under ``torch.compile``.
* ``native``: ``torch.nn.functional.batch_norm``, ``mx.nd.BatchNorm``, ``flax.linen.BatchNorm`` under jit.
* ``keras``: Keras 3 ``BatchNormalization`` on its torch and jax backends, in one subprocess per Keras backend
  (Keras picks its backend at import), beside that framework's native BN for the ratio.
* The ``mem`` pass is not timed: it measures the peak memory of one forward+backward pass of ``multibn`` and
  ``native`` (and ``multibn-compiled``), each in a fresh subprocess, and multibn's excess in activations (see
  :func:`multibn.cli.bench.memory.peak_memory_here`).
* ``roofline``: one reduction pass plus one streaming pass over ``x`` forward (``sum`` + copy), 6 reads and
  2 writes forward+backward (4 ``sum`` + 2 copies), with the same library's ``sum`` and copy into an existing
  buffer (MXNet: its ``nd.sum`` is far off the bandwidth, so the reduction pass is a BLAS product with a ones
  vector, its fastest full read). NumPy is single-threaded, so its roofline is too.

Cases are named ``nchw_AxBxCxD`` (channel axis 1), ``nhwc_AxBxCxD`` (channel axis 3) or ``nc_AxB``, optionally
with ``:dtype``; any such name works (``nchw_2x3x4x5`` is the smoke test's).

The modules: :mod:`.cases` (cases, passes, data), :mod:`.runners` (each framework's implementations),
:mod:`.models` (``--model``: whole training steps), :mod:`.timing`, :mod:`.memory` (the ``mem`` pass),
:mod:`.report` (environment, tables, plot), :mod:`.command` (the arguments and the loop).
Nothing here imports a framework at module import.
"""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
