"""The public functions: check and convert the arguments, pick the backend, run the one algorithm."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import algorithm as alg
from .backends import backend_name_of, get_backend
from .backends.base import FLOAT_DTYPES, Array, Backend
from .conventions import Convention, resolve_convention
from .state import BNState

_ARRAY_ARGS = ("x", "gamma", "beta", "state.running_mean", "state.running_var", "state.num_batches_tracked", "dy",
               "mask")


# ---- backend choice and conversion ------------------------------------------------------------------------
def _framework_arrays(named: dict[str, object]) -> dict[str, str]:
    found = {k: backend_name_of(v) for k, v in named.items() if v is not None}
    return {k: b for k, b in found.items() if b is not None}


def _pick_backend(backend: str | None, named: dict[str, object]) -> Backend:
    """The backend named, or the one of the arrays; TypeError for a mix of frameworks or an unknown type."""
    found = _framework_arrays(named)
    if backend is not None:
        be = get_backend(backend)
        foreign = {k: b for k, b in found.items() if b not in (be.name, "numpy")}
        if foreign:
            k, b = next(iter(foreign.items()))
            raise TypeError(
                f"{k} is a {b} array but backend={be.name!r}; only NumPy arrays and Python sequences are "
                f"converted, so pass {be.name} arrays or NumPy arrays"
            )
        return be
    x = named["x"]
    if "x" not in found:
        raise TypeError(
            f"cannot infer the backend from x of type {type(x).__module__}.{type(x).__qualname__}; pass a "
            "NumPy, PyTorch, JAX or MXNet array, or name the backend with backend='numpy'|'torch'|'jax'|'mxnet'"
        )
    mixed = {k: b for k, b in found.items() if b != found["x"]}
    if mixed:
        k, b = next(iter(mixed.items()))
        raise TypeError(
            f"x is a {found['x']} array but {k} is a {b} array; arrays of two frameworks cannot be mixed "
            f"(pass backend={found['x']!r} to convert NumPy arrays and Python sequences)"
        )
    return get_backend(found["x"])


def _to_backend(be: Backend, name: str, value: object, device: object, dtype: str = "float32") -> Array:
    """``value`` as an array of ``be``: its own arrays as they are, NumPy arrays converted with their dtype,
    Python numbers and sequences converted to ``dtype`` (like ``torch.tensor`` of floats)."""
    if isinstance(value, np.ndarray) and not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))  # big-endian data (.npy, FITS): the same values
    if be.is_array(value):
        return value
    if isinstance(value, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an array or a sequence of numbers, got {type(value).__name__}")
    try:
        if backend_name_of(value) is None:  # a Python number or sequence
            value = np.asarray(value, dtype=dtype)
        _check_float_name(be, name, value.dtype.name)
        return be.asarray(value, device=device)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} could not be converted to a {be.name} array: {e}") from e


def _counter(be: Backend, tracked: object, device: object) -> Array:
    """``num_batches_tracked`` as the backend's counter (a Python or NumPy integer is converted)."""
    if be.is_array(tracked):
        if not be.dtype_name(tracked).startswith(("int", "uint")):
            raise TypeError(
                f"state.num_batches_tracked must be an integer array, got dtype {be.dtype_name(tracked)}"
            )
        return tracked
    value = np.asarray(tracked)
    if value.size != 1 or value.dtype.kind not in "iu":
        raise TypeError(
            f"state.num_batches_tracked must be an integer count, got {type(tracked).__name__} {tracked!r}"
        )
    return be.counter(int(value.reshape(-1)[0]), device)


def _index(value: object) -> int | None:
    """An integer argument as an int (NumPy integers too, by ``operator.index``); None for a bool or a non-integer."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _describe(value: object) -> str:
    """``repr(value)``, with the type named where the repr alone hides it (``np.float64(1.0)`` prints ``1.0``)."""
    return repr(value) if type(value) in (int, float, bool, str, type(None)) else f"{type(value).__name__} {value!r}"


def _check_float_name(be: Backend, name: str, dt: str) -> str:
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype ({', '.join(FLOAT_DTYPES)}), got {dt}")
    be.dtype(dt)  # the backend may refuse it (bfloat16 on mxnet, float64 on jax without x64)
    return dt


def _check_float(be: Backend, name: str, a: Array) -> str:
    return _check_float_name(be, name, be.dtype_name(a))


def _check_vector(be: Backend, name: str, a: Array, channels: int, axis: int) -> None:
    _check_float(be, name, a)
    if tuple(a.shape) != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel of x along axis {axis}, "
            f"got shape {tuple(a.shape)}"
        )


def _prepare(
    x: object, gamma: object, beta: object, state: object, dy: object, *, training: bool,
    convention: str | Convention, momentum: float | None, eps: float | None, axis: int | None,
    backend: str | None, device: object, sync: object = None, mask: object = None,
) -> tuple[Backend, Convention, alg.Layout, Array, Array, Array, BNState | None, Array | None, Array | None]:
    """Every check, before any computation: a call that raises has changed nothing."""
    conv = resolve_convention(convention, momentum, eps)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {type(training).__name__} {training!r}")
    if state is not None:
        if not (isinstance(state, tuple) and len(state) == 3):
            raise TypeError(
                "state must be a multibn.BNState (running_mean, running_var, num_batches_tracked) or None, "
                f"got {type(state).__name__}"
            )
        state = BNState(*state)
    named = dict(zip(_ARRAY_ARGS, (x, gamma, beta, *(state if state is not None else (None,) * 3), dy, mask),
                     strict=True))
    be = _pick_backend(backend, named)
    x = _to_backend(be, "x", x, device)
    xdt = _check_float(be, "x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 (a batch axis and a channel axis), got shape {tuple(x.shape)}")
    ax = conv.axis if axis is None else _index(axis)
    if ax is None or not -x.ndim <= ax < x.ndim:
        raise ValueError(f"axis must be an int in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got "
                         f"{_describe(axis)}")
    axis = ax
    lay = alg.Layout.of(tuple(map(operator.index, x.shape)), axis)  # torch.compile: a static shape, as the op
    dev = be.device_of(x)
    pdt = "float64" if xdt == "float64" else "float32"
    gamma = be.full(lay.channels, 1.0, pdt, dev) if gamma is None else _to_backend(be, "gamma", gamma, device, pdt)
    beta = be.full(lay.channels, 0.0, pdt, dev) if beta is None else _to_backend(be, "beta", beta, device, pdt)
    _check_vector(be, "gamma", gamma, lay.channels, axis)
    _check_vector(be, "beta", beta, lay.channels, axis)
    if state is not None:
        rmean = _to_backend(be, "state.running_mean", state.running_mean, device, pdt)
        rvar = _to_backend(be, "state.running_var", state.running_var, device, pdt)
        tracked = _counter(be, state.num_batches_tracked, device if device is not None else be.device_of(rvar))
        _check_vector(be, "state.running_mean", rmean, lay.channels, axis)
        _check_vector(be, "state.running_var", rvar, lay.channels, axis)
        state = BNState(rmean, rvar, tracked)
    elif not training:
        raise ValueError(
            "state is required when training=False (eval mode normalises with the running statistics); "
            "create one with multibn.init_state(num_features, backend=...)"
        )
    if sync is not None and sync is not False and not training:
        sync = None  # eval normalises with the running statistics: nothing to synchronise
    if mask is not None:
        mask = _mask(be, mask, x, device) if training else None  # eval has no batch statistics to mask
    if sync is not None and sync is not False:
        be.sync_group(sync)  # refuses backends without collectives and malformed groups
    elif training:
        _check_count(conv, lay.count, x.shape)
        if mask is not None:
            _check_mask_count(be, conv, lay, mask)
    if dy is not None:
        dy = _to_backend(be, "dy", dy, device, xdt)
        _check_float(be, "dy", dy)
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(f"dy must have the shape of x, {tuple(x.shape)}, got {tuple(dy.shape)}")
    return be, conv, lay, x, gamma, beta, state, dy, mask


def _mask(be: Backend, mask: object, x: Array, device: object) -> Array:
    """``mask`` as a boolean array of the backend with the shape of ``x`` (broadcast)."""
    if not be.is_array(mask):
        if isinstance(mask, (str, bytes, dict, set)):
            raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype.name}")
    elif be.dtype_name(mask) != "bool":
        raise TypeError(f"mask must be a boolean array, got dtype {be.dtype_name(mask)}")
    shape = tuple(mask.shape)
    if len(shape) > x.ndim or any(m not in (1, n) for m, n in zip(shape[::-1], tuple(x.shape)[::-1], strict=False)):
        raise ValueError(f"mask must be broadcastable to the shape of x, {tuple(x.shape)}, got shape {shape}")
    return be.as_mask(mask, tuple(x.shape), device)


def _check_mask_count(be: Backend, conv: Convention, lay: alg.Layout, mask: Array) -> None:
    """A mask leaving one value in a channel, under a convention that refuses it (read only when concrete)."""
    if conv.single_value_raises and be.concrete(mask):
        counts = be.to_numpy(alg.mask_count(be, lay, mask, be.dtype("float32")))
        if (counts == 1).any():
            raise ValueError(
                f"Expected more than 1 value per channel when training, got 1 in channel(s) "
                f"{np.flatnonzero(counts == 1).tolist()} of the mask (convention {conv.name!r} stores the "
                "unbiased running variance M2/(n-1))"
            )


def _check_count(conv: Convention, count: int, shape: tuple[int, ...]) -> None:
    if conv.single_value_raises and count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)} "
            f"(convention {conv.name!r} stores the unbiased running variance M2/(n-1))"
        )


# ---- the cheap path for repeated calls -----------------------------------------------------------------------------
# Every check of _prepare depends only on the arguments' types, shapes, dtypes and devices and on the settings, never
# on array values (but for a mask's counts, which are re-read). A call whose arguments are all arrays of one backend
# (nothing to convert) is looked up by that signature: a hit reuses what _prepare found; a miss (a new signature or
# any bad input) runs _prepare, which raises exactly as it always does, and remembers the plan if the call was valid.
class _Plan(NamedTuple):
    be: Backend
    conv: Convention
    lay: alg.Layout
    device: Any  # of x: where gamma and beta default to ones and zeros
    pdt: str  # the dtype of those defaults
    convention: object  # the argument, held so that its id in the key stays this object's
    op: Callable[..., tuple[Array, ...]]  # the differentiable op for the mode, without sync


#: type of x -> its backend, for types seen in a valid call of a backend that gives signatures
_PLAN_BACKENDS: dict[type, Backend] = {}
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024


def _plan_key(
    be: Backend, arrays: tuple[object, ...], state: object, training: object, convention: object, momentum: object,
    eps: object, axis: object, backend: object, sync: object,
) -> tuple | None:
    """The key of a call's plan, or None for a call that takes the full path (sync, a non-bool ``training``, an
    argument the backend cannot sign)."""
    if (sync is not None and sync is not False) or (training is not True and training is not False):
        return None
    try:
        sig = be.signature(arrays)
        if sig is None:
            return None
        conv = convention if type(convention) is str else id(convention)
        key = (sig, training, state is None, conv, type(momentum), momentum, type(eps), eps, type(axis), axis,
               backend)
        hash(key)
    except Exception:  # anything unusual: the full path checks it and raises what it must
        return None
    return key


def _prepare_cached(
    x: object, gamma: object, beta: object, state: object, dy: object, *, training: bool,
    convention: str | Convention, momentum: float | None, eps: float | None, axis: int | None,
    backend: str | None, device: object, sync: object = None, mask: object = None,
) -> tuple[Backend, Convention, alg.Layout, Array, Array, Array, BNState | None, Array | None, Array | None,
           Callable[..., tuple[Array, ...]] | None]:
    """:func:`_prepare`'s results and the op for ``training`` without sync (None under sync), cheaply for a call
    with the signature of an earlier valid one."""
    be = _PLAN_BACKENDS.get(type(x))
    key = None
    well_formed = state is None or (isinstance(state, tuple) and len(state) == 3)
    arrays = (x, gamma, beta, *(state if state is not None else (None, None, None)), dy, mask) if well_formed else ()
    if be is not None and well_formed:
        key = _plan_key(be, arrays, state, training, convention, momentum, eps, axis, backend, sync)
        plan = None if key is None else _PLANS.get(key)
        if plan is not None and (type(convention) is str or plan.convention is convention):
            be, lay = plan.be, plan.lay
            if gamma is None:
                gamma = be.full(lay.channels, 1.0, plan.pdt, plan.device)
            if beta is None:
                beta = be.full(lay.channels, 0.0, plan.pdt, plan.device)
            if not training:
                mask = None
            elif mask is not None:
                mask = be.as_mask(mask, tuple(x.shape), device)
                _check_mask_count(be, plan.conv, lay, mask)
            return (be, plan.conv, lay, x, gamma, beta, None if state is None else BNState(*state), dy, mask,
                    plan.op)
    prepared = _prepare(
        x, gamma, beta, state, dy, training=training, convention=convention, momentum=momentum, eps=eps, axis=axis,
        backend=backend, device=device, sync=sync, mask=mask,
    )
    be, conv, lay = prepared[:3]
    synced = sync is not None and sync is not False and training
    op = None if synced else getattr(_Ops, _op_name(be, conv, tuple(lay), training))
    if not synced and be.signature(()) is not None and all(a is None or be.is_array(a) for a in arrays):
        key = key or _plan_key(be, arrays, state, training, convention, momentum, eps, axis, backend, sync)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = _Plan(be, conv, lay, be.device_of(prepared[3]), "float64" if be.dtype_name(prepared[3])
                                == "float64" else "float32", convention, op)
            _PLAN_BACKENDS[type(x)] = be
    return (*prepared, op)


# ---- the differentiable ops, one per (backend, convention, layout, mode, sync) ------------------------------------
class _Ops:
    """Every op made, as attributes ``op0``, ``op1``, ...: torch.compile reads one without guarding the others."""


#: (backend, convention, layout, training, sync) -> the attribute of :class:`_Ops` holding that op
_OP_NAMES: dict[tuple, str] = {}


def _op_name(be: Backend, conv: Convention, lay: tuple, training: bool, sync: alg.Sync | None = None) -> str:
    """The attribute of :class:`_Ops` holding the op of BN under ``conv`` on layout ``lay``, made on first use (the
    backend's ``custom_op`` of the train or eval rule). torch.compile runs this at trace time (it cannot trace the
    class that ``custom_op`` creates) and then traces the op itself."""
    key = (be, conv, tuple(lay), training, sync)
    name = _OP_NAMES.get(key)
    if name is None:
        layout = alg.Layout(*lay)
        rule = alg.train_rule(be, conv, layout, sync) if training else alg.eval_rule(be, conv, layout)
        name = _OP_NAMES[key] = f"op{len(_OP_NAMES)}"
        setattr(_Ops, name, staticmethod(be.custom_op(rule)))
    return name


_op_name._dynamo_marked_constant = True  # type: ignore[attr-defined]  # torch._dynamo.assume_constant_result


# ---- public API ---------------------------------------------------------------------------------------------------
def batch_norm(
    x: Any, gamma: Any = None, beta: Any = None, state: BNState | None = None, *, training: bool = True,
    convention: str | Convention = "torch", momentum: float | None = None, eps: float | None = None,
    axis: int | None = None, backend: str | None = None, device: Any = None, sync: Any = None, mask: Any = None,
) -> tuple[Any, BNState | None]:
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

    ``sync`` (training only) normalises with the statistics of the whole batch across replicas, merged exactly
    whatever each replica's count (masked counts included): on torch ``True`` (the default process group) or a
    ``torch.distributed.ProcessGroup``; on jax the name of a mapped axis (``shard_map``, ``pmap``). The
    running statistics then use the global count.
    """
    be, conv, lay, x, gamma, beta, state, _, mask, op = _prepare_cached(
        x, gamma, beta, state, None, training=training, convention=convention, momentum=momentum, eps=eps,
        axis=axis, backend=backend, device=device, sync=sync, mask=mask,
    )
    if not training:
        with be.quiet():
            (y,) = op(x, gamma, beta, state.running_mean, state.running_var)
        return y, state
    spec = None
    if sync is not None and sync is not False:
        group = be.sync_group(sync)
        spec = alg.Sync(group, () if mask is not None else be.replica_counts(lay.count, group))
        if mask is None:
            _check_count(conv, spec.count, x.shape)
        op = getattr(_Ops, _op_name(be, conv, tuple(lay), True, spec))
    inputs = (x, gamma, beta) if mask is None else (x, gamma, beta, mask)
    with be.quiet():
        y, mean, m2 = op(*inputs)
        if state is None:
            return y, None
        with be.untracked():
            if mask is None:
                count = lay.count if spec is None else spec.count
            else:
                count = alg.mask_count(be, lay, mask, mean.dtype)
                count = count if spec is None else be.all_reduce_sum(count, spec.group)
            return y, alg.update_state(be, conv, state, alg.Stats(count, mean, m2))


def batch_norm_vjp(
    x: Any, gamma: Any, beta: Any, state: BNState | None, dy: Any, *, training: bool = True,
    convention: str | Convention = "torch", momentum: float | None = None, eps: float | None = None,
    axis: int | None = None, backend: str | None = None, device: Any = None, mask: Any = None,
) -> tuple[Any, Any, Any]:
    """``(dx, dgamma, dbeta)``: the gradient of :func:`batch_norm` for the upstream gradient ``dy``.

    Training: ``dx = gamma * s * (dy - mean(dy) - xhat * mean(dy * xhat))``, ``dgamma = sum(dy * xhat)``,
    ``dbeta = sum(dy)`` (under ``mask``, the two means are over the masked-in elements and only those get the
    correction terms); eval: ``dx = dy * gamma * s``; ``dgamma = 0`` under ``fix_gamma``. The same
    function every backend's autodiff calls; on NumPy it is how to train.
    """
    be, conv, lay, x, gamma, beta, state, dy, mask, _ = _prepare_cached(
        x, gamma, beta, state, dy, training=training, convention=convention, momentum=momentum, eps=eps,
        axis=axis, backend=backend, device=device, mask=mask,
    )
    with be.quiet():
        if training:
            rule = alg.train_rule(be, conv, lay)
            inputs = (x, gamma, beta) if mask is None else (x, gamma, beta, mask)
            st = alg.batch_stats(be, x, lay, mask=mask)
            outputs = (None, st.mean, st.m2)  # the backward needs no y
        else:
            rule = alg.eval_rule(be, conv, lay)
            inputs = (x, gamma, beta, state.running_mean, state.running_var)
            outputs = ()
        return tuple(rule.backward(rule.residuals(inputs, outputs), (dy, None, None))[:3])


def init_state(
    num_features: int, *, backend: str = "numpy", convention: str | Convention = "torch",
    dtype: str = "float32", device: Any = None,
) -> BNState:
    """Fresh running statistics: mean 0, variance 1, ``num_batches_tracked`` 0 (every framework's init)."""
    resolve_convention(convention, None, None)
    n = _index(num_features)
    if n is None or n < 1:
        raise ValueError(f"num_features must be a positive int, got {_describe(num_features)}")
    num_features = n
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    be = get_backend(backend)
    be.dtype(dtype)
    return BNState(be.full(num_features, 0.0, dtype, device), be.full(num_features, 1.0, dtype, device),
                   be.counter(0, device))
