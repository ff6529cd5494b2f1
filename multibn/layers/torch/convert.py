"""Converting the BN layers of a model: native to multibn (``convert_batchnorm``, ``convert_sync_batchnorm``) and
back (``revert_batchnorm``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ...conventions import CONVENTIONS, Convention, resolve_convention
from .batchnorm import _NATIVE_NUM_DIMS, BatchNorm
from .dropin import _NativeSignature


# ---- converting the layers of a model ------------------------------------------------------------------------
def _carry(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s parameters and buffers (the same tensors: device, dtype, requires_grad and an
    optimizer's references stay), its live settings and its train/eval mode, as ``convert_sync_batchnorm``."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    for name in ("num_features", "affine", "track_running_stats"):
        setattr(new, name, getattr(old, name))
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new.train(old.training)


def _multibn_from_native(module: nn.modules.batchnorm._BatchNorm, convention: str | Convention, sync: Any) -> BatchNorm:
    """A multibn layer with the native layer's live settings; under a convention whose momentum weighs the old
    value the native momentum m (new batch) becomes 1 - m, so the running statistics move alike."""
    preset = resolve_convention("torch_cma" if convention == "torch" and module.momentum is None else convention,
                                None, None)
    momentum = module.momentum
    if preset.momentum_weighs == "old":
        if momentum is None:
            raise ValueError(
                f"{type(module).__name__}(momentum=None) is the cumulative average, which convention "
                f"{preset.name!r} cannot express; convert with a torch convention"
            )
        momentum = 1.0 - momentum
    new = BatchNorm(module.num_features, _NATIVE_NUM_DIMS.get(type(module)), eps=module.eps, momentum=momentum,
                    affine=module.affine, track_running_stats=module.track_running_stats, convention=preset,
                    sync=sync, device="meta")
    return _carry(module, new)


def convert_batchnorm(module: nn.Module, *, convention: str | Convention = "torch") -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` replaced by a multibn
    :class:`BatchNorm` under ``convention``; returns ``module`` (or the new layer if ``module`` is one).

    Each new layer holds the native layer's parameters and buffers (the same tensors: state_dict keys, device,
    dtype and ``requires_grad`` unchanged), its current ``eps``, ``momentum`` (None: the cumulative average) and
    ``track_running_stats``, and its train/eval mode; ``num_dims`` is 4 for ``BatchNorm2d``, 5 for
    ``BatchNorm3d`` and None (2 or more) for ``BatchNorm1d`` and ``nn.SyncBatchNorm``. Under the torch
    convention a converted model computes what the original did, step for step. Subclasses of the native
    classes are left alone (their forward may differ).
    """
    resolve_convention(convention, None, None)
    if type(module) in _NATIVE_NUM_DIMS:
        return _multibn_from_native(module, convention, None)
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, convention=convention))
    return module


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every multibn :class:`BatchNorm` under a torch convention turned back into
    ``nn.BatchNorm1d/2d/3d`` (``nn.SyncBatchNorm`` where ``sync`` is set), holding the same tensors and settings.

    The class comes from ``num_dims`` (2 or 3: 1d, 4: 2d, 5: 3d) or, where ``num_dims`` is None, from the rank of
    the last input the layer saw; ValueError where neither is known, or where the layer is not in PyTorch's
    convention (another convention, a channel axis other than 1)."""
    return _revert(module, "")


def _revert(module: nn.Module, path: str) -> nn.Module:
    if not isinstance(module, BatchNorm):
        for name, child in module.named_children():
            module.add_module(name, _revert(child, f"{path}.{name}" if path else name))
        return module
    where = f"layer {path or '(the root)'}"
    torch_rules = dataclasses.replace(CONVENTIONS["torch"], momentum=module.convention.momentum,
                                      eps=module.convention.eps)
    if dataclasses.replace(module.convention, name="torch", reproduces=torch_rules.reproduces) != torch_rules:
        raise ValueError(f"{where} uses convention {module.convention.name!r}; only torch-convention layers "
                         "turn back into nn.BatchNorm*d")
    if module.axis != 1:
        raise ValueError(f"{where} has channel axis {module.axis}; nn.BatchNorm*d normalises over axis 1")
    rank = module.num_dims if module.num_dims is not None else module._last_ndim
    native = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if isinstance(module, _NativeSignature):
        native = module._native
    if module.sync:
        native = nn.SyncBatchNorm
    elif native is None:
        raise ValueError(
            f"{where} has num_dims=None and has seen no input, so BatchNorm1d, 2d or 3d cannot be chosen: "
            "run one batch through the model, or give the layer num_dims" if rank is None else
            f"{where} takes {rank}D input; nn.BatchNorm1d/2d/3d take 2D to 5D input"
        )
    extra = {"process_group": None if module.sync is True else module.sync} if module.sync else {}
    new = native(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                 track_running_stats=module.track_running_stats, device="meta", **extra)
    return _carry(module, new)


def convert_sync_batchnorm(module: nn.Module, sync: Any = True) -> nn.Module:
    """``module`` with every BN layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and multibn's) replaced
    by a multibn :class:`BatchNorm` with ``sync``, keeping its parameters, statistics, mode and current settings,
    like ``nn.SyncBatchNorm.convert_sync_batchnorm``. Native layers map to the ``torch`` convention
    (``torch_cma`` for ``momentum=None``)."""
    if isinstance(module, BatchNorm):
        new = BatchNorm(module.num_features, module.num_dims, eps=module.eps, momentum=module.momentum,
                        affine=module.affine, track_running_stats=module.track_running_stats,
                        convention=module.convention, axis=module.axis, sync=sync, device="meta")
        new._last_ndim = module._last_ndim
        return _carry(module, new)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _multibn_from_native(module, "torch", sync)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, sync))
    return module
