"""``BatchNorm``: a PyTorch ``nn.Module`` over :func:`multibn.batch_norm`, a drop-in for ``nn.BatchNorm1d/2d/3d``.

Parameters and buffers are named as in ``nn.BatchNorm1d/2d/3d`` (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so ``load_state_dict`` works in both directions; the constructor takes
every keyword of the native layers with the same meaning, and ``eps``, ``momentum``, ``track_running_stats`` and
the parameters and buffers may be changed after construction, as on the native layers::

    from multibn.layers.torch import BatchNorm, convert_batchnorm
    bn = BatchNorm(16, 4)                       # textbook BatchNorm(num_features, num_dims): NCHW input
    bn = BatchNorm(16, eps=1e-3, momentum=None) # as nn.BatchNorm2d(16, eps=1e-3, momentum=None): cumulative average
    model = convert_batchnorm(model)            # every nn.BatchNorm*d / nn.SyncBatchNorm of a model replaced

The layer computes nothing itself: the forward calls :func:`multibn.batch_norm` (differentiable through its
``torch.autograd.Function``) and copies the returned running statistics into the buffers, in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ..algorithm import Stats, merge_stats
from ..api import batch_norm
from ..backends import get_backend
from ..compile_constants import ConstantCache, constant_float
from ..conventions import CONVENTIONS, Convention, resolve_convention
from ..moments import ChannelMoments, accumulator_dtype
from ..state import BNState
from . import _recompute, check_layer_args

__all__ = ["BatchNorm", "convert_batchnorm", "convert_sync_batchnorm", "recompute_statistics", "revert_batchnorm"]

get_backend("torch")  # imports the adapter now: torch.compile must never trace an import inside the forward


class _Unset:
    def __repr__(self) -> str:
        return "<the convention's>"


#: ``momentum`` not given: the convention's. (``momentum=None`` given is PyTorch's cumulative average.)
UNSET: Any = _Unset()

#: the native classes and the input rank each accepts (BatchNorm1d: 2 or 3, so ``num_dims`` None)
_NATIVE_NUM_DIMS: dict[type[nn.Module], int | None] = {
    nn.BatchNorm1d: None, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5, nn.SyncBatchNorm: None,
}

_NO_TORCHSCRIPT = (
    "multibn's BatchNorm (multibn.layers.torch.BatchNorm) cannot run under TorchScript (torch.jit.trace/script, "
    "and the legacy torch.onnx.export(dynamo=False) built on them): its forward is Python code around a "
    "torch.autograd.Function. Use torch.export.export (and torch.onnx.export(..., dynamo=True)) or torch.compile, "
    "or turn the layers back into nn.BatchNorm*d with multibn.layers.torch.revert_batchnorm(model) first."
)


class BatchNorm(nn.Module):
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Args:
        num_features: channels C, the size of the input along ``axis``.
        num_dims: the input rank the layer accepts, as in the textbook ``BatchNorm(num_features, num_dims)``:
            2 for fully connected (N, C) input, 4 for convolutional (N, C, H, W) input (any rank >= 2 may be
            named); None accepts any rank >= 2 (like ``F.batch_norm``).
        eps, momentum: as in ``nn.BatchNorm*d``, in the convention's sense (torch: momentum weighs the new
            batch); not given, the convention's. Under a convention whose momentum weighs the new batch
            (``torch``, ``torch_cma``) ``momentum=None`` is the cumulative moving average, as in PyTorch.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros); False registers them as None.
        track_running_stats: keep running statistics as buffers; False registers them as None and
            normalises with the batch statistics in eval mode too (PyTorch's behaviour).
        device, dtype: where and in which dtype the parameters and statistics are created.
        bias: False registers ``bias`` as None with ``affine`` (as ``nn.BatchNorm*d(bias=False)``).
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"torch"``) or a :class:`multibn.Convention`.
        axis: the channel axis of the input (1, PyTorch's, by default).
        sync: synchronised BN across processes (``nn.SyncBatchNorm``): True for the default process group, or a
            ``torch.distributed.ProcessGroup``. It takes effect in training while ``torch.distributed`` is
            initialised with more than one process, as ``nn.SyncBatchNorm`` does; otherwise the layer is plain BN.

    ``.train()`` / ``.eval()`` pick the mode. ``eps``, ``momentum``, ``track_running_stats``, ``weight``,
    ``bias`` and the buffers are read at every call, exactly as ``nn.BatchNorm*d.forward`` reads them: the batch
    statistics normalise in training and whenever the running buffers are None; the buffers are updated (in
    the forward, in place, outside autograd) in training with ``track_running_stats``; the counter
    ``num_batches_tracked`` counts those batches, and ``momentum=None`` without a counter leaves the statistics
    as they are.
    """

    _version = 2  # as nn.BatchNorm*d: version 2 added num_batches_tracked (see _load_from_state_dict)

    def __init__(
        self,
        num_features: int,
        num_dims: int | None = None,
        *,
        eps: float | None = None,
        momentum: float | None = UNSET,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        convention: str | Convention = "torch",
        axis: int = 1,
        sync: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(num_dims, float):
            raise TypeError(
                f"num_dims must be None or an int (the input rank), got float {num_dims!r}; nn.BatchNorm*d's second "
                "positional argument is eps: pass eps= and momentum= as keywords"
            )
        check_layer_args(num_features, num_dims, axis)
        preset = resolve_convention(convention, None, eps)  # validates the convention and eps
        self.convention = preset
        self.num_features = num_features
        self.num_dims = num_dims
        self.eps = preset.eps
        self.momentum = preset.momentum if momentum is UNSET else momentum
        self.convention = self._current_convention()  # validates momentum; the preset with the overrides
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.sync = sync
        self._last_ndim: int | None = None  # the input rank last seen, for revert_batchnorm
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
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
            if self.bias is not None:
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
            + ("bias=False, " if self.affine and self.bias is None else "")
            + f"track_running_stats={self.track_running_stats}, axis={self.axis}"
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

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this on every submodule first: refuse with the supported routes."""
        raise RuntimeError(_NO_TORCHSCRIPT)

    # ---- forward ----------------------------------------------------------------------------------------------
    def _current_convention(self) -> Convention:
        """``self.convention`` with the current ``self.momentum`` and ``self.eps`` (cached: one dict lookup)."""
        momentum = self.momentum
        momentum = None if momentum is None else constant_float(momentum)
        return _with_settings(self.convention, momentum, constant_float(self.eps))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            raise RuntimeError(_NO_TORCHSCRIPT)
        self._check_input_dim(x)
        if not torch.compiler.is_compiling():
            self._last_ndim = x.dim()
        conv = self._current_convention()
        rmean, rvar, counter = self.running_mean, self.running_var, self.num_batches_tracked
        if (rmean is None) != (rvar is None):
            raise ValueError(
                "running_mean and running_var must both be tensors or both be None, got "
                f"{type(rmean).__name__} and {type(rvar).__name__}"
            )
        # As nn.BatchNorm*d.forward: batch statistics in training and whenever the buffers are None; the buffers
        # move in training with track_running_stats, and the counter counts those batches.
        batch = self.training or rmean is None
        update = self.training and self.track_running_stats
        if update and rmean is None and counter is not None:
            with torch.no_grad():
                counter.add_(1)  # nothing to average, but the native layer still counts the batch
        update = update and rmean is not None
        if update and counter is None and conv.momentum is None:
            conv = _with_settings(conv, 0.0, conv.eps)  # native: no counter, no cumulative average (factor 0)
        state = None
        if not batch or update:
            state = BNState(rmean, rvar, counter if counter is not None else _zero_counter(rmean.device))
        y, new_state = batch_norm(
            x, self.weight, self.bias, state, training=batch, convention=conv, axis=self.axis, backend="torch",
            sync=self.sync if self.training and _distributed(self.sync) else None,
        )
        if update:
            with torch.no_grad():
                rmean.copy_(new_state.running_mean)
                rvar.copy_(new_state.running_var)
                if counter is not None:
                    counter.copy_(new_state.num_batches_tracked)
        return y


def _settings(conv: Convention, momentum: float | None, eps: float) -> Convention:
    """``conv`` with ``momentum`` and ``eps`` (None momentum: the cumulative average), validated."""
    if momentum is None and conv.momentum_weighs != "new":
        raise ValueError(
            f"momentum=None (PyTorch's cumulative average) needs a convention whose momentum weighs the new batch "
            f"(torch, torch_cma); convention {conv.name!r} weighs the old value: give a float momentum"
        )
    same = (momentum, eps) == (conv.momentum, conv.eps)
    return conv if same else dataclasses.replace(conv, momentum=momentum, eps=eps)


#: conventions with live settings, made once each (torch.compile cannot trace the creation of a frozen dataclass);
#: a momentum schedule makes a new one every step, so the bound keeps the cache small
_SETTINGS = ConstantCache(_settings, 4096)


def _with_settings(conv: Convention, momentum: float | None, eps: float) -> Convention:
    """``conv`` with ``momentum`` and ``eps``: one dict lookup (and one attribute) once made."""
    return _SETTINGS.get(conv, momentum, eps)


def _zero_counter(device: torch.device) -> Tensor:
    """A throwaway ``num_batches_tracked`` for a layer whose counter is None (as the native layer allows)."""
    return torch.zeros((), dtype=torch.long, device=device)


def _distributed(sync: Any) -> bool:
    """Whether ``sync`` names a group of more than one process (as ``nn.SyncBatchNorm`` decides)."""
    if not sync:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(None if sync is True else sync) > 1


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


# ---- exact population statistics (multibn.layers._recompute has the definition) ------------------------------
def recompute_statistics(
    model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None, progress: bool | TextIO = True,
    device: Any = None, sync: Any = True,
) -> nn.Module:
    """Set every BN layer's running mean and variance to the exact statistics of its training-mode inputs
    (:mod:`multibn.layers._recompute` has the definition).

    Args:
        model: a ``torch.nn.Module``. Its BN layers are ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (any
            ``nn.modules.batchnorm._BatchNorm``) and :class:`BatchNorm`; those without running statistics
            (``track_running_stats=False``) are left alone.
        batches: an iterable of inputs, or of tuples/lists whose first element is the input (a ``DataLoader``).
        num_batches: use only the first ``num_batches`` (default: all).
        progress: a progress bar on stderr when it is a terminal (True), on a given text stream, or none (False).
        device: move each input there first (default: as given).
        sync: under ``torch.distributed`` with more than one process, merge every process's statistics exactly
            (all-reduce of the count-weighted summaries): True for the default group, or a ``ProcessGroup``;
            False keeps each process's own. Every process must then call this function.

    The whole model runs in training mode (dropout included) under ``torch.no_grad()``; afterwards each module
    is back in the mode it was in. Stored: ``mean``, and ``M2 / (N - 1)`` for native layers and multibn layers
    with an unbiased convention (``torch``, ``torch_cma``), ``M2 / N`` for the others, ``N`` being the total
    count per channel. ``num_batches_tracked`` keeps its value, as do weights and other buffers. Layers that no
    input reached keep their statistics (with a warning). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers: dict[nn.Module, tuple[str, int, bool]] = {}
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm):
            info = (name or type(m).__name__, m.axis, m.convention.unbiased_running_var)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            info = (name or type(m).__name__, 1, True)
        else:
            continue
        if m.running_mean is not None and m.running_var is not None:
            layers[m] = info
    if not layers:
        _recompute.warn_no_layers("the model has no batch-norm layer with running statistics")
        return model
    group = _recompute_group(sync)
    moments = {m: ChannelMoments(axis) for m, (_, axis, _) in layers.items()}
    saved = {m: [b.detach().clone() if b is not None else None
                 for b in (m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None))] for m in layers}
    modes = [(m, m.training) for m in model.modules()]

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        moments[module].partial_fit(args[0] if args else next(iter(kwargs.values())))

    def step(x: Any) -> None:
        model(x.to(device) if device is not None else x)

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in layers]
    try:
        model.train()
        with torch.no_grad():
            _recompute.run(batches, num_batches, progress, step)
            results = {m: _summary(m, moments[m]) for m in layers}
            if group is not _LOCAL:
                results = _all_reduce(results, group)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, bufs in saved.items():  # undo what the training-mode forwards did to the buffers
                for live, old in zip((m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None)),
                                     bufs, strict=True):
                    if live is not None:
                        live.copy_(old)
    with torch.no_grad():
        for m, st in results.items():
            if st.count > 0:
                _, _, unbiased = layers[m]
                m.running_mean.copy_(st.mean)
                m.running_var.copy_(_recompute.stored_variance(st, unbiased))
    _recompute.warn_unreached([layers[m][0] for m, st in results.items() if st.count == 0])
    return model


_LOCAL = object()


def _recompute_group(sync: Any) -> Any:
    """The process group to merge over, or ``_LOCAL`` (not distributed, or ``sync=False``)."""
    if sync is False or sync is None:
        return _LOCAL
    import torch.distributed as dist

    if sync is not True and not (dist.is_available() and isinstance(sync, dist.ProcessGroup)):
        raise TypeError(f"sync must be True, False or a torch.distributed.ProcessGroup, got {sync!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return _LOCAL
    group = None if sync is True else sync
    return group if dist.get_world_size(group) > 1 else _LOCAL


def _summary(m: nn.Module, moments: ChannelMoments) -> Stats:
    """The layer's local summary; zeros of the running statistics' size for a layer no input reached."""
    if moments.count > 0:
        return moments.stats
    dtype = getattr(torch, accumulator_dtype("torch", m.running_mean))
    zeros = torch.zeros(m.running_mean.shape, dtype=dtype, device=m.running_mean.device)
    return Stats(0, zeros, zeros)


def _all_reduce(local: dict[nn.Module, Stats], group: Any) -> dict[nn.Module, Stats]:
    """Every layer's summary over all processes of ``group``: one all-reduce of the counts, then the exact merge
    (:func:`multibn.algorithm.merge_stats`) with sums over the processes."""
    be = get_backend("torch")
    first = next(iter(local.values()))
    counts = torch.tensor([s.count for s in local.values()], dtype=torch.int64, device=first.mean.device)
    totals = be.all_reduce_sum(counts, group).tolist()
    return {m: merge_stats(st, total, lambda a: be.all_reduce_sum(a, group))
            for (m, st), total in zip(local.items(), totals, strict=True)}
