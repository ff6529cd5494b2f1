"""``recompute_statistics`` for PyTorch models: the exact population statistics of every BN layer's training-mode
inputs, over the framework-free driver :mod:`multibn.layers._recompute`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

import torch
from torch import nn

from ...algorithm import Stats, merge_stats
from ...backends import get_backend
from ...moments import ChannelMoments, accumulator_dtype
from .. import _recompute
from .batchnorm import BatchNorm


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
    # every buffer of each BN layer (a renorm layer's running_std, renorm_mean, renorm_std too)
    saved = {m: {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in layers}
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
                for k, old in bufs.items():
                    getattr(m, k).copy_(old)
    with torch.no_grad():
        for m, st in results.items():
            if st.count > 0:
                _, _, unbiased = layers[m]
                m.running_mean.copy_(st.mean)
                m.running_var.copy_(_recompute.stored_variance(st, unbiased))
                if getattr(m, "renorm", False):  # renorm derives running_var from running_std: keep them agreeing
                    m.running_std.copy_(torch.sqrt(m.running_var + m.eps))
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
