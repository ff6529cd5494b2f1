"""multibn's PyTorch layer, :class:`BatchNorm`: an ``nn.Module`` over :func:`multibn.batch_norm` whose parameters,
buffers, settings and errors are ``nn.BatchNorm*d``'s (see :mod:`multibn.layers.torch`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ...api import batch_norm
from ...backends import get_backend
from ...compile_constants import ConstantCache, constant_float
from ...conventions import Convention, resolve_convention
from ...state import BNState, RenormState
from .. import check_layer_args

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


class NativeError(ValueError, RuntimeError):
    """An error PyTorch's own batch norm raises as RuntimeError, with its text: a ValueError (multibn's rule) that
    ``except RuntimeError`` written for the native layer also catches."""


#: torch 2.13's message when a vmapped training layer would update unbatched running statistics in place
VMAP_MESSAGE = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap"
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
        renorm, renorm_clipping, renorm_momentum: batch renormalisation, with Keras's names and meanings
            (:func:`multibn.batch_norm`'s ``renorm=``); the layer then also keeps the buffers ``running_std``,
            ``renorm_mean`` and ``renorm_std`` (``running_mean``/``running_var`` stay the inference statistics).
        virtual_batch_size: ghost batch norm in training, sub-batches of this many samples along axis 0.

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
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
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
        if renorm and not track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True: batch renormalisation corrects the batch "
                             "statistics towards running ones")
        self.renorm = bool(renorm)
        self.renorm_clipping = dict(renorm_clipping or {})
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size
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
            if renorm:
                self.register_buffer("running_std", torch.ones(num_features, **factory))
                self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
                self.register_buffer("renorm_std", torch.ones(num_features, **factory))
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
            if self.renorm:
                self.running_std.fill_(1)
                self.renorm_mean.zero_()
                self.renorm_std.fill_(1)

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
            + (f", renorm=True, renorm_clipping={self.renorm_clipping}, renorm_momentum={self.renorm_momentum}"
               if self.renorm else "")
            + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "")
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
        self._check_as_native(x, conv, rmean, rvar, batch, update and rmean is not None,
                              uses_buffers=not batch or update)
        if update and rmean is None and counter is not None:
            with torch.no_grad():
                counter.add_(1)  # nothing to average, but the native layer still counts the batch
        update = update and rmean is not None
        if update and counter is None and conv.momentum is None:
            conv = _with_settings(conv, 0.0, conv.eps)  # native: no counter, no cumulative average (factor 0)
        state, extra = None, ()
        if not batch or update:
            state = BNState(rmean, rvar, counter if counter is not None else _zero_counter(rmean.device))
            if self.renorm:
                extra = (self.running_std, self.renorm_mean, self.renorm_std)
                # copies: the op saves renorm_mean/renorm_std for the backward, and the buffers are written below
                state = RenormState(*state, self.running_std, self.renorm_mean.clone(), self.renorm_std.clone())
        variants = {}
        if batch and self.renorm:
            variants = {"renorm": self.renorm_clipping, "renorm_momentum": self.renorm_momentum}
        if batch and self.virtual_batch_size:
            variants["virtual_batch_size"] = self.virtual_batch_size
        y, new_state = batch_norm(
            x, self.weight, self.bias, state, training=batch, convention=conv, axis=self.axis, backend="torch",
            sync=self.sync if self.training and _distributed(self.sync) else None, **variants,
        )
        if update:
            with torch.no_grad():
                for buffer, value in zip((rmean, rvar, counter, *extra), new_state, strict=True):
                    if buffer is not None:
                        buffer.copy_(value)
        return y


    def _check_as_native(self, x: Tensor, conv: Convention, rmean: Tensor | None, rvar: Tensor | None, batch: bool,
                         update: bool, *, uses_buffers: bool) -> None:
        """The errors ``F.batch_norm`` raises for what ``nn.BatchNorm*d.forward`` passes it, with its texts: a
        tensor of another size than the input's channel count C (the buffers, when passed, first), under PyTorch's
        rules eps <= 0 in training, and a vmapped input whose unbatched buffers the update would write in place."""
        if -x.dim() <= self.axis < x.dim():
            c = x.shape[self.axis]
            named = (("running_mean", rmean), ("running_var", rvar)) if uses_buffers else ()
            for name, t in (*named, ("weight", self.weight), ("bias", self.bias)):
                if t is not None and t.numel() != c:
                    raise NativeError(f"{name} should contain {c} elements not {t.numel()}")
        if batch and conv.single_value_raises and not conv.eps > 0:  # PyTorch's rules (torch, torch_cma)
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if update and not torch.compiler.is_compiling() and _batched(x) and not _batched(rmean):
            raise NativeError(VMAP_MESSAGE)


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a tensor batched by ``torch.func.vmap`` (as seen inside the vmapped function)."""
    return bool(torch._C._functorch.is_batchedtensor(t))


def _settings(conv: Convention, momentum: float | None, eps: float) -> Convention:
    """``conv`` with ``momentum`` and ``eps`` (None momentum: the cumulative average), validated."""
    if momentum is None and conv.momentum_weighs != "new":
        raise ValueError(
            f"momentum=None (PyTorch's cumulative average) needs a convention whose momentum weighs the new batch "
            f"(torch, torch_cma); convention {conv.name!r} weighs the old value: give a float momentum"
        )
    same = (momentum, eps) == (conv.momentum, conv.eps)
    if same:
        return conv
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        # PyTorch checks no momentum: outside [0, 1], R <- (1 - m) R + m stat extrapolates. A Convention refuses such a
        # momentum, so the copy is made with an in-range one and then given the layer's.
        made = dataclasses.replace(conv, momentum=0.5, eps=eps)
        object.__setattr__(made, "momentum", momentum)
        return made
    return dataclasses.replace(conv, momentum=momentum, eps=eps)


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
