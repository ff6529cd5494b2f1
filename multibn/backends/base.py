"""What an adapter provides: an array namespace, conversions, five kernels and one autodiff hook.

The batch-norm maths lives in :mod:`multibn.algorithm`; it calls only

* ``xp``: an array-API namespace (``array_api_compat`` for NumPy/PyTorch, ``jax.numpy`` for JAX, a small
  hand-written one for MXNet), used on per-channel vectors;
* the five kernels below, the only code that touches the full-size tensors. Their generic versions here are
  plain array-API code; an adapter may override one with something faster that computes the same quantity;
* :meth:`Backend.blend` and :meth:`Backend.reciprocal`, two per-channel expressions an adapter may evaluate in
  fewer ops (the generic versions are the plain array-API expressions);
* :meth:`Backend.custom_op`, which wires a forward and its analytic derivatives (backward and tangent rule) into
  the framework's autodiff;
* for synchronised BN, the framework's collectives (torch.distributed, JAX's named-axis collectives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import array_api_compat
import numpy as np

Array = Any
Rule = Any  # multibn.algorithm.Rule (not imported here: algorithm imports this module)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Backend:
    """One framework. Subclasses set the class attributes and implement the conversions."""

    name: ClassVar[str]
    xp: Any

    # ---- arrays: identity, conversion, dtypes --------------------------------------------------------
    def is_array(self, obj: object) -> bool:
        raise NotImplementedError

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        """``obj`` (a NumPy array, a Python sequence or scalar, or an array of this backend) as an array."""
        raise NotImplementedError

    def to_numpy(self, a: Array) -> np.ndarray:
        raise NotImplementedError

    def dtype_name(self, a: Array) -> str:
        """The dtype of ``a`` as a NumPy-style name: ``"float32"``, ``"int64"``, ``"bfloat16"``..."""
        return str(a.dtype).rsplit(".", 1)[-1]

    def dtype(self, name: str) -> Any:
        """The backend's dtype object for a name in :data:`FLOAT_DTYPES` (TypeError if it has none)."""
        try:
            return getattr(self.xp, name)
        except AttributeError:
            raise TypeError(f"the {self.name} backend has no {name} dtype") from None

    def device_of(self, a: Array) -> Any:
        return array_api_compat.device(a)

    def signature(self, arrays: Sequence[object]) -> tuple | None:
        """What the checks of a call depend on besides shapes: a hashable summary of each array (None stays None)
        that equals another's only for arrays of the same type, dtype and device; None when calls on this backend
        are not to be cached (the default). It may raise for an object that is not an array of this backend."""
        return None

    def full(self, n: int, value: float, dtype: str, device: object = None) -> Array:
        return self.xp.full((n,), value, dtype=self.dtype(dtype), device=device)

    def counter(self, value: int = 0, device: object = None) -> Array:
        """A 0-d integer array for ``num_batches_tracked``."""
        return self.xp.asarray(value, dtype=self.xp.int64, device=device)

    def as_mask(self, mask: object, shape: tuple[int, ...], device: object = None) -> Array:
        """A boolean ``mask`` (an array of this backend or a NumPy array) broadcast to ``shape``."""
        if not self.is_array(mask):
            mask = self.asarray(mask, device=device)
        return self.xp.broadcast_to(mask, shape)

    def concrete(self, a: Array) -> bool:
        """Whether the values of ``a`` can be read now (not a tracer of a transform being compiled)."""
        return True

    def quiet(self) -> contextlib.AbstractContextManager:
        """A context in which inf and NaN arise silently (the documented results for eps=0 or NaN input), as
        they do on every framework but NumPy, which warns."""
        return contextlib.nullcontext()

    def untracked(self) -> contextlib.AbstractContextManager:
        """A context whose operations autodiff does not record (the running-statistics update)."""
        return contextlib.nullcontext()

    # ---- per-channel vectors ----------------------------------------------------------------------------
    def blend(self, keep: Any, a: Array, take: Any, b: Array) -> Array:
        """``keep * a + take * b`` for per-channel vectors (weights: Python floats or arrays); an adapter may
        evaluate it in fewer ops."""
        return take * b + keep * a

    def reciprocal(self, a: Array) -> Array:
        """``1 / a``, elementwise; an adapter may evaluate it in fewer ops."""
        return 1 / a

    # ---- autodiff hook --------------------------------------------------------------------------------
    def custom_op(self, make_rule: Callable[[Backend], Rule]) -> Callable[..., tuple[Array, ...]]:
        """``op(sync, *inputs) -> outputs`` whose derivatives are those of ``make_rule(self)`` (a
        :class:`multibn.algorithm.Rule`): its ``backward`` for reverse mode, its ``jvp`` for forward mode; ``sync``
        is passed through as a constant. ``make_rule`` takes a backend so that an adapter may run the same rule on
        another (MXNet runs small arrays on NumPy). The generic version has no autodiff: it runs the forward."""
        return make_rule(self).forward

    # ---- synchronised BN: the framework's collectives ------------------------------------------------------
    def sync_group(self, sync: object) -> object:
        """The group that ``batch_norm(..., sync=sync)`` names (torch: True or a ProcessGroup; jax: an axis name)."""
        raise NotImplementedError(
            f"sync is supported on the torch (torch.distributed) and jax (axis names) backends, not on {self.name}"
        )

    def gather_ints(self, values: tuple[int, ...], group: object) -> tuple[tuple[int, ...], ...]:
        """Every replica's ``values`` (a few Python ints describing its call), in replica order."""
        raise NotImplementedError

    def all_reduce_sum(self, a: Array, group: object) -> Array:
        """The sum of ``a`` over the replicas."""
        raise NotImplementedError

    # ---- kernels: the only passes over full-size tensors ------------------------------------------------
    # ``axes`` are the reduced axes; per-channel operands arrive already reshaped to broadcast against x.
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: Any) -> Array:
        """sum_R x, accumulated in ``dtype``."""
        return self.xp.sum(self.xp.astype(x, dtype, copy=False), axis=tuple(axes))

    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        """(sum_R (x - center), sum_R (x - center)^2) in the dtype of ``center`` (the second pass)."""
        d = self.xp.astype(x, center.dtype, copy=False) - center
        return self.xp.sum(d, axis=tuple(axes)), self.xp.sum(d * d, axis=tuple(axes))

    def scale_shift(self, x: Array, scale: Array, shift: Array) -> Array:
        """x * scale + shift, computed in the dtype of ``scale``, returned in the dtype of ``x``."""
        xp = self.xp
        return xp.astype(xp.astype(x, scale.dtype, copy=False) * scale + shift, x.dtype, copy=False)

    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        """(sum_R dy, sum_R dy * (x - mean)) in the dtype of ``mean``."""
        xp = self.xp
        g = xp.astype(dy, mean.dtype, copy=False)
        d = xp.astype(x, mean.dtype, copy=False) - mean
        return xp.sum(g, axis=tuple(axes)), xp.sum(g * d, axis=tuple(axes))

    def backward_apply(self, dy: Array, x: Array, mean: Array, a: Array, b: Array, c: Array) -> Array:
        """a * dy + b * (x - mean) + c, computed in the dtype of ``a``, returned in the dtype of ``x``."""
        xp = self.xp
        d = xp.astype(x, a.dtype, copy=False) - mean
        return xp.astype(xp.astype(dy, a.dtype, copy=False) * a + d * b + c, x.dtype, copy=False)

