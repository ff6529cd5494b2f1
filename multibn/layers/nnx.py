"""``BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm`` that runs :func:`multibn.batch_norm`.

::

    from flax import nnx
    from multibn.layers.nnx import BatchNorm       # instead of nnx.BatchNorm

    bn = BatchNorm(16, momentum=0.9, rngs=nnx.Rngs(0))
    y = bn(x)          # training (use_running_average=False): batch statistics, bn.mean / bn.var move
    bn.eval()          # or model.eval(): use_running_average=True
    y = bn(x)          # the running statistics

The constructor, the attributes (``scale``, ``bias``: ``nnx.Param``; ``mean``, ``var``: ``nnx.BatchStat`` in
float32) and ``train()``/``eval()`` are Flax's, so ``nnx.jit``, ``nnx.value_and_grad``, ``nnx.Optimizer`` and
``nnx.state(model, nnx.BatchStat)`` work unchanged. The differences are those of
:class:`multibn.layers.flax.BatchNorm`: two-pass statistics (``use_fast_variance`` is ignored), the analytic
backward, exact synchronisation over ``axis_name``, and ``convention=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.nn import initializers

from ..conventions import Convention
from ..state import BNState, RenormState
from .flax import (
    check_axis_index_groups,
    feature_axes,
    flax_convention,
    needs_counter,
    normalize,
    variant_keywords,
)

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
    """``flax.nnx.BatchNorm`` computed by :func:`multibn.batch_norm`.

    Arguments as in Flax (``num_features``, ``use_running_average``, ``axis``, ``momentum``, ``epsilon``,
    ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
    ``axis_index_groups``, ``use_fast_variance``, ``rngs``) plus ``convention`` (default ``"flax"``) and the BN
    variants' ``renorm``, ``renorm_clipping``, ``renorm_momentum``, ``virtual_batch_size`` (batch statistics
    ``std``, ``renorm_mean``, ``renorm_std`` under renorm), with the meanings of
    :class:`multibn.layers.flax.BatchNorm`: ``momentum`` weighs the old value and ``momentum``/``epsilon`` None
    take the convention's (0.99 and 1e-5 for ``"flax"``); ``axis_index_groups`` must be None.
    Training: ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` with the batch's mean and biased variance
    (over the elements where ``mask`` is True when given), and ``mean``/``var`` move; eval: the stored ones.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = None,
        epsilon: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros,
        scale_init: Any = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        convention: str | Convention = "flax",
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        conv = flax_convention(convention, momentum, epsilon)
        check_axis_index_groups(axis_index_groups)
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.num_batches_tracked = (
            nnx.BatchStat(jnp.zeros((), jnp.int32)) if needs_counter(conv) else nnx.data(None)
        )
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else nnx.data(None)
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.convention = convention
        self.renorm, self.renorm_momentum, self.virtual_batch_size = bool(renorm), renorm_momentum, virtual_batch_size
        self.renorm_clipping = nnx.data(dict(renorm_clipping or {}))
        if renorm:
            self.std = nnx.BatchStat(jnp.ones(shape, jnp.float32))
            self.renorm_mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
            self.renorm_std = nnx.BatchStat(jnp.ones(shape, jnp.float32))

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalise ``x``; in training update ``mean`` and ``var`` (and the counter of ``"torch_cma"``)."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average is None: pass it to the constructor, the call, or use train()/eval()")
        conv = flax_convention(self.convention, self.momentum, self.epsilon)
        check_axis_index_groups(self.axis_index_groups)
        x = jnp.asarray(x)
        axes = feature_axes(self.axis, x.ndim)
        counter = self.num_batches_tracked
        stats = BNState(self.mean.value, self.var.value, jnp.zeros((), jnp.int32) if counter is None else counter.value)
        renorm_vars = (self.std, self.renorm_mean, self.renorm_std) if self.renorm else ()
        if renorm_vars:
            stats = RenormState(*stats, *(v.value for v in renorm_vars))
        y, new = normalize(
            x, self.scale.value if self.scale is not None else None, self.bias.value if self.bias is not None else None,
            stats, training=not use_running_average, conv=conv, axes=axes, dtype=self.dtype,
            sync=self.axis_name, mask=mask,
            variants=variant_keywords(self.renorm, self.renorm_clipping, self.renorm_momentum,
                                      self.virtual_batch_size),
        )
        if not use_running_average:
            for var, value in zip(renorm_vars, new[3:], strict=True):
                var.value = value
            self.mean.value, self.var.value = new.running_mean, new.running_var
            if counter is not None:
                counter.value = new.num_batches_tracked.astype(counter.value.dtype)
        return y
