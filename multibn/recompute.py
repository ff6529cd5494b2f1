"""Exact population statistics for a trained model ("precise BN"), on PyTorch, MXNet Gluon and Flax.

Running averages lag the weights: they mix statistics of inputs that earlier versions of the network produced.
After training, ``recompute_statistics`` runs the model in training mode over ``batches`` and sets every
batch-norm layer's running mean and variance to the mean and variance of *all* the inputs that layer saw (its
training-mode input, as in Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), each layer's per-batch
summary ``(n, mean, M2)`` merged exactly by :class:`multibn.ChannelMoments` (Chan et al.'s count-weighted
merge, :func:`multibn.algorithm.merge_stats`). The stored variance is that of the data, ``M2 / (N - 1)`` with
the total count ``N`` where the layer's convention keeps the unbiased estimate (PyTorch's), ``M2 / N``
otherwise, whatever the batch sizes. ``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats``
instead average the per-batch variances with equal weights, which is not the variance of the data when the
batch means differ (always), and weighs small batches like large ones.

Only the running mean and variance change: weights, every other buffer (``num_batches_tracked`` included: it
keeps its value) and each module's train/eval mode are as before; a call that fails changes nothing.
Memory: O(channels) per layer, whatever the number of batches.

The three functions are re-exported as ``multibn.layers.torch.recompute_statistics``,
``multibn.layers.gluon.recompute_statistics`` and ``multibn.layers.flax.recompute_statistics``.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TextIO

import numpy as np

from .algorithm import Layout, Stats, batch_stats, merge_stats
from .backends import get_backend
from .moments import ChannelMoments

__all__ = ["recompute_statistics_flax", "recompute_statistics_gluon", "recompute_statistics_torch"]


# ---- shared: batches, progress -------------------------------------------------------------------------------
def _check_num_batches(num_batches: int | None) -> None:
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be None or a positive int, got {num_batches!r}")


def _inputs(batches: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    """The model inputs: each batch, or its first element when it is a tuple or list (``(x, y)`` pairs)."""
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of inputs (or of (input, ...) tuples), got "
                        f"{type(batches).__name__}")
    for i, batch in enumerate(islice(batches, num_batches)):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"batches: batch {i} is an empty {type(batch).__name__}; expected an input or "
                                 "a tuple/list whose first element is the input")
            batch = batch[0]
        yield batch


def _total(batches: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, num_batches)


class Progress:
    """``label: [#####.....] 12/40 batches`` redrawn in place (at most 10 times a second) on a text stream.

    ``progress``: True shows it on stderr when stderr is a terminal; a stream shows it there; False shows nothing.
    """

    def __init__(self, progress: bool | TextIO, total: int | None, label: str, width: int = 24) -> None:
        if progress is True:
            stream = sys.stderr if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else None
        elif progress is False or progress is None:
            stream = None
        elif hasattr(progress, "write"):
            stream = progress
        else:
            raise TypeError(f"progress must be a bool or a text stream, got {type(progress).__name__}")
        self.stream, self.total, self.label, self.width = stream, total, label, width
        self.done, self.last = 0, 0.0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if self.stream is None or (not force and now - self.last < 0.1):
            return
        self.last = now
        if self.total:
            filled = self.width * min(done, self.total) // self.total
            line = f"{self.label}: [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} batches"
        else:
            line = f"{self.label}: {done} batches"
        self.stream.write("\r" + line)
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _run(batches: Iterable[Any], num_batches: int | None, progress: bool | TextIO, label: str,
         step: Callable[[Any], None]) -> int:
    """``step(x)`` for every input, with the progress bar; the number of batches (ValueError if none)."""
    _check_num_batches(num_batches)
    bar = Progress(progress, _total(batches, num_batches), label)
    n = 0
    try:
        for x in _inputs(batches, num_batches):
            step(x)
            n += 1
            bar.update(n)
    finally:
        bar.close()
    if n == 0:
        raise ValueError("batches yielded no batch: nothing to compute the statistics from")
    return n


def _warn_unreached(names: list[str]) -> None:
    if names:
        warnings.warn(f"recompute_statistics: no input reached the batch-norm layer(s) {', '.join(names)}; "
                      "their running statistics are unchanged", stacklevel=3)


# ---- PyTorch ------------------------------------------------------------------------------------------------
def recompute_statistics_torch(
    model: Any, batches: Iterable[Any], *, num_batches: int | None = None, progress: bool | TextIO = True,
    device: Any = None, sync: Any = True,
) -> Any:
    """Set every BN layer's running mean and variance to the exact statistics of its training-mode inputs.

    Args:
        model: a ``torch.nn.Module``. Its BN layers are ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (any
            ``nn.modules.batchnorm._BatchNorm``) and :class:`multibn.layers.torch.BatchNorm`; those without
            running statistics (``track_running_stats=False``) are left alone.
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
    import torch
    from torch import nn

    from .layers.torch import BatchNorm

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
        warnings.warn("recompute_statistics: the model has no batch-norm layer with running statistics",
                      stacklevel=2)
        return model
    group = _torch_group(sync)
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
            _run(batches, num_batches, progress, "recompute_statistics", step)
            results = {m: _torch_summary(m, moments[m]) for m in layers}
            if group is not _LOCAL:
                results = _torch_all_reduce(results, group)
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
                m.running_var.copy_(st.m2 / (st.count - 1 if unbiased and st.count > 1 else st.count))
    _warn_unreached([layers[m][0] for m, st in results.items() if st.count == 0])
    return model


_LOCAL = object()


def _torch_group(sync: Any) -> Any:
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


def _torch_summary(m: Any, moments: ChannelMoments) -> Stats:
    """The layer's local summary; zeros of the running statistics' size for a layer no input reached."""
    if moments.count > 0:
        return moments.stats
    import torch

    dtype = torch.float32 if m.running_mean.device.type == "mps" else torch.float64
    zeros = torch.zeros(m.running_mean.shape, dtype=dtype, device=m.running_mean.device)
    return Stats(0, zeros, zeros)


def _torch_all_reduce(local: dict[Any, Stats], group: Any) -> dict[Any, Stats]:
    """Every layer's summary over all processes of ``group``: one all-reduce of the counts, then the exact merge
    (:func:`multibn.algorithm.merge_stats`) with sums over the processes."""
    import torch

    be = get_backend("torch")
    first = next(iter(local.values()))
    counts = torch.tensor([s.count for s in local.values()], dtype=torch.int64, device=first.mean.device)
    totals = be.all_reduce_sum(counts, group).tolist()
    return {m: merge_stats(st, total, lambda a: be.all_reduce_sum(a, group))
            for (m, st), total in zip(local.items(), totals, strict=True)}


# ---- MXNet Gluon --------------------------------------------------------------------------------------------
def recompute_statistics_gluon(
    net: Any, batches: Iterable[Any], *, num_batches: int | None = None, progress: bool | TextIO = True,
    ctx: Any = None,
) -> Any:
    """Set every BN block's ``running_mean`` and ``running_var`` to the exact statistics of its training-mode
    inputs (Gluon; the module docstring has the definition).

    Args:
        net: a Gluon ``Block`` with initialised parameters. Its BN blocks are ``gluon.nn.BatchNorm`` (and its
            subclasses, ``contrib.nn.SyncBatchNorm`` among them) and :class:`multibn.layers.gluon.BatchNorm`.
        batches, num_batches, progress: as for :func:`recompute_statistics_torch`.
        ctx: copy each input to this context first (default: as given).

    The net runs in training mode, not recording (``autograd.pause(train_mode=True)``); hybridized blocks run
    imperatively for the duration (so that each BN block sees its input) and are hybridized again afterwards.
    Stored, on every context: ``mean`` and ``M2 / N`` (Gluon's biased variance), or ``M2 / (N - 1)`` for a
    multibn block with an unbiased convention. Every other parameter and the multibn block's update counter
    keep their values. Returns ``net``.
    """
    from .backends.mxnet import mx
    from .layers.gluon import BatchNorm

    gluon = mx.gluon
    if not isinstance(net, gluon.Block):
        raise TypeError(f"net must be an mxnet.gluon.Block, got {type(net).__name__}")
    seen: dict[int, Any] = {}
    net.apply(lambda b: seen.setdefault(id(b), b))  # a block shared by several parents counts once
    blocks = list(seen.values())
    layers: dict[Any, tuple[str, int, bool]] = {}
    for b in blocks:
        if isinstance(b, BatchNorm):
            layers[b] = (b.name, b.axis, b.convention.unbiased_running_var)
        elif isinstance(b, gluon.nn.BatchNorm):
            layers[b] = (b.name, b._kwargs["axis"], False)
    if not layers:
        warnings.warn("recompute_statistics: the net has no batch-norm block (a SymbolBlock's layers are not "
                      "blocks)", stacklevel=2)
        return net
    try:
        saved = {b: _gluon_snapshot(b) for b in layers}
    except gluon.parameter.DeferredInitializationError as e:
        raise ValueError(f"net's parameters are not initialised yet ({e}): initialise or load them first") from e
    moments = {b: ChannelMoments(axis) for b, (_, axis, _) in layers.items()}

    def capture(block: Any, inputs: tuple[Any, ...]) -> None:
        moments[block].partial_fit(inputs[0])

    def step(x: Any) -> None:
        if ctx is not None:
            x = x.as_in_context(ctx) if isinstance(x, mx.nd.NDArray) else mx.nd.array(x, ctx=ctx)
        net(x)

    hybrid = [b for b in blocks if isinstance(b, gluon.HybridBlock) and b._active]
    handles = [b.register_forward_pre_hook(capture) for b in layers]
    try:
        for b in hybrid:
            b._active = False  # imperative for the duration: a hybridized parent would skip its children's hooks
        with mx.autograd.pause(train_mode=True):
            _run(batches, num_batches, progress, "recompute_statistics", step)
    finally:
        for h in handles:
            h.detach()
        for b in hybrid:
            b._active = True  # the cached graph is still valid: the parameters were written in place
        for restore in saved.values():
            restore()
    for b, (_, _, unbiased) in layers.items():
        m = moments[b]
        if m.count > 0:
            b.running_mean.set_data(m.mean.astype(b.running_mean.dtype))
            b.running_var.set_data(m.var(1 if unbiased and m.count > 1 else 0).astype(b.running_var.dtype))
    _warn_unreached([name for b, (name, _, _) in layers.items() if moments[b].count == 0])
    mx.nd.waitall()
    return net


def _gluon_snapshot(block: Any) -> Callable[[], None]:
    """A function that puts back every parameter of ``block`` (on every context) and its update counter."""
    arrays = [a for p in block.collect_params().values() for a in p.list_data()]
    counter = getattr(block, "num_batches_tracked", None)
    if callable(counter):  # multibn's Block keeps a per-context counter outside its parameters
        arrays += [counter(c) for c in block.running_mean.list_ctx()]
    copies = [a.copy() for a in arrays]

    from .backends.mxnet import mx

    def restore() -> None:
        mx.nd.waitall()  # multibn's operator counts in callbacks MXNet runs later: let them land first
        for a, c in zip(arrays, copies, strict=True):
            a[:] = c

    return restore


# ---- Flax ---------------------------------------------------------------------------------------------------
def recompute_statistics_flax(
    model: Any, variables: Any, batches: Iterable[Any], *, num_batches: int | None = None,
    progress: bool | TextIO = True, **apply_kwargs: Any,
) -> Any:
    """The ``variables`` of a ``flax.linen`` model with every BN layer's ``batch_stats`` ``mean`` and ``var`` set
    to the exact statistics of its training-mode inputs (the module docstring has the definition).

    Args:
        model: a ``flax.linen.Module``; its BN layers are ``flax.linen.BatchNorm`` and
            :class:`multibn.layers.flax.BatchNorm`.
        variables: its variables (``{"params": ..., "batch_stats": ...}``); not modified.
        batches, num_batches, progress: as for :func:`recompute_statistics_torch`.
        apply_kwargs: passed to ``model.apply`` with each input, as in a training step: what puts the model in
            training mode (e.g. ``train=True``), ``rngs`` for dropout. ``mutable`` is set here.

    Each batch runs ``model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)`` under ``jax.jit``;
    ``flax.linen.intercept_methods`` captures each BN layer's input and its per-batch summary, and the summaries
    are merged in float64 on the host. A BN layer that runs with ``use_running_average=True`` is an error (pass
    the model's training flag), as are ``mask=`` and ``axis_name`` (per-device statistics of a mapped axis).
    Stored: ``mean`` and ``M2 / N`` (Flax's biased variance), or ``M2 / (N - 1)`` for a multibn layer with an
    unbiased convention, in the dtype and shape they had. Everything else, ``num_batches_tracked`` of a multibn
    layer included, is returned as given. Layers called several times per batch get the statistics of all
    their inputs.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax.core import freeze, unfreeze
    from flax.core.frozen_dict import FrozenDict

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if "mutable" in apply_kwargs:
        raise TypeError("recompute_statistics sets mutable=['batch_stats'] itself; do not pass mutable")
    be = get_backend("jax")
    unbiased: dict[str, bool] = {}

    def stats_of(module: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Stats:
        info = _flax_layer(module)
        use_ra = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        if use_ra is None:
            use_ra = module.use_running_average
        if use_ra:
            raise ValueError(f"the batch-norm layer {path} ran with use_running_average=True: pass what puts the "
                             "model in training mode to recompute_statistics (e.g. train=True)")
        if kwargs.get("mask") is not None:
            raise NotImplementedError(f"the batch-norm layer {path} got mask=: recompute_statistics supports "
                                      "unmasked inputs only")
        if module.axis_name is not None:
            raise NotImplementedError(f"the batch-norm layer {path} has axis_name={module.axis_name!r}: "
                                      "recompute_statistics runs outside any mapped axis")
        unbiased[path] = info
        x = jnp.asarray(args[0] if args else kwargs["x"])
        axes = module.axis if isinstance(module.axis, Iterable) else (module.axis,)
        features = sorted({a % x.ndim for a in axes})
        others = [a for a in range(x.ndim) if a not in features]
        x = x.transpose(*others, *features).reshape(-1, int(np.prod([x.shape[a] for a in features])))
        st = batch_stats(be, x, Layout.of(tuple(x.shape), 1))
        return Stats(jnp.asarray(st.count, jnp.int32), st.mean, st.m2)

    def capture(variables: Any, x: Any) -> dict[str, list[Stats]]:
        captured: dict[str, list[Stats]] = {}

        def interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                        context: Any) -> Any:
            if context.method_name == "__call__" and _flax_layer(context.module) is not None:
                path = "/".join(context.module.path)
                captured.setdefault(path, []).append(stats_of(context.module, path, args, kwargs))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)
        return captured

    jitted = jax.jit(capture)
    moments: dict[str, ChannelMoments] = {}

    def step(x: Any) -> None:
        for path, parts in jitted(variables, x).items():
            acc = moments.setdefault(path, ChannelMoments(dtype="float64"))
            for st in parts:
                acc.merge(Stats(int(st.count), np.asarray(st.mean, np.float64), np.asarray(st.m2, np.float64)))

    _run(batches, num_batches, progress, "recompute_statistics", step)
    out = unfreeze(variables)
    for path, m in moments.items():
        if m.count == 0:
            continue
        node = out.get("batch_stats", {})
        for key in filter(None, path.split("/")):  # "" is a BatchNorm that is the model itself
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if "mean" not in node or "var" not in node:
            raise ValueError(f"variables have no batch_stats/{path}/mean and var for the batch-norm layer {path}")
        var = m.var(1 if unbiased[path] and m.count > 1 else 0)
        node["mean"] = jnp.asarray(m.mean.reshape(node["mean"].shape), node["mean"].dtype)
        node["var"] = jnp.asarray(var.reshape(node["var"].shape), node["var"].dtype)
    _warn_unreached([p for p, m in moments.items() if m.count == 0])
    return freeze(out) if isinstance(variables, FrozenDict) else out


def _flax_layer(module: Any) -> bool | None:
    """None for a module that is no BN layer; else whether it stores the unbiased variance."""
    import flax.linen as nn

    if type(module).__module__ == "multibn.layers.flax" and type(module).__name__ == "BatchNorm":
        from .conventions import resolve_convention

        return resolve_convention(module.convention, None, None).unbiased_running_var
    if isinstance(module, nn.BatchNorm):
        return False
    return None
