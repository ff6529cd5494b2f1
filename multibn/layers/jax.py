"""``BatchNorm``: a pure JAX layer over :func:`multibn.batch_norm`: ``init`` and ``apply``, no hidden state.

::

    from multibn.layers.jax import BatchNorm
    bn = BatchNorm(16)                               # convention "flax": channels last, momentum 0.99
    params, state = bn.init()
    y, state = jax.jit(bn.apply, static_argnames="training")(params, state, x, training=True)

``params`` is ``{"scale": (C,), "bias": (C,)}`` (empty without ``affine``), named as in Flax, and ``apply``
refuses any other tree; ``state`` is a :class:`multibn.BNState` (a pytree) kept in float32 whatever the dtype of
the params. ``apply`` is a pure function of its arguments, so it works under
``jax.jit``, ``jax.vmap`` and every autodiff transform (the op's ``jax.custom_jvp`` with the one tangent rule).
:meth:`BatchNorm.to_flax` / :meth:`BatchNorm.from_flax` convert to and from Flax's
``{"params": ..., "batch_stats": {"mean", "var"}}`` variables.

This layer needs only JAX. With Flax, :mod:`multibn.layers.flax` and :mod:`multibn.layers.nnx` replace
``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` inside a Flax model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ..api import batch_norm, init_state
from ..conventions import Convention, resolve_convention
from ..state import BNState, RenormState
from . import check_layer_args

__all__ = ["BatchNorm"]


class BatchNorm:
    """Batch normalisation over every axis of the input but ``axis``, with a multibn convention.

    Args:
        num_features: channels C, the size of the input along ``axis``.
        convention: a name in :data:`multibn.CONVENTIONS` (default ``"flax"``: momentum 0.99 on the old value,
            eps 1e-5, biased running variance, channels last) or a :class:`multibn.Convention`.
        momentum, eps: override the convention's (None keeps them).
        affine: learnable ``scale`` (ones) and ``bias`` (zeros); False means scale 1 and bias 0, no params.
        axis: the channel axis of the input; None is the convention's (-1 for ``flax``/``keras``, else 1).
        renorm, renorm_clipping, renorm_momentum: batch renormalisation, with Keras's names and meanings
            (:func:`multibn.batch_norm`'s ``renorm=``): :meth:`init` then gives a :class:`multibn.RenormState`.
        virtual_batch_size: ghost batch norm in training, sub-batches of this many samples along axis 0.
    """

    def __init__(
        self,
        num_features: int,
        *,
        convention: str | Convention = "flax",
        momentum: float | None = None,
        eps: float | None = None,
        affine: bool = True,
        axis: int | None = None,
        axis_name: str | None = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
    ) -> None:
        check_layer_args(num_features, None, axis, axis_may_be_none=True)
        self.convention = resolve_convention(convention, momentum, eps)
        self.num_features = num_features
        self.momentum = self.convention.momentum
        self.eps = self.convention.eps
        self.affine = affine
        self.axis = self.convention.axis if axis is None else axis
        self.axis_name = axis_name  # synchronised BN over this mapped axis (shard_map, pmap) in training
        self.renorm = bool(renorm)
        self.renorm_clipping = dict(renorm_clipping or {})
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, convention={self.convention.name!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, axis={self.axis}, axis_name={self.axis_name!r}"
            + (f", renorm=True, renorm_clipping={self.renorm_clipping}, renorm_momentum={self.renorm_momentum}"
               if self.renorm else "")
            + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "") + ")"
        )

    def init(self, dtype: str = "float32") -> tuple[dict[str, Any], BNState | RenormState]:
        """``(params, state)``: scale ones and bias zeros in ``dtype``; running mean 0, variance 1, counter 0.

        The running statistics are float32 (float64 for float64 params) whatever ``dtype``, as in Flax: in
        bfloat16 an update ``(1 - momentum) * (stat - R)`` below half an ulp of ``R`` would be lost.
        """
        stats_dtype = "float64" if str(jnp.dtype(dtype)) == "float64" else "float32"
        state = init_state(self.num_features, backend="jax", convention=self.convention, dtype=stats_dtype,
                           renorm=self.renorm)
        if not self.affine:
            return {}, state
        return {"scale": jnp.ones((self.num_features,), dtype), "bias": jnp.zeros((self.num_features,), dtype)}, state

    def apply(
        self, params: dict[str, Any], state: BNState | None, x: Any, *, training: bool
    ) -> tuple[Any, BNState | None]:
        """``(y, new_state)`` of :func:`multibn.batch_norm`; in eval (``training=False``) ``new_state`` is ``state``.

        Pure: nothing is modified. Under ``jax.jit`` pass ``training`` as a static argument. ``params`` must be
        ``{"scale", "bias"}`` (``{}`` without ``affine``): any other tree raises rather than default to 1 and 0.
        """
        self._check_params(params)
        variants: dict[str, Any] = {}
        if training and self.renorm:
            variants = {"renorm": self.renorm_clipping, "renorm_momentum": self.renorm_momentum}
        if training and self.virtual_batch_size:
            variants["virtual_batch_size"] = self.virtual_batch_size
        return batch_norm(
            x, params.get("scale"), params.get("bias"), state, training=training, convention=self.convention,
            axis=self.axis, backend="jax", sync=self.axis_name if training else None, **variants,
        )

    __call__ = apply

    def _check_params(self, params: object) -> None:
        want = {"scale", "bias"} if self.affine else set()
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict with keys {sorted(want)}, got {type(params).__name__}")
        if set(params) != want:
            hint = " (pass variables['params'], not the whole variables dict)" if "params" in params else ""
            raise ValueError(
                f"params must have exactly the keys {sorted(want)} (affine={self.affine}), got keys "
                f"{sorted(map(str, params))}{hint}"
            )

    # ---- Flax interchange ---------------------------------------------------------------------------------------
    @staticmethod
    def to_flax(params: dict[str, Any], state: BNState) -> dict[str, Any]:
        """Flax ``linen.BatchNorm`` variables ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``."""
        return {"params": dict(params), "batch_stats": {"mean": state.running_mean, "var": state.running_var}}

    def from_flax(self, variables: dict[str, Any], num_batches_tracked: int = 0) -> tuple[dict[str, Any], BNState]:
        """``(params, state)`` from Flax ``linen.BatchNorm`` variables (Flax has no batch counter)."""
        stats = variables["batch_stats"]
        params = {k: variables["params"][k] for k in ("scale", "bias")} if self.affine else {}
        counter = init_state(self.num_features, backend="jax", convention=self.convention).num_batches_tracked
        return params, BNState(stats["mean"], stats["var"], counter + num_batches_tracked)
