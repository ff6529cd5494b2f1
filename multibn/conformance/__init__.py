"""The conformance battery as a library: ``multibn check`` runs it, the test suite asserts with it.

Every backend and convention is compared with an independent float64 reference (:mod:`.reference`) within a
per-element error bound, and with the frameworks' own batch norms:

* :mod:`.cases`: a case (fixed-seed data for a sequence of training and eval steps) and what a backend refuses;
* :mod:`.runs`: a case run through the reference (with its bounds) or through multibn on a backend;
* :mod:`.compare`: two runs compared quantity by quantity (``y``, ``dx``, ``dgamma``, ``dbeta``, the running
  statistics, ``num_batches_tracked``; NaN and inf at the same places);
* :mod:`.battery`: the fixed-seed battery and one case on every backend, against the reference and pairwise;
* :mod:`.native`: the frameworks' own batch norms against multibn on the same framework;
* :mod:`.variants`: batch renormalisation and ghost batch norm, their float64 transcriptions and cases.

Importing this package imports no framework.
"""

from .battery import battery, check_case
from .cases import UNSUPPORTED, Case, Step, jax_x64, make_case, unsupported
from .compare import Row, compare_runs, rows_of
from .native import (
    MXNET_NATIVE,
    Native,
    compare_native,
    finish_keras,
    native_battery,
    native_flax,
    native_mxnet,
    native_torch,
    run_keras,
    start_keras,
)
from .runs import Run, backend_run, numpy_of, reference_run, to_backend
from .variants import reference_variant_run, variant_battery

__all__ = [
    "MXNET_NATIVE",
    "UNSUPPORTED",
    "Case",
    "Native",
    "Row",
    "Run",
    "Step",
    "backend_run",
    "battery",
    "check_case",
    "compare_native",
    "compare_runs",
    "finish_keras",
    "jax_x64",
    "make_case",
    "native_battery",
    "native_flax",
    "native_mxnet",
    "native_torch",
    "numpy_of",
    "reference_run",
    "reference_variant_run",
    "rows_of",
    "run_keras",
    "start_keras",
    "to_backend",
    "unsupported",
    "variant_battery",
]
