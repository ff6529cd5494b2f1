"""JAX adapter (CPU and GPU through XLA): ``jax.numpy``, autodiff through ``jax.custom_jvp``.

JAX keeps float64 only with ``jax_enable_x64``; without it multibn refuses float64 input rather than let JAX
truncate it silently. ``num_batches_tracked`` is int32 unless x64 is on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .base import Array, Backend, Rule


def _committed(a: Array) -> bool:
    """Whether ``a`` is a concrete array placed on its device explicitly (a tracer has no placement)."""
    return not isinstance(a, jax.core.Tracer) and bool(getattr(a, "committed", False))


def _device(device: object) -> object:
    """A ``jax.Device`` for ``"cpu"``, ``"gpu:1"``, ``"cuda:0"`` (platform, index); anything else as it is."""
    if not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    return jax.devices("gpu" if kind == "cuda" else kind)[int(index or 0)]


def _rows(x: Array, center: Array | None, axes: Sequence[int]) -> tuple[Array, Array | None, tuple[int, ...]]:
    """Channels last with every other axis reduced: ``x`` as (rows, C), ``center`` as (1, C), axes ``(0,)``."""
    axes = tuple(axes)
    if x.ndim <= 2 or axes != tuple(range(x.ndim - 1)):
        return x, center, axes
    c = x.shape[-1]
    return x.reshape(-1, c), None if center is None else center.reshape(1, c), (0,)


class JaxBackend(Backend):
    name = "jax"
    xp = jnp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, jax.Array)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if dtype is None and isinstance(obj, np.ndarray):
            dtype = obj.dtype.name
        if dtype is not None:
            self.dtype(dtype)  # refuses float64 without x64
        a = jnp.asarray(obj, dtype=dtype)
        return a if device is None else jax.device_put(a, _device(device))

    def to_numpy(self, a: Array) -> np.ndarray:
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def dtype(self, name: str) -> object:
        if name == "float64" and not jax.config.jax_enable_x64:
            raise TypeError(
                "float64 on the jax backend needs jax_enable_x64 "
                "(jax.config.update('jax_enable_x64', True)); without it JAX truncates to float32"
            )
        return jnp.dtype(name)

    def device_of(self, a: Array) -> object:
        if isinstance(a, jax.core.Tracer) or len(a.devices()) != 1:
            return None  # under jit placement follows the inputs; a sharded array has no one device
        return next(iter(a.devices()))

    def placement(self, x: Array) -> object:
        # an uncommitted x (or a tracer) leaves its partners uncommitted too: JAX places them
        return self.device_of(x) if _committed(x) else None

    def device_clash(self, a: Array, ref: Array) -> tuple[object, object] | None:
        # an uncommitted array (made without a device) follows the committed one, as in any JAX computation
        if not (_committed(a) and _committed(ref)):
            return None
        da, dr = self.device_of(a), self.device_of(ref)
        return None if da is None or dr is None or da == dr else (da, dr)

    def full(self, n: int, value: float, dtype: str, device: object = None) -> Array:
        return super().full(n, value, dtype, _device(device))

    def counter(self, value: int = 0, device: object = None) -> Array:
        return self.asarray(value, "int64" if jax.config.jax_enable_x64 else "int32", device)

    def sync_group(self, sync: object) -> object:
        if not isinstance(sync, str):
            raise TypeError(
                f"sync on the jax backend must be the name of a mapped axis (shard_map, pmap), got {sync!r}"
            )
        return sync

    def gather_ints(self, values: tuple[int, ...], group: object) -> tuple[tuple[int, ...], ...]:
        return (values,) * jax.lax.psum(1, group)  # one program on shards of one array: every replica's are equal

    def all_reduce_sum(self, a: Array, group: object) -> Array:
        return jax.lax.psum(a, group)

    def concrete(self, a: Array) -> bool:
        return not isinstance(a, jax.core.Tracer)

    # ---- kernels: XLA:CPU reduces a (rows, C) array over its rows faster than the same data as (N, H, W, C) over
    # three axes, and two sums of one producer become one multi-output loop that runs slower than the two sums
    # apart; an optimisation barrier on two per-channel vectors keeps them apart. Primal only: no derivative
    # differentiates these kernels (the op's derivatives are its rule's).
    def channel_sum(self, x: Array, axes: Sequence[int], dtype: object) -> Array:
        x, _, axes = _rows(x, None, axes)
        return jnp.sum(x.astype(dtype), axis=axes)

    def channel_dev_sums(self, x: Array, center: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        x, center, axes = _rows(x, center, axes)
        if x.ndim - 1 in axes:  # channels first: one variadic reduction, both sums in one pass over x, is fastest
            d = x.astype(center.dtype) - center
            zero = jnp.zeros((), center.dtype)
            return jax.lax.reduce((d, d * d), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)
        s = jnp.sum(x.astype(center.dtype) - center, axis=axes)
        s, center = jax.lax.optimization_barrier((s, center))
        d = x.astype(center.dtype) - center
        return s, jnp.sum(d * d, axis=axes)

    def backward_sums(self, dy: Array, x: Array, mean: Array, axes: Sequence[int]) -> tuple[Array, Array]:
        x, mean, axes = _rows(x, mean, axes)
        g = dy.reshape(x.shape).astype(mean.dtype)  # a tangent or cotangent of x: x's shape
        return jnp.sum(g, axis=axes), jnp.sum(g * (x.astype(mean.dtype) - mean), axis=axes)

    def custom_op(self, make_rule: Callable[[Backend], Rule]) -> Callable[..., tuple[Array, ...]]:
        """A jitted ``jax.custom_jvp`` with the rule's ``jvp`` (``sync`` a static argument): forward mode directly,
        reverse mode by JAX's transposition of that linear rule (which also sums the cotangents of parameters
        replicated over ``shard_map`` axes), and every higher order by differentiating the rule, which calls the op
        itself again."""
        rule = make_rule(self)

        @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
        def op(sync: Any, *inputs: Array) -> tuple[Array, ...]:
            return tuple(rule.forward(sync, *inputs))

        @op.defjvp
        def op_jvp(sync: Any, primals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[tuple, tuple]:
            outputs = op(sync, *primals)
            return outputs, tuple(rule.jvp(rule.residuals(sync, primals, outputs), tangents[: rule.n_diff]))

        # compiled whole: called eagerly the op is one dispatch and one XLA compile per input signature (rather than
        # one of each per primitive), and gives the numbers it gives inside a caller's jit, where it is inlined
        return jax.jit(op, static_argnums=(0,))
