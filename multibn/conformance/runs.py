"""A case run step by step: through the float64 reference (with its error bounds) or through multibn on a backend
(gradients by the framework's autodiff; :func:`multibn.batch_norm_vjp` on NumPy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference as R
from .cases import F64, Case


@dataclass
class Run:
    """Per-step results (float64 NumPy arrays, ``num_batches_tracked`` an int) and where it raised, if it did."""

    steps: list[dict[str, Any]]
    error: tuple[int, BaseException] | None = None
    bounds: list[dict[str, np.ndarray]] | None = None  # reference runs only


def reference_run(case: Case, *, extra_var: float = 0.0, extra_var_rel: float = 0.0,
                  u_acc: float | None = None) -> Run:
    """``case`` through the float64 reference, with each step's per-element error bounds
    (:func:`multibn.conformance.reference.step_bounds`; the keywords widen them for a native BN's own arithmetic)."""
    conv, ax = case.conv, case.channel_axis
    state = R.init_ref_state(case.channels) if case.stateful else None
    err = None
    steps, bounds = [], []
    for i, step in enumerate(case.steps):
        try:
            rs = R.reference_step(step.x, case.gamma, case.beta, state, step.dy, training=step.training,
                                  convention=conv, axis=ax)
        except ValueError as e:
            return Run(steps, (i, e), bounds)
        b, err = R.step_bounds(rs, step.x, step.dy, case.beta, axis=ax, eps=conv.eps, dtype=case.dtype,
                               err_in=err, extra_var=extra_var, extra_var_rel=extra_var_rel, u_acc=u_acc)
        out = {"y": rs.y, "dx": rs.dx, "dgamma": rs.dgamma, "dbeta": rs.dbeta}
        if rs.state is not None:
            state = rs.state
            out.update(running_mean=state.running_mean, running_var=state.running_var,
                       num_batches_tracked=state.num_batches_tracked)
        steps.append(out)
        bounds.append(b)
    return Run(steps, None, bounds)


# ---- multibn on a backend --------------------------------------------------------------------------------------------
def to_backend(be: Any, a: np.ndarray, dtype: str) -> Any:
    """A float64 array of ``dtype`` values as a ``dtype`` array of backend ``be`` (bfloat16 via float32, exact)."""
    carrier = a.astype(np.float32 if dtype == "bfloat16" else dtype)
    return be.asarray(carrier, dtype=dtype)


def numpy_of(be: Any, a: Any) -> np.ndarray:
    """An array of backend ``be`` as a float64 NumPy array."""
    return be.to_numpy(a).astype(F64)


def _tracked(be: Any, t: Any) -> int:
    return int(np.asarray(be.to_numpy(t)).reshape(-1)[0])


#: ``(y, new_state, dx, dgamma, dbeta)`` of one multibn.batch_norm call ``bn(x, g, b)``, per backend
ForwardBackward = Callable[[Callable[..., tuple[Any, Any]], Any, Any, Any, Any], tuple]


def _torch_forward_backward(bn: Callable[..., tuple[Any, Any]], x: Any, g: Any, b: Any, dy: Any) -> tuple:
    x, g, b = (v.detach().requires_grad_(True) for v in (x, g, b))
    y, new = bn(x, g, b)
    y.backward(dy)
    return (y.detach(), new, x.grad, g.grad, b.grad)


def _jax_forward_backward(bn: Callable[..., tuple[Any, Any]], x: Any, g: Any, b: Any, dy: Any) -> tuple:
    import jax

    y, vjp, new = jax.vjp(bn, x, g, b, has_aux=True)
    return (y, new, *vjp(dy))


def _mxnet_forward_backward(bn: Callable[..., tuple[Any, Any]], x: Any, g: Any, b: Any, dy: Any) -> tuple:
    from mxnet import autograd

    for v in (x, g, b):
        v.attach_grad()
    with autograd.record():
        y, new = bn(x, g, b)
    y.backward(dy)
    return (y, new, x.grad, g.grad, b.grad)


#: backend -> how its gradients are taken (NumPy, which has no autodiff: :func:`multibn.batch_norm_vjp`)
_FORWARD_BACKWARD: dict[str, ForwardBackward] = {
    "torch": _torch_forward_backward, "jax": _jax_forward_backward, "mxnet": _mxnet_forward_backward,
}


def backend_run(case: Case, backend: str) -> Run:
    """``case`` through multibn on ``backend``; a ValueError/TypeError ends the run and is recorded."""
    from ..api import batch_norm, batch_norm_vjp, init_state
    from ..backends import get_backend

    be = get_backend(backend)
    conv = case.conv
    kw = dict(convention=case.convention, momentum=case.momentum, eps=case.eps, axis=case.axis, backend=backend,
              **case.variant)
    g, b = (to_backend(be, v, case.pdtype) for v in (case.gamma, case.beta))
    state = init_state(case.channels, backend=backend, convention=conv, dtype=case.pdtype,
                       renorm="renorm" in case.variant) if case.stateful else None
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(case.steps):
        step_kw = dict(kw, training=step.training)

        def bn(x_: Any, g_: Any, b_: Any, state: Any = state, step_kw: dict = step_kw) -> tuple[Any, Any]:
            return batch_norm(x_, g_, b_, state, **step_kw)

        try:
            x, dy = to_backend(be, step.x, case.dtype), to_backend(be, step.dy, case.dtype)
            if backend in _FORWARD_BACKWARD:
                y, new, dx, dg, db = _FORWARD_BACKWARD[backend](bn, x, g, b, dy)
            else:
                y, new = bn(x, g, b)
                dx, dg, db = batch_norm_vjp(x, g, b, state, dy, **step_kw)
        except (ValueError, TypeError) as e:
            return Run(steps, (i, e))
        out = {"y": numpy_of(be, y), "dx": numpy_of(be, dx), "dgamma": numpy_of(be, dg), "dbeta": numpy_of(be, db)}
        if new is not None:
            state = new
            out.update(running_mean=numpy_of(be, state.running_mean), running_var=numpy_of(be, state.running_var),
                       num_batches_tracked=_tracked(be, state.num_batches_tracked))
        steps.append(out)
    return Run(steps)
