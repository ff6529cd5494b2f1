"""``BatchNorm``: a PyTorch ``nn.Module`` over :func:`multibn.batch_norm`, interchangeable with ``nn.BatchNorm*d``.

Parameters and buffers are named as in ``nn.BatchNorm1d/2d/3d`` (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so ``load_state_dict`` works in both directions::

    from multibn.layers.torch import BatchNorm
    bn = BatchNorm(16, 4)                       # textbook BatchNorm(num_features, num_dims): NCHW input
    bn.load_state_dict(torch.nn.BatchNorm2d(16).state_dict())

The layer computes nothing itself: the forward calls :func:`multibn.batch_norm` (differentiable through its
``torch.autograd.Function``) and copies the returned running statistics into the buffers, in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..api import batch_norm
from ..conventions import Convention, resolve_convention
from ..recompute import recompute_statistics_torch as recompute_statistics
from ..state import BNState
from . import check_layer_args

__all__ = ["BatchNorm", "convert_sync_batchnorm", "recompute_statistics"]


class BatchNorm(nn.Module):
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Args:
        num_features: channels C, the size of the input along ``axis``.
        num_dims: the input rank the layer accepts, as in the textbook ``BatchNorm(num_features, num_dims)``:
            2 for fully connected (N, C) input, 4 for convolutional (N, C, H, W) input (any rank >= 2 may be
            named); None accepts any rank >= 2 (like ``F.batch_norm``).
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"torch"``; ``"torch_cma"`` is
            ``nn.BatchNorm*d(momentum=None)``, the cumulative moving average) or a :class:`multibn.Convention`.
        momentum, eps: override the convention's (None keeps them).
        affine: learnable ``weight`` (ones) and ``bias`` (zeros); False registers them as None.
        track_running_stats: keep running statistics as buffers; False registers them as None and
            normalises with the batch statistics in eval mode too (PyTorch's behaviour).
        axis: the channel axis of the input (1, PyTorch's, by default).
        sync: synchronised BN across processes (``nn.SyncBatchNorm``): True for the default process group, or a
            ``torch.distributed.ProcessGroup``. It takes effect in training while ``torch.distributed`` is
            initialised with more than one process, as ``nn.SyncBatchNorm`` does; otherwise the layer is plain BN.
        device, dtype: where and in which dtype the parameters and statistics are created.

    ``.train()`` / ``.eval()`` pick the mode. In training the running statistics are updated in the
    forward, in place, outside autograd (as ``nn.BatchNorm*d`` does).
    """

    _version = 2  # as nn.BatchNorm*d: version 2 added num_batches_tracked (see _load_from_state_dict)

    def __init__(
        self,
        num_features: int,
        num_dims: int | None = None,
        *,
        convention: str | Convention = "torch",
        momentum: float | None = None,
        eps: float | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        sync: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_layer_args(num_features, num_dims, axis)
        self.convention = resolve_convention(convention, momentum, eps)  # validates momentum and eps
        self.num_features = num_features
        self.num_dims = num_dims
        self.momentum = self.convention.momentum
        self.eps = self.convention.eps
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.sync = sync
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ---- as nn.BatchNorm*d ----------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if self.num_dims is not None and x.dim() != self.num_dims:
            raise ValueError(f"expected {self.num_dims}D input (got {x.dim()}D input)")
        if x.dim() < 2:
            raise ValueError(f"expected 2D or higher input (got {x.dim()}D input)")

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_dims={self.num_dims}, convention={self.convention.name!r}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}"
            + (f", sync={self.sync!r}" if self.sync else "")
        )

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # A state dict saved before num_batches_tracked existed (version < 2) loads with the counter at 0.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        tracking = self.running_mean is not None and self.running_var is not None
        # As nn.BatchNorm*d: without running statistics the batch statistics are used in eval mode too.
        training = self.training or not tracking
        state = BNState(self.running_mean, self.running_var, self.num_batches_tracked) if tracking else None
        y, new_state = batch_norm(
            x, self.weight, self.bias, state, training=training, convention=self.convention, axis=self.axis,
            backend="torch", sync=self.sync if training and _distributed(self.sync) else None,
        )
        if training and state is not None:
            with torch.no_grad():
                self.running_mean.copy_(new_state.running_mean)
                self.running_var.copy_(new_state.running_var)
                self.num_batches_tracked.copy_(new_state.num_batches_tracked)
        return y


def _distributed(sync: Any) -> bool:
    """Whether ``sync`` names a group of more than one process (as ``nn.SyncBatchNorm`` decides)."""
    if not sync:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(None if sync is True else sync) > 1


def convert_sync_batchnorm(module: nn.Module, sync: Any = True) -> nn.Module:
    """``module`` with every BN layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and multibn's) replaced
    by a multibn :class:`BatchNorm` with ``sync``, keeping its parameters, statistics, mode and settings, like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. Native layers map to the ``torch`` convention (``torch_cma``
    for ``momentum=None``)."""
    if isinstance(module, BatchNorm):
        new = BatchNorm(module.num_features, module.num_dims, convention=module.convention,
                        affine=module.affine, track_running_stats=module.track_running_stats, axis=module.axis,
                        sync=sync)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        convention = "torch_cma" if module.momentum is None else "torch"
        new = BatchNorm(module.num_features, convention=convention, momentum=module.momentum, eps=module.eps,
                        affine=module.affine, track_running_stats=module.track_running_stats, sync=sync)
    else:
        for name, child in module.named_children():
            module.add_module(name, convert_sync_batchnorm(child, sync))
        return module
    ref = module.weight if module.affine else module.running_mean
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(module.state_dict())
    if module.affine:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new
