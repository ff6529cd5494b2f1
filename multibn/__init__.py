"""multibn: one batch-norm algorithm for NumPy, PyTorch, JAX and MXNet, with every framework's conventions.

``import multibn`` imports no framework; a backend's framework is imported the first time it is used.
"""

import sys

from .api import batch_norm, batch_norm_vjp, init_state
from .backends import available_backends
from .conventions import CONVENTIONS, Convention
from .convert import convert_state
from .moments import ChannelMoments
from .state import BNState, RenormState

__all__ = [
    "CONVENTIONS",
    "BNState",
    "ChannelMoments",
    "Convention",
    "RenormState",
    "available_backends",
    "batch_norm",
    "batch_norm_vjp",
    "convert_state",
    "init_state",
]
__version__ = "0.1.0"

if "mxnet" in sys.modules:  # register the Gluon layer's graph operator, which exported MXNet symbols name
    from .layers import _gluon_op  # noqa: F401
