"""The call path of :func:`multibn.batch_norm`: every check and conversion once per call signature, then the op.

A call is looked up by its signature (the arguments' types, dtypes, devices, the ranks and vector shapes, the
settings), never by the size of ``x``. A miss checks and converts the arguments (:func:`build`), and keeps the
:class:`Plan` when nothing needed converting; a hit goes straight to :meth:`Plan.bind`, which runs the few checks
that depend on the sizes of this call's ``x`` (on a miss too: the checks live in one place), then :meth:`Plan.run`
or :meth:`Plan.vjp`. The differentiable ops are made once per backend, normalisation settings (:class:`Norm`),
channel axis and mode (:func:`op_for`), and serve every shape, momentum and convention with those settings.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import algorithm as alg
from .algorithm import Layout, Norm
from .backends import backend_name_of, compiling, get_backend
from .backends.base import FLOAT_DTYPES, Array, Backend
from .compile_constants import ConstantCache, constant_float
from .conventions import Convention, resolve_convention
from .state import BNState, RenormState
from .variants import GhostView, check_renorm_momentum, check_virtual_batch_size, combinations_refused, parse_renorm

_STATE_FIELDS = {3: BNState, 6: RenormState}


def _state_of(state: object) -> BNState | RenormState | None:
    """``state`` as a :class:`BNState` or :class:`RenormState` (by its length); TypeError for anything else."""
    if state is None:
        return None
    if not (isinstance(state, tuple) and len(state) in _STATE_FIELDS):
        raise TypeError(
            "state must be a multibn.BNState (running_mean, running_var, num_batches_tracked), a multibn.RenormState "
            f"(the same and running_std, renorm_mean, renorm_std) or None, got {type(state).__name__}"
        )
    return _STATE_FIELDS[len(state)](*state)


def _named_arrays(x: object, gamma: object, beta: object, state: BNState | RenormState | None, dy: object,
                  mask: object) -> dict[str, object]:
    named = {"x": x, "gamma": gamma, "beta": beta}
    if state is not None:
        named.update((f"state.{k}", v) for k, v in zip(state._fields, state, strict=True))
    return {**named, "dy": dy, "mask": mask}


class Variants(NamedTuple):
    """The BN variants' arguments as given to :func:`multibn.batch_norm` (checked by :func:`build`)."""

    renorm: object = None
    renorm_momentum: object = 0.99
    virtual_batch_size: object = None

    def key(self) -> tuple:
        renorm = tuple(sorted(self.renorm.items())) if isinstance(self.renorm, dict) else self.renorm
        return (renorm, type(self.renorm_momentum), self.renorm_momentum, self.virtual_batch_size)


NO_VARIANTS = Variants()


# ---- argument helpers -----------------------------------------------------------------------------------------
def index(value: object) -> int | None:
    """An integer argument as an int (NumPy integers too, by ``operator.index``); None for a bool or a non-integer."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def describe(value: object) -> str:
    """``repr(value)``, with the type named where the repr alone hides it (``np.float64(1.0)`` prints ``1.0``)."""
    return repr(value) if type(value) in (int, float, bool, str, type(None)) else f"{type(value).__name__} {value!r}"


def synced(sync: object) -> bool:
    """Whether a ``sync`` argument asks for synchronised BN (None and False do not)."""
    return sync is not None and sync is not False


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


def _as_mask(be: Backend, mask: object, device: object) -> Array:
    """``mask`` as a boolean array of the backend (or a NumPy one, converted when bound to ``x``)."""
    if not be.is_array(mask):
        if isinstance(mask, (str, bytes, dict, set)):
            raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype.name}")
    elif be.dtype_name(mask) != "bool":
        raise TypeError(f"mask must be a boolean array, got dtype {be.dtype_name(mask)}")
    return mask


def _single_value_error(conv: Convention, got: str) -> ValueError:
    return ValueError(
        f"Expected more than 1 value per channel when training, got {got} (convention {conv.name!r} stores the "
        "unbiased running variance M2/(n-1))"
    )


# ---- the ops, one per (backend, normalisation settings, channel axis, mode) -------------------------------------
def _make_op(be: Backend, eps: float, fix_gamma: bool, zero_var_guard: bool, axis: int, training: bool,
             renorm: bool, rmin: float | None, rmax: float | None, dmax: float | None
             ) -> Callable[..., tuple[Array, ...]]:
    """The backend's ``custom_op`` of the train or eval rule. It holds no shape: the rule takes the layout from
    ``x`` at each call."""
    norm = Norm(eps, fix_gamma, zero_var_guard)
    if not training:
        return be.custom_op(lambda b: alg.eval_rule(b, norm, axis))
    clip = alg.Renorm(rmin, rmax, dmax) if renorm else None
    return be.custom_op(lambda b: alg.train_rule(b, norm, axis, clip))


#: the ops made, keyed by plain constants (torch.compile rebuilds a NamedTuple argument wrongly); a bound far above
#: the settings one process uses
_OPS = ConstantCache(_make_op, 256)


def op_for(be: Backend, norm: Norm, axis: int, training: bool, renorm: alg.Renorm | None = None
           ) -> Callable[..., tuple[Array, ...]]:
    """BN's differentiable op ``op(sync, *inputs)`` for these settings (see :func:`multibn.algorithm.train_rule`)."""
    eps, fix_gamma, guard = norm
    clip = renorm if renorm is not None and training else alg.Renorm()
    return _OPS.get(be, constant_float(eps), bool(fix_gamma), bool(guard), operator.index(axis), bool(training),
                    renorm is not None and training, *clip)


# ---- the plan ---------------------------------------------------------------------------------------------------
class Args(NamedTuple):
    """One call's arguments, converted and checked, with the layout of its ``x``."""

    x: Array
    gamma: Array
    beta: Array
    state: BNState | None
    dy: Array | None
    mask: Array | None
    lay: Layout


class Result(NamedTuple):
    """What :meth:`Plan.run` returns."""

    y: Array
    state: BNState | None


class Plan(NamedTuple):
    """What the checks of one call signature found: the backend, the convention, the channel axis and count, where
    default gamma and beta go, the sync group, and the op. Holds no shape of ``x``."""

    be: Backend
    conv: Convention
    training: bool
    axis: int  # in [0, ndim)
    channels: int
    device: Any  # of x: where gamma and beta default to ones and zeros
    pdt: str  # the dtype of those defaults
    synced: bool  # training with the statistics of every replica
    group: Any  # the framework's sync group (torch: None is the default process group)
    op: Callable[..., tuple[Array, ...]]
    convention: object  # the argument, held so that its id in the key stays this object's
    renorm: alg.Renorm | None = None  # batch renormalisation (training)
    renorm_momentum: float = 0.99
    ghost: int | None = None  # the virtual batch size of ghost batch norm (training)

    def bind(self, x: Array, gamma: Array | None, beta: Array | None, state: BNState | None, dy: Array | None,
             mask: Array | None, device: object = None) -> Args:
        """The checks that depend on the sizes of this call's ``x`` (every call, hit or miss), and the defaults."""
        be, shape = self.be, tuple(x.shape)
        if shape[self.axis] != self.channels:  # only reached on a hit: the miss path checked gamma and beta first
            raise ValueError(
                f"x has {shape[self.axis]} channels along axis {self.axis} but {self.channels} were expected "
                f"(shape {shape})"
            )
        lay = Layout.of(shape, self.axis)
        if gamma is None:
            gamma = be.full(self.channels, 1.0, self.pdt, self.device)
        if beta is None:
            beta = be.full(self.channels, 0.0, self.pdt, self.device)
        if dy is not None and tuple(dy.shape) != shape:
            raise ValueError(f"dy must have the shape of x, {shape}, got {tuple(dy.shape)}")
        if not self.training:
            mask = None  # eval has no batch statistics to mask
        elif mask is not None:
            mshape = tuple(mask.shape)
            if len(mshape) > len(shape) or any(m not in (1, n) for m, n in zip(mshape[::-1], shape[::-1],
                                                                               strict=False)):
                raise ValueError(f"mask must be broadcastable to the shape of x, {shape}, got shape {mshape}")
            mask = be.as_mask(mask, shape, device)
        count = lay.count
        if self.training and self.ghost is not None:
            count //= GhostView.of(shape, self.axis, self.ghost).groups  # each sub-batch's
        if self.training and not self.synced and self.conv.single_value_raises:
            if mask is None and count == 1:
                raise _single_value_error(self.conv, f"input size {shape}")
            if mask is not None and be.concrete(mask):  # the counts are read only when concrete
                counts = be.to_numpy(alg.mask_count(be, lay, mask, be.dtype("float32")))
                if (counts == 1).any():
                    raise _single_value_error(self.conv, f"1 in channel(s) {np.flatnonzero(counts == 1).tolist()} "
                                                         "of the mask")
        return Args(x, gamma, beta, state, dy, mask, lay)

    def run(self, a: Args) -> Result:
        """``batch_norm``'s result for bound arguments: the op, then (training) the running update."""
        be = self.be
        if not self.training:
            with be.quiet():
                (y,) = self.op(None, a.x, a.gamma, a.beta, a.state.running_mean, a.state.running_var)
            return Result(y, a.state)
        if self.ghost is not None:
            return self._run_ghost(a)
        spec = self._sync_spec(a) if self.synced else None
        with be.quiet():
            y, mean, m2 = self.op(spec, *self._train_inputs(a))
            if a.state is None:
                return Result(y, None)
            with be.untracked():
                if a.mask is None:
                    count = a.lay.count if spec is None else spec.count
                else:
                    count = alg.mask_count(be, a.lay, a.mask, mean.dtype)
                    count = count if spec is None else be.all_reduce_sum(count, spec.group)
                return Result(y, alg.update_state(be, self.conv, a.state, alg.Stats(count, mean, m2),
                                                  self.renorm_momentum))

    def _train_inputs(self, a: Args) -> tuple[Array, ...]:
        """The train op's inputs: ``(x, gamma, beta[, mask][, renorm_mean, renorm_std])``."""
        inputs = (a.x, a.gamma, a.beta) if a.mask is None else (a.x, a.gamma, a.beta, a.mask)
        return inputs if self.renorm is None else (*inputs, a.state.renorm_mean, a.state.renorm_std)

    def _run_ghost(self, a: Args) -> Result:
        """Ghost batch norm: the op on the view of ``x`` whose channels are (sub-batch, channel) pairs
        (:class:`multibn.variants.GhostView`), the result seen back, the running statistics moved once with the
        sub-batches' mean statistics."""
        be = self.be
        view = GhostView.of(tuple(a.x.shape), self.axis, self.ghost)
        xv = view.to_view(be, a.x)
        with be.quiet():
            yv, mean, m2 = self.op(None, xv, view.repeat(be, a.gamma), view.repeat(be, a.beta))
            y = view.from_view(be, yv)
            if a.state is None:
                return Result(y, None)
            with be.untracked():
                st = view.averaged(be, alg.Stats(Layout.of(tuple(xv.shape), self.axis).count, mean, m2))
                return Result(y, alg.update_state(be, self.conv, a.state, st))

    def vjp(self, a: Args) -> tuple[Array, Array, Array]:
        """``(dx, dgamma, dbeta)`` for bound arguments with ``dy``: the op's own backward, called directly."""
        be = self.be
        norm = Norm.of(self.conv)
        if self.training and self.ghost is not None:
            view = GhostView.of(tuple(a.x.shape), self.axis, self.ghost)
            xv = view.to_view(be, a.x)
            inner = self._replace(ghost=None).vjp(Args(xv, view.repeat(be, a.gamma), view.repeat(be, a.beta), None,
                                                       view.to_view(be, a.dy), None,
                                                       Layout.of(tuple(xv.shape), self.axis)))
            return view.from_view(be, inner[0]), view.fold(be, inner[1]), view.fold(be, inner[2])
        with be.quiet():
            if self.training:
                rule = alg.train_rule(be, norm, self.axis, self.renorm)
                inputs = self._train_inputs(a)
                st = alg.batch_stats(be, a.x, a.lay, mask=a.mask)
                outputs = (None, st.mean, st.m2)  # the backward needs no y
            else:
                rule = alg.eval_rule(be, norm, self.axis)
                inputs = (a.x, a.gamma, a.beta, a.state.running_mean, a.state.running_var)
                outputs = ()
            return tuple(rule.backward(rule.residuals(None, inputs, outputs), (a.dy, None, None))[:3])

    def _sync_spec(self, a: Args) -> alg.Sync:
        """Every replica's count, gathered with a small descriptor of its call; ValueError on every replica, before
        any collective of the batch norm itself, where the replicas disagree on what must match."""
        be, conv = self.be, self.conv
        described = _DESCRIPTOR_FIELDS
        mine = (a.lay.count, self.channels, FLOAT_DTYPES.index(be.dtype_name(a.x)), self.axis, a.x.ndim,
                int(a.mask is not None), _convention_code(conv))
        every = be.gather_ints(mine, self.group)
        for i, field in enumerate(described):
            if field == "count":
                continue  # replicas may hold any number of rows
            values = [r[i] for r in every]
            if any(v != values[0] for v in values):
                shown = [FLOAT_DTYPES[v] if field == "dtype" else bool(v) if field == "mask" else v for v in values]
                hint = f" (this replica's convention: {conv})" if field == "convention" else ""
                raise ValueError(
                    f"sync: the replicas disagree on {_DESCRIBED[field]}: "
                    + ", ".join(f"replica {r} has {v}" for r, v in enumerate(shown)) + hint
                )
        spec = alg.Sync(self.group, () if a.mask is not None else tuple(r[0] for r in every))
        if a.mask is None and conv.single_value_raises and spec.count == 1:
            raise _single_value_error(conv, f"input size {tuple(a.x.shape)} on 1 value across the replicas")
        return spec


_DESCRIPTOR_FIELDS = ("count", "channels", "dtype", "axis", "rank", "mask", "convention")
_DESCRIBED = {"count": "the element count per channel", "channels": "the channel count of x",
              "dtype": "the dtype of x", "axis": "the channel axis", "rank": "the rank of x",
              "mask": "whether a mask is given", "convention": "the convention (its rules, momentum and eps)"}


def _convention_code(conv: Convention) -> int:
    """A number that equals another replica's exactly when the conventions' rules, momentum and eps are equal."""
    fields = (conv.momentum, conv.momentum_weighs, conv.unbiased_running_var, conv.eps, conv.fix_gamma,
              conv.zero_var_guard, conv.single_value_raises, conv.count_empty_batches)
    return zlib.crc32(repr(fields).encode()) & 0x7FFFFFFF


# ---- miss: check, convert, build ------------------------------------------------------------------------------
def build(
    x: object, gamma: object, beta: object, state: object, dy: object, mask: object, *, training: bool,
    convention: str | Convention, momentum: float | None, eps: float | None, axis: int | None,
    backend: str | None, device: object, sync: object, variants: Variants = NO_VARIANTS,
) -> tuple[Plan, Args]:
    """Every check and conversion of a call, before any computation (a call that raises has changed nothing): the
    plan of its signature and its bound arguments."""
    conv = resolve_convention(convention, momentum, eps)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {type(training).__name__} {training!r}")
    state = _state_of(state)
    renorm = parse_renorm(variants.renorm)
    renorm_momentum = check_renorm_momentum(variants.renorm_momentum)
    ghost = check_virtual_batch_size(variants.virtual_batch_size)
    if training and renorm is not None and not isinstance(state, RenormState):
        raise ValueError("renorm needs state to be a multibn.RenormState (running statistics and what batch "
                         "renormalisation tracks): create one with multibn.init_state(num_features, renorm=True)")
    if training and renorm is None and isinstance(state, RenormState):
        raise ValueError("state is a multibn.RenormState but renorm is None: pass renorm={...} (Keras's "
                         "renorm_clipping, {} for none) to train with batch renormalisation, or a multibn.BNState")
    if training and (why := combinations_refused(renorm, ghost, mask is not None, synced(sync))):
        raise ValueError(f"unsupported combination: {why}")
    be = _pick_backend(backend, _named_arrays(x, gamma, beta, state, dy, mask))
    x = _to_backend(be, "x", x, device)
    xdt = _check_float(be, "x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 (a batch axis and a channel axis), got shape {tuple(x.shape)}")
    ax = conv.axis if axis is None else index(axis)
    if ax is None or not -x.ndim <= ax < x.ndim:
        raise ValueError(f"axis must be an int in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got "
                         f"{describe(axis)}")
    ax %= x.ndim
    if ghost is not None and training and ax == 0:
        raise ValueError("virtual_batch_size splits the batch axis 0, so the channel axis must not be 0")
    channels = x.shape[ax]
    pdt = "float64" if xdt == "float64" else "float32"
    if gamma is not None:
        gamma = _to_backend(be, "gamma", gamma, device, pdt)
        _check_vector(be, "gamma", gamma, channels, ax)
    if beta is not None:
        beta = _to_backend(be, "beta", beta, device, pdt)
        _check_vector(be, "beta", beta, channels, ax)
    if state is not None:
        rmean = _to_backend(be, "state.running_mean", state.running_mean, device, pdt)
        rvar = _to_backend(be, "state.running_var", state.running_var, device, pdt)
        tracked = _counter(be, state.num_batches_tracked, device if device is not None else be.device_of(rvar))
        _check_vector(be, "state.running_mean", rmean, channels, ax)
        _check_vector(be, "state.running_var", rvar, channels, ax)
        extra = []
        for name in RenormState._fields[3:] if isinstance(state, RenormState) else ():
            v = _to_backend(be, f"state.{name}", getattr(state, name), device, pdt)
            _check_vector(be, f"state.{name}", v, channels, ax)
            extra.append(v)
        state = type(state)(rmean, rvar, tracked, *extra)
    elif not training:
        raise ValueError(
            "state is required when training=False (eval mode normalises with the running statistics); "
            "create one with multibn.init_state(num_features, backend=...)"
        )
    is_synced = training and synced(sync)
    group = be.sync_group(sync) if is_synced else None  # refuses backends without collectives and malformed groups
    if mask is not None and training:
        mask = _as_mask(be, mask, device)
    if dy is not None:
        dy = _to_backend(be, "dy", dy, device, xdt)
        _check_float(be, "dy", dy)
    plan = Plan(be, conv, training, ax, channels, be.device_of(x), pdt, is_synced, group,
                op_for(be, Norm.of(conv), ax, training, renorm), convention, renorm, renorm_momentum,
                ghost if training else None)
    return plan, plan.bind(x, gamma, beta, state, dy, mask, device)


# ---- hit: the plans of earlier valid calls ------------------------------------------------------------------------
#: type of x -> its backend, for types seen in a valid call of a backend that gives signatures
_PLAN_BACKENDS: dict[type, Backend] = {}
_PLANS: dict[tuple, Plan] = {}
_MAX_PLANS = 1024


def _plan_key(be: Backend, arrays: tuple[object, ...], state: object, settings: tuple) -> tuple | None:
    """The key of a call's plan: ``x``'s rank and every other array's shape, with each array's type, dtype and
    device, and the settings; None for a call that takes the full path (a non-bool ``training``, an argument the
    backend cannot sign)."""
    if settings[0] is not True and settings[0] is not False:
        return None
    try:
        sig = be.signature(arrays)
        if sig is None:
            return None
        shapes = (arrays[0].ndim, *(None if a is None else tuple(a.shape) for a in arrays[1:]))
        convention = settings[1]
        conv = convention if type(convention) is str else id(convention)
        key = (sig, shapes, state is None, settings[0], conv, *settings[2:])
        hash(key)
    except Exception:  # anything unusual: the full path checks it and raises what it must
        return None
    return key


def plan_call(
    x: object, gamma: object, beta: object, state: object, dy: object, mask: object, *, training: bool,
    convention: str | Convention, momentum: float | None, eps: float | None, axis: int | None,
    backend: str | None, device: object, sync: object, variants: Variants = NO_VARIANTS,
) -> tuple[Plan, Args]:
    """The plan of this call and its bound arguments: the kept plan of its signature (a hit), or :func:`build`'s
    (a miss: kept when the call converted nothing)."""
    if compiling():
        return build(x, gamma, beta, state, dy, mask, training=training, convention=convention, momentum=momentum,
                     eps=eps, axis=axis, backend=backend, device=device, sync=sync, variants=variants)
    be = _PLAN_BACKENDS.get(type(x))
    well_formed = state is None or (isinstance(state, tuple) and len(state) in _STATE_FIELDS)
    key = None
    if well_formed:
        arrays = (x, gamma, beta, *(state if state is not None else (None, None, None)), dy, mask)
        settings = (training, convention, type(momentum), momentum, type(eps), eps, type(axis), axis, backend,
                    sync if synced(sync) else None, variants.key())
        if be is not None:
            key = _plan_key(be, arrays, state, settings)
            plan = None if key is None else _PLANS.get(key)
            if plan is not None and (type(convention) is str or plan.convention is convention) and \
                    x.shape[plan.axis] == plan.channels:
                return plan, plan.bind(x, gamma, beta, _state_of(state), dy, mask, device)
    plan, args = build(x, gamma, beta, state, dy, mask, training=training, convention=convention, momentum=momentum,
                       eps=eps, axis=axis, backend=backend, device=device, sync=sync, variants=variants)
    be = plan.be
    if well_formed and be.signature(()) is not None and all(a is None or be.is_array(a) for a in arrays):
        key = key or _plan_key(be, arrays, state, settings)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
            _PLAN_BACKENDS[type(x)] = be
    return plan, args
