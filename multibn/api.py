"""The public functions: :func:`batch_norm`, :func:`batch_norm_vjp`, :func:`init_state`. Every call goes through
its plan (:mod:`multibn.plan`): the checks and conversions, then the one algorithm's op."""

from __future__ import annotations

from typing import Any

from .backends import get_backend
from .backends.base import FLOAT_DTYPES
from .conventions import Convention, resolve_convention
from .plan import Variants, describe, index, plan_call
from .state import BNState, RenormState


def batch_norm(
    x: Any, gamma: Any = None, beta: Any = None, state: BNState | None = None, *, training: bool = True,
    convention: str | Convention = "torch", momentum: float | None = None, eps: float | None = None,
    axis: int | None = None, backend: str | None = None, device: Any = None, sync: Any = None, mask: Any = None,
    renorm: dict[str, float] | None = None, renorm_momentum: float = 0.99, virtual_batch_size: int | None = None,
) -> tuple[Any, BNState | RenormState | None]:
    """Batch normalisation of ``x`` over every axis but ``axis``; returns ``(y, new_state)``.

    Training: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch mean and biased variance,
    and ``new_state`` the running statistics moved by the convention's rule (None when ``state`` is None,
    PyTorch's ``track_running_stats=False``). Eval (``training=False``): the same with the running
    statistics, which a ``state`` must supply; ``new_state`` holds the state's arrays unchanged.

    ``gamma``/``beta`` None mean 1/0. ``axis`` None is the convention's channel axis (1, or -1 for
    ``flax``/``keras``). ``momentum``/``eps`` override the convention's. ``backend`` None infers it from the
    arrays; a named backend converts NumPy arrays and Python sequences (onto ``device``). Pure: nothing
    passed in is modified. Differentiable on torch, jax and mxnet, to every order, in reverse and forward mode,
    with respect to ``x``, ``gamma``, ``beta`` and (eval) the running statistics; the new state's statistics are
    differentiable functions of ``x`` too (torch records them outside autograd, as ``nn.BatchNorm*d`` does).

    ``mask`` (training; a boolean array broadcastable to ``x``): the statistics, their running update and the
    backward use only the elements where it is True, with per-channel counts; every element is normalised (Flax's
    semantics). A channel with no element keeps its running statistics and gives ``beta``.

    ``renorm`` (training): batch renormalisation (Ioffe, 2017) as Keras's ``BatchNormalization(renorm=True)``, the
    dict being Keras's ``renorm_clipping`` (keys ``rmin``, ``rmax``, ``dmax``; ``{}`` for none):
    ``y = xhat * (r * gamma) + (d * gamma + beta)`` with ``r = std_B / renorm_std`` and
    ``d = (mean_B - renorm_mean) / renorm_std`` clipped and held constant for differentiation; ``state`` must be a
    :class:`RenormState` (``init_state(C, renorm=True)``), whose ``renorm_mean``/``renorm_std`` move with
    ``renorm_momentum`` and whose running standard deviation moves with ``momentum``
    (``running_var = max(running_std^2 - eps, 0)``). ``virtual_batch_size=k`` (training): ghost batch norm, each
    of the ``N / k`` sub-batches along axis 0 normalised with its own statistics, the running statistics moved once
    with their mean means and variances.

    ``sync`` (training only) normalises with the statistics of the whole batch across replicas, merged exactly
    whatever each replica's count (masked counts included): on torch ``True`` (the default process group) or a
    ``torch.distributed.ProcessGroup``; on jax the name of a mapped axis (``shard_map``, ``pmap``). The
    running statistics then use the global count.
    """
    plan, args = plan_call(x, gamma, beta, state, None, mask, training=training, convention=convention,
                           momentum=momentum, eps=eps, axis=axis, backend=backend, device=device, sync=sync,
                           variants=Variants(renorm, renorm_momentum, virtual_batch_size))
    return tuple(plan.run(args))


def batch_norm_vjp(
    x: Any, gamma: Any, beta: Any, state: BNState | None, dy: Any, *, training: bool = True,
    convention: str | Convention = "torch", momentum: float | None = None, eps: float | None = None,
    axis: int | None = None, backend: str | None = None, device: Any = None, mask: Any = None,
    renorm: dict[str, float] | None = None, renorm_momentum: float = 0.99, virtual_batch_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """``(dx, dgamma, dbeta)``: the gradient of :func:`batch_norm` for the upstream gradient ``dy``.

    Training: ``dx = gamma * s * (dy - mean(dy) - xhat * mean(dy * xhat))``, ``dgamma = sum(dy * xhat)``,
    ``dbeta = sum(dy)`` (under ``mask``, the two means are over the masked-in elements and only those get the
    correction terms); eval: ``dx = dy * gamma * s``; ``dgamma = 0`` under ``fix_gamma``. The same
    function every backend's autodiff calls; on NumPy it is how to train.
    """
    plan, args = plan_call(x, gamma, beta, state, dy, mask, training=training, convention=convention,
                           momentum=momentum, eps=eps, axis=axis, backend=backend, device=device, sync=None,
                           variants=Variants(renorm, renorm_momentum, virtual_batch_size))
    return plan.vjp(args)


def init_state(
    num_features: int, *, backend: str = "numpy", convention: str | Convention = "torch",
    dtype: str = "float32", device: Any = None, renorm: bool = False,
) -> BNState | RenormState:
    """Fresh running statistics: mean 0, variance 1, ``num_batches_tracked`` 0 (every framework's init); with
    ``renorm``, a :class:`RenormState` that also holds batch renormalisation's running standard deviation 1,
    ``renorm_mean`` 0 and ``renorm_std`` 1 (Keras's init)."""
    resolve_convention(convention, None, None)
    n = index(num_features)
    if n is None or n < 1:
        raise ValueError(f"num_features must be a positive int, got {describe(num_features)}")
    num_features = n
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    be = get_backend(backend)
    be.dtype(dtype)
    state = BNState(be.full(num_features, 0.0, dtype, device), be.full(num_features, 1.0, dtype, device),
                    be.counter(0, device))
    if not renorm:
        return state
    return RenormState(*state, be.full(num_features, 1.0, dtype, device), be.full(num_features, 0.0, dtype, device),
                       be.full(num_features, 1.0, dtype, device))
