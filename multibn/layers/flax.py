"""``BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm`` that runs :func:`multibn.batch_norm`.

::

    import flax.linen as nn
    from multibn.layers.flax import BatchNorm      # instead of nn.BatchNorm

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(16, (3, 3))(x)
            x = BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(10)(nn.relu(x).reshape(x.shape[0], -1))

    variables = Net().init(key, x, train=False)      # {"params": ..., "batch_stats": {"BatchNorm_0": {"mean", "var"}}}
    y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])

The constructor fields, their meanings and the variables (``params``: ``scale``, ``bias``; ``batch_stats``:
``mean``, ``var``, float32) are Flax's, so checkpoints, optimisers and ``mutable=["batch_stats"]`` work
unchanged. What differs: the statistics are always multibn's two-pass mean and variance in at least float32
(``use_fast_variance`` is accepted and ignored, as is ``force_float32_reductions`` but for the dtype of the
running statistics), the backward is multibn's analytic one, ``axis_name`` merges the replicas' statistics
exactly (count-weighted) instead of averaging their moments, several feature axes cost a transpose unless they
are the last ones, and ``convention=`` selects another framework's rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import freeze, unfreeze
from flax.core.frozen_dict import FrozenDict
from jax.nn import initializers

from ..algorithm import Layout, Stats, batch_stats
from ..api import batch_norm
from ..backends import get_backend
from ..conventions import Convention, check_momentum, resolve_convention
from ..moments import ChannelMoments
from ..state import BNState
from . import _recompute

__all__ = ["BatchNorm", "recompute_statistics"]

Initializer = Any


def flax_convention(convention: str | Convention, momentum: float | None, epsilon: float | None) -> Convention:
    """The convention with Flax's ``momentum`` (always the weight of the old value, ``R <- m R + (1 - m) stat``,
    whatever side the convention's own momentum weighs) and ``epsilon`` applied; None keeps the convention's."""
    conv = resolve_convention(convention, None, None)
    momentum = check_momentum(momentum)
    if momentum is not None and conv.momentum_weighs == "new":
        momentum = 1.0 - momentum
    return conv.with_overrides(momentum, epsilon)


def feature_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Flax's ``axis`` (an int or a sequence of ints) as sorted non-negative feature axes."""
    axes = tuple(axis) if isinstance(axis, Sequence) and not isinstance(axis, str) else (axis,)
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for an input of rank {ndim}, got {axis!r}")
    if not axes or len(axes) == ndim:
        raise ValueError(f"axis={axis!r} must leave at least one axis to reduce over for an input of rank {ndim}")
    return tuple(sorted({a % ndim for a in axes}))


def check_axis_index_groups(axis_index_groups: Any) -> None:
    if axis_index_groups is not None:
        raise NotImplementedError(
            f"axis_index_groups={axis_index_groups!r} is not supported: multibn synchronises over the whole "
            "mapped axis named by axis_name; pass axis_index_groups=None"
        )


def needs_counter(conv: Convention) -> bool:
    """Whether the running update reads ``num_batches_tracked`` (the cumulative average of ``torch_cma``)."""
    return conv.update_weights() is None


def normalize(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, stats: BNState, *, training: bool,
    conv: Convention, axes: tuple[int, ...], dtype: Any, sync: str | None, mask: jax.Array | None,
) -> tuple[jax.Array, BNState]:
    """``(y, new_stats)`` of :func:`multibn.batch_norm` with Flax's dtype rule: ``y`` in ``dtype``, or when that
    is None in ``result_type(x, scale, bias)``, computed in at least that dtype (a bfloat16 ``x`` with float32
    params gives a float32 ``y``, as in Flax). ``mask`` is passed only when given, and only in training (eval
    normalises every position with the running statistics, as Flax does). Several feature ``axes`` are moved
    last and flattened into one channel axis (params and statistics keep their shape ``x.shape[axes]``)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x must have a floating dtype, got {jnp.result_type(x)}")
    out = jnp.dtype(dtype) if dtype is not None else jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    compute = jnp.promote_types(x.dtype, out)
    x = x.astype(compute) if x.dtype != compute else x
    mask = mask if training else None
    if len(axes) == 1:
        return _cast(_batch_norm(x, scale, bias, stats, training, conv, axes[0], sync, mask), out)
    # several feature axes: move them last and flatten them into one channel axis, then undo that
    last = tuple(range(x.ndim - len(axes), x.ndim))
    moved = jnp.moveaxis(x, axes, last).shape

    def flat(a: jax.Array) -> jax.Array:
        return jnp.moveaxis(jnp.broadcast_to(a, x.shape), axes, last).reshape(*moved[: last[0]], -1)

    flat_stats = BNState(stats.running_mean.reshape(-1), stats.running_var.reshape(-1), stats.num_batches_tracked)
    y, new = _batch_norm(
        flat(x), None if scale is None else scale.reshape(-1), None if bias is None else bias.reshape(-1),
        flat_stats, training, conv, -1, sync, None if mask is None else flat(mask),
    )
    y = jnp.moveaxis(y.reshape(moved), last, axes)
    return _cast((y, BNState(new.running_mean.reshape(stats.running_mean.shape),
                             new.running_var.reshape(stats.running_var.shape), new.num_batches_tracked)), out)


def _batch_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, stats: BNState, training: bool,
    conv: Convention, axis: int, sync: str | None, mask: jax.Array | None,
) -> tuple[jax.Array, BNState]:
    extra = {"mask": mask} if mask is not None else {}  # mask= only when given: works before the core has it
    return batch_norm(x, scale, bias, stats, training=training, convention=conv, axis=axis, backend="jax",
                      sync=sync if training else None, **extra)


def _cast(result: tuple[jax.Array, BNState], out: Any) -> tuple[jax.Array, BNState]:
    y, new = result
    return y.astype(out) if y.dtype != out else y, new


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` computed by :func:`multibn.batch_norm`.

    Fields as in Flax (``use_running_average``, ``axis``, ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``,
    ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``), plus:

    Args:
        convention: a name in :data:`multibn.CONVENTIONS` or a :class:`multibn.Convention` (default ``"flax"``).
            It fixes what Flax has no field for: biased or unbiased running variance, ``fix_gamma``, the
            zero-variance guard. ``momentum`` is always Flax's (weight of the old value:
            ``R <- momentum * R + (1 - momentum) * stat``) and ``epsilon`` is added to the variance; both
            None (the default) take the convention's (0.99 and 1e-5 for ``"flax"``, as Flax's defaults).
            The cumulative average of ``"torch_cma"`` adds ``batch_stats/num_batches_tracked``.

    Training: ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` with the batch's mean and biased variance
    (over the elements where ``mask`` is True when a mask is given; every position is normalised), and the
    running statistics move unless the module is initialising. Eval (``use_running_average``): the same with the
    stored ``mean`` and ``var``. ``axis`` is an int or a sequence of feature axes (params and statistics of shape
    ``x.shape[axis]``; several are moved last and flattened into one channel axis).
    ``axis_name`` synchronises over a mapped axis (``shard_map``, ``pmap``), merging the replicas' statistics
    exactly; ``axis_index_groups`` must be None. ``use_fast_variance`` is accepted and ignored: multibn always
    uses its two-pass variance. ``force_float32_reductions=False`` is accepted: the statistics are still
    computed in at least float32, and the running statistics kept in ``promote(param_dtype, float32)``.
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float | None = None
    epsilon: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    convention: str | Convention = "flax"

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalise ``x``; in training (not initialising) update ``batch_stats``, which must then be mutable."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        conv = flax_convention(self.convention, self.momentum, self.epsilon)
        check_axis_index_groups(self.axis_index_groups)
        x = jnp.asarray(x)
        axes = feature_axes(self.axis, x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else jnp.promote_types(self.param_dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape)
        counter = (
            self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
            if needs_counter(conv) else None
        )
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        stats = BNState(ra_mean.value, ra_var.value, jnp.zeros((), jnp.int32) if counter is None else counter.value)
        initializing = self.is_initializing()
        y, new = normalize(
            x, scale, bias, stats, training=not use_running_average, conv=conv, axes=axes, dtype=self.dtype,
            sync=None if initializing else self.axis_name, mask=mask,
        )
        if not use_running_average and not initializing:
            ra_mean.value, ra_var.value = new.running_mean, new.running_var
            if counter is not None:
                counter.value = new.num_batches_tracked.astype(counter.value.dtype)
        return y


# ---- exact population statistics (multibn.layers._recompute has the definition) ------------------------------
def recompute_statistics(
    model: nn.Module, variables: Any, batches: Iterable[Any], *, num_batches: int | None = None,
    progress: bool | TextIO = True, **apply_kwargs: Any,
) -> Any:
    """The ``variables`` of a ``flax.linen`` model with every BN layer's ``batch_stats`` ``mean`` and ``var`` set
    to the exact statistics of its training-mode inputs (:mod:`multibn.layers._recompute` has the definition).

    Args:
        model: a ``flax.linen.Module``; its BN layers are ``flax.linen.BatchNorm`` and :class:`BatchNorm`.
        variables: its variables (``{"params": ..., "batch_stats": ...}``); not modified.
        batches, num_batches, progress: as for :func:`multibn.layers.torch.recompute_statistics`.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if "mutable" in apply_kwargs:
        raise TypeError("recompute_statistics sets mutable=['batch_stats'] itself; do not pass mutable")
    be = get_backend("jax")
    unbiased: dict[str, bool] = {}

    def stats_of(module: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Stats:
        info = _unbiased(module)
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
            if context.method_name == "__call__" and _unbiased(context.module) is not None:
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

    _recompute.run(batches, num_batches, progress, step)
    out = unfreeze(variables)
    for path, m in moments.items():
        if m.count == 0:
            continue
        node = out.get("batch_stats", {})
        for key in filter(None, path.split("/")):  # "" is a BatchNorm that is the model itself
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if "mean" not in node or "var" not in node:
            raise ValueError(f"variables have no batch_stats/{path}/mean and var for the batch-norm layer {path}")
        var = _recompute.stored_variance(m.stats, unbiased[path])
        node["mean"] = jnp.asarray(m.mean.reshape(node["mean"].shape), node["mean"].dtype)
        node["var"] = jnp.asarray(var.reshape(node["var"].shape), node["var"].dtype)
    _recompute.warn_unreached([p for p, m in moments.items() if m.count == 0])
    return freeze(out) if isinstance(variables, FrozenDict) else out


def _unbiased(module: Any) -> bool | None:
    """None for a module that is no BN layer; else whether it stores the unbiased variance."""
    if isinstance(module, BatchNorm):
        return resolve_convention(module.convention, None, None).unbiased_running_var
    if isinstance(module, nn.BatchNorm):
        return False
    return None
