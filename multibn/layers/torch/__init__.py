"""``BatchNorm``: a PyTorch ``nn.Module`` over :func:`multibn.batch_norm`, a drop-in for ``nn.BatchNorm1d/2d/3d``.

Parameters and buffers are named as in ``nn.BatchNorm1d/2d/3d`` (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so ``load_state_dict`` works in both directions; the constructor takes
every keyword of the native layers with the same meaning, and ``eps``, ``momentum``, ``track_running_stats`` and
the parameters and buffers may be changed after construction, as on the native layers::

    from multibn.layers.torch import BatchNorm, convert_batchnorm
    bn = BatchNorm(16, 4)                       # textbook BatchNorm(num_features, num_dims): NCHW input
    bn = BatchNorm(16, eps=1e-3, momentum=None) # as nn.BatchNorm2d(16, eps=1e-3, momentum=None): cumulative average
    model = convert_batchnorm(model)            # every nn.BatchNorm*d / nn.SyncBatchNorm of a model replaced

``BatchNorm1d/2d/3d`` and ``LazyBatchNorm1d/2d/3d`` are PyTorch's classes by name: the same signature
(``num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *,
bias=True``), input-rank checks, error texts and repr, under the torch convention. Every other name of
``torch.nn`` is reached through this module too, so a model written against ``from torch import nn`` runs on
multibn's layers with that one import changed to ``from multibn.layers import torch as nn``. As the native layers,
the forward raises PyTorch's texts for a tensor whose size is not the channel count (``running_mean should contain
5 elements not 4``; a :class:`NativeError`, both ValueError and RuntimeError), for ``eps <= 0`` in training and for
``torch.func.vmap`` of a layer that would update unbatched running statistics, and takes any momentum (outside
[0, 1] the update extrapolates).

The layer computes nothing itself: the forward calls :func:`multibn.batch_norm` (differentiable through its
``torch.autograd.Function``) and copies the returned running statistics into the buffers, in place.
"""

from typing import Any

from torch import nn

from .batchnorm import UNSET, VMAP_MESSAGE, BatchNorm, NativeError
from .convert import convert_batchnorm, convert_sync_batchnorm, revert_batchnorm
from .dropin import BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .recompute import recompute_statistics

for _cls in (BatchNorm, NativeError, BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d,
             LazyBatchNorm3d):
    _cls.__module__ = __name__  # the public home of the classes (reprs, pickles, type checks name it)

__all__ = [
    "UNSET", "VMAP_MESSAGE", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
    "LazyBatchNorm2d", "LazyBatchNorm3d", "NativeError", "convert_batchnorm", "convert_sync_batchnorm",
    "recompute_statistics", "revert_batchnorm",
]


def __getattr__(name: str) -> Any:
    """Every other name of ``torch.nn``, so that ``from multibn.layers import torch as nn`` in place of
    ``from torch import nn`` runs a model's code unchanged, its ``nn.BatchNorm*d`` being multibn's."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(nn, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has torch.nn)") from None
