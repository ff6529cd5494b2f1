"""``nn.BatchNorm1d/2d/3d`` and ``nn.LazyBatchNorm1d/2d/3d`` by name: :class:`~.batchnorm.BatchNorm` with the
native signatures, input-rank checks, error texts and repr, under the torch convention."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .batchnorm import _NATIVE_NUM_DIMS, BatchNorm


# ---- nn.BatchNorm1d/2d/3d and nn.LazyBatchNorm1d/2d/3d by name ----------------------------------------------
class _NativeSignature(BatchNorm):
    """:class:`BatchNorm` under the torch convention with ``nn.BatchNorm*d``'s signature, input-rank check, error
    texts and repr: the subclasses are those classes by name (``state_dict`` keys and values interchange)."""

    _native: type[nn.Module] = nn.BatchNorm1d  # the native class this one stands for
    _ranks: tuple[int, ...] = (2, 3)

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, device: Any = None, dtype: Any = None, *, bias: bool = True,
    ) -> None:
        super().__init__(num_features, _NATIVE_NUM_DIMS[self._native], eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype, bias=bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {x.dim()}D input)")

    def extra_repr(self) -> str:
        return nn.modules.batchnorm._NormBase.extra_repr(self)  # the installed torch's text


class BatchNorm1d(_NativeSignature):
    """``nn.BatchNorm1d`` (same signature, checks and state) computed by :func:`multibn.batch_norm`:
    (N, C) or (N, C, L) input, ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel."""

    _native, _ranks = nn.BatchNorm1d, (2, 3)


class BatchNorm2d(_NativeSignature):
    """``nn.BatchNorm2d`` computed by :func:`multibn.batch_norm`: (N, C, H, W) input."""

    _native, _ranks = nn.BatchNorm2d, (4,)


class BatchNorm3d(_NativeSignature):
    """``nn.BatchNorm3d`` computed by :func:`multibn.batch_norm`: (N, C, D, H, W) input."""

    _native, _ranks = nn.BatchNorm3d, (5,)


class _LazyNativeSignature(nn.modules.lazy.LazyModuleMixin, _NativeSignature):
    """``nn.LazyBatchNorm*d``: ``num_features`` is the first input's ``shape[1]``; until then the parameters and
    buffers are uninitialised, and the first forward turns the layer into ``cls_to_become``."""

    def __init__(
        self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
        device: Any = None, dtype: Any = None, *, bias: bool = True,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        # as nn.LazyBatchNorm*d: made without tensors (which would soon be overwritten), then given uninitialised ones
        super().__init__(1, eps, momentum, False, False, **factory, bias=False)
        self.num_features = 0
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.parameter.UninitializedParameter(**factory)
            if bias:
                self.bias = nn.parameter.UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = nn.parameter.UninitializedBuffer(**factory)
            self.running_var = nn.parameter.UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, x: Tensor) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():
            self.num_features = x.shape[1]
            for t in (self.weight, self.bias, self.running_mean, self.running_var):
                if t is not None:
                    t.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyNativeSignature):
    """``nn.LazyBatchNorm1d``: a :class:`BatchNorm1d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm1d
    _native, _ranks = nn.BatchNorm1d, (2, 3)


class LazyBatchNorm2d(_LazyNativeSignature):
    """``nn.LazyBatchNorm2d``: a :class:`BatchNorm2d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm2d
    _native, _ranks = nn.BatchNorm2d, (4,)


class LazyBatchNorm3d(_LazyNativeSignature):
    """``nn.LazyBatchNorm3d``: a :class:`BatchNorm3d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm3d
    _native, _ranks = nn.BatchNorm3d, (5,)
