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
are the last ones, and ``convention=`` selects another framework's rules. Integer and boolean input, rank-1
input and feature axes that are all of the input's are taken as Flax takes them. One dtype differs on purpose: the
running statistics stay in the dtype ``init`` made them (float32 unless ``force_float32_reductions=False``), where
Flax's become float64 after an update with float64 input under x64; a state whose dtypes change between steps
makes a jitted step retrace and a ``lax.scan``/``fori_loop`` carry fail. The update is computed in the input's
precision and rounded once; ``param_dtype=jnp.float64, force_float32_reductions=False`` keeps float64 statistics.
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

from ..api import batch_norm
from ..conventions import Convention, check_momentum, resolve_convention
from ..moments import ChannelMoments
from ..state import BNState, RenormState
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
    if not axes:
        raise ValueError(f"axis={axis!r} must name at least one feature axis")
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
    variants: dict[str, Any] | None = None,
) -> tuple[jax.Array, BNState]:
    """``(y, new_stats)`` of :func:`multibn.batch_norm` (with the BN variants' keywords ``variants`` in training)
    with Flax's dtype rule: ``y`` in ``dtype``, or when that
    is None in ``result_type(x, scale, bias)`` promoted to at least float32 if it is not floating, computed in at
    least that dtype (a bfloat16 ``x`` with float32 params gives a float32 ``y``, as in Flax; integer and boolean
    ``x`` are cast to ``promote_types(x.dtype, float32)`` first, as Flax's statistics do). ``mask`` is passed
    only when given, and only in training (eval normalises every position with the running statistics, as Flax
    does). Several feature ``axes`` are moved last and flattened into one channel axis (params and statistics
    keep their shape ``x.shape[axes]``). Feature axes that are all of ``x``'s (rank-1 input with ``axis=-1``)
    leave one element per feature, as in Flax: a batch of one (a leading axis of size 1 is added, then removed)."""
    given = jnp.result_type(x)
    if jnp.issubdtype(given, jnp.integer) or jnp.issubdtype(given, jnp.bool_):
        x = x.astype(jnp.promote_types(given, jnp.float32))
    elif not jnp.issubdtype(given, jnp.floating):
        raise TypeError(f"x must have a floating, integer or boolean dtype, got {given}")
    out = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
        *(a for a in (jnp.zeros((), given), scale, bias) if a is not None))
    if dtype is None and not jnp.issubdtype(out, jnp.inexact):
        out = jnp.promote_types(jnp.float32, out)  # flax.linen.dtypes.canonicalize_dtype
    compute = jnp.promote_types(x.dtype, out)
    x = x.astype(compute) if x.dtype != compute else x
    mask = mask if training else None
    if len(axes) == x.ndim:
        y, new = normalize(x[None], scale, bias, stats, training=training, conv=conv,
                           axes=tuple(a + 1 for a in axes), dtype=out, sync=sync,
                           mask=None if mask is None else mask[None], variants=variants)
        return y[0], new
    if len(axes) == 1:
        return _cast(_batch_norm(x, scale, bias, stats, training, conv, axes[0], sync, mask, variants), out)
    # several feature axes: move them last and flatten them into one channel axis, then undo that
    last = tuple(range(x.ndim - len(axes), x.ndim))
    moved = jnp.moveaxis(x, axes, last).shape

    def flat(a: jax.Array) -> jax.Array:
        return jnp.moveaxis(jnp.broadcast_to(a, x.shape), axes, last).reshape(*moved[: last[0]], -1)

    shape = stats.running_mean.shape  # the per-feature statistics, flattened and back (the counter is 0-d)
    flat_stats = type(stats)(*(a.reshape(-1) if a.ndim else a for a in stats))
    y, new = _batch_norm(
        flat(x), None if scale is None else scale.reshape(-1), None if bias is None else bias.reshape(-1),
        flat_stats, training, conv, -1, sync, None if mask is None else flat(mask), variants,
    )
    y = jnp.moveaxis(y.reshape(moved), last, axes)
    return _cast((y, type(new)(*(a.reshape(shape) if a.ndim else a for a in new))), out)


def _batch_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, stats: BNState, training: bool,
    conv: Convention, axis: int, sync: str | None, mask: jax.Array | None, variants: dict[str, Any] | None = None,
) -> tuple[jax.Array, BNState]:
    extra = {"mask": mask} if mask is not None else {}  # mask= only when given
    if training and variants:
        extra.update(variants)
    return batch_norm(x, scale, bias, stats, training=training, convention=conv, axis=axis, backend="jax",
                      sync=sync if training else None, **extra)


def variant_keywords(renorm: bool, renorm_clipping: dict[str, float] | None, renorm_momentum: float,
                     virtual_batch_size: int | None) -> dict[str, Any]:
    """A layer's BN-variant fields (Keras's names) as :func:`multibn.batch_norm`'s keywords."""
    out: dict[str, Any] = {}
    if renorm:
        out = {"renorm": dict(renorm_clipping or {}), "renorm_momentum": renorm_momentum}
    if virtual_batch_size:
        out["virtual_batch_size"] = virtual_batch_size
    return out


def _cast(result: tuple[jax.Array, BNState], out: Any) -> tuple[jax.Array, BNState]:
    y, new = result
    return y.astype(out) if y.dtype != out else y, new


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` computed by :func:`multibn.batch_norm`.

    Fields as in Flax (``use_running_average``, ``axis``, ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``,
    ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``), plus:

    Args:
        renorm, renorm_clipping, renorm_momentum: batch renormalisation, with Keras's names and meanings
            (:func:`multibn.batch_norm`'s ``renorm=``); ``batch_stats`` then also hold ``std``, ``renorm_mean``
            and ``renorm_std`` (``mean``/``var`` stay the inference statistics).
        virtual_batch_size: ghost batch norm in training, sub-batches of this many samples along axis 0.
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
    renorm: bool = False
    renorm_clipping: dict[str, float] | None = None
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None

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
        renorm_vars = ()
        if self.renorm:
            renorm_vars = tuple(self.variable("batch_stats", name, lambda s, v=v: jnp.full(s, v, stats_dtype), shape)
                                for name, v in (("std", 1.0), ("renorm_mean", 0.0), ("renorm_std", 1.0)))
            stats = RenormState(*stats, *(v.value for v in renorm_vars))
        initializing = self.is_initializing()
        y, new = normalize(
            x, scale, bias, stats, training=not use_running_average, conv=conv, axes=axes, dtype=self.dtype,
            sync=None if initializing else self.axis_name, mask=mask,
            variants=variant_keywords(self.renorm, self.renorm_clipping, self.renorm_momentum,
                                      self.virtual_batch_size),
        )
        if not use_running_average and not initializing:
            for var, value in zip(renorm_vars, new[3:], strict=True):
                var.value = value
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
    unbiased: dict[str, bool] = {}
    renorm_eps: dict[str, float] = {}  # the eps of renorm layers, whose std follows the recomputed var

    def rows_of(module: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> jax.Array:
        """The layer's input as (rows, channels): summarised on the host in float64 (whatever the split of the
        data into batches, the merged statistics are then those of the data)."""
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
        if isinstance(module, BatchNorm) and module.renorm:
            renorm_eps[path] = flax_convention(module.convention, module.momentum, module.epsilon).eps
        x = jnp.asarray(args[0] if args else kwargs["x"])
        axes = module.axis if isinstance(module.axis, Iterable) else (module.axis,)
        features = sorted({a % x.ndim for a in axes})
        others = [a for a in range(x.ndim) if a not in features]
        return x.transpose(*others, *features).reshape(-1, int(np.prod([x.shape[a] for a in features])))

    def capture(variables: Any, x: Any) -> dict[str, list[jax.Array]]:
        captured: dict[str, list[jax.Array]] = {}

        def interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                        context: Any) -> Any:
            if context.method_name == "__call__" and _unbiased(context.module) is not None:
                path = "/".join(context.module.path)
                captured.setdefault(path, []).append(rows_of(context.module, path, args, kwargs))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)
        return captured

    jitted = jax.jit(capture)
    moments: dict[str, ChannelMoments] = {}

    def step(x: Any) -> None:
        for path, parts in jitted(variables, x).items():
            acc = moments.setdefault(path, ChannelMoments(axis=1, dtype="float64"))
            for rows in parts:
                acc.partial_fit(np.asarray(rows))

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
        if path in renorm_eps:  # renorm derives var from std: keep them agreeing
            node["std"] = jnp.sqrt(node["var"] + renorm_eps[path]).astype(node["std"].dtype)
    _recompute.warn_unreached([p for p, m in moments.items() if m.count == 0])
    return freeze(out) if isinstance(variables, FrozenDict) else out


def _unbiased(module: Any) -> bool | None:
    """None for a module that is no BN layer; else whether it stores the unbiased variance."""
    if isinstance(module, BatchNorm):
        return resolve_convention(module.convention, None, None).unbiased_running_var
    if isinstance(module, nn.BatchNorm):
        return False
    return None
