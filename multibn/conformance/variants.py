"""The BN variants in the conformance battery: batch renormalisation (Keras 3's rules) and ghost batch norm (TF Keras
2's ``virtual_batch_size``) as float64 textbook transcriptions, independent of the library's code, and their cases.

Each case runs through :func:`multibn.conformance.runs.backend_run` (``Case.variant`` adds the keyword arguments)
and is compared with :func:`reference_variant_run`. The bound per element is ``(n + 16) u`` times the quantity's
largest magnitude in the step (``n`` elements per channel, ``u`` the unit roundoff of the dtype): the sums over
``n`` elements of the statistics and of the backward, plus a few roundings per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .cases import F64, Case, make_case
from .runs import Run

#: the clipping of the battery's renorm cases (Keras's renorm_clipping)
CLIP = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def variant_battery(conventions: Sequence[str]) -> list[Case]:
    """One renorm case (several training steps with clipping active, then eval) and one ghost case per convention."""
    cases = []
    for k, name in enumerate(conventions):
        s = 50_000 + 100 * k
        renorm = make_case("renorm f32 3T+E", name, "float32", [(16, 3, 4)] * 3 + [(4, 3, 4)],
                           training=[True, True, True, False], axis=1, seed=s + 1, offsets=[0.0, 2.0, 5.0],
                           spread=2.0)
        renorm.variant = {"renorm": CLIP, "renorm_momentum": 0.9}
        ghost = make_case("ghost k=4 f32 2T+E", name, "float32", [(12, 3, 2, 2), (8, 3, 2, 2), (4, 3, 2, 2)],
                          training=[True, True, False], axis=1, seed=s + 2, offsets=[0.0, 3.0, 1.0])
        ghost.variant = {"virtual_batch_size": 4}
        cases += [renorm, ghost]
    return cases


def _per_channel(v: np.ndarray, ndim: int, ax: int) -> np.ndarray:
    shape = [1] * ndim
    shape[ax] = -1
    return v.reshape(shape)


def _weights(conv: Any, t: int) -> tuple[float, float]:
    """``(keep, take)`` of the running update at the t-th counted batch."""
    m = conv.momentum
    if m is None:
        return 1.0 - 1.0 / t, 1.0 / t
    return (1.0 - float(m), float(m)) if conv.momentum_weighs == "new" else (float(m), 1.0 - float(m))


def _bn(x: np.ndarray, dy: np.ndarray, g: np.ndarray, b: np.ndarray, ax: int, eps: float, r: np.ndarray,
        d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Training BN with the corrections ``r``, ``d`` held constant: y, dx, dgamma, dbeta, mean, biased var, n."""
    red = tuple(i for i in range(x.ndim) if i != ax)
    n = x.size // x.shape[ax]
    mean = x.mean(red)
    var = ((x - _per_channel(mean, x.ndim, ax)) ** 2).mean(red)
    s = 1.0 / np.sqrt(var + eps)
    bc = lambda v: _per_channel(v, x.ndim, ax)  # noqa: E731
    xhat = (x - bc(mean)) * bc(s)
    y = xhat * bc(g * r) + bc(g * d + b)
    dxhat = dy * bc(g * r)
    dx = bc(s) * (dxhat - bc(dxhat.mean(red)) - xhat * bc((dxhat * xhat).mean(red)))
    return y, dx, np.sum(dy * (xhat * bc(r) + bc(d)), axis=red), np.sum(dy, axis=red), mean, var, n


def reference_variant_run(case: Case) -> Run:
    """``case`` through the float64 transcription of its variant, with the battery's bounds."""
    conv, ax = case.conv, case.channel_axis
    eps = float(conv.eps)
    c = case.channels
    g = np.ones(c, F64) if conv.fix_gamma else np.asarray(case.gamma, F64)
    b = np.asarray(case.beta, F64)
    mean_r, var_r, t = np.zeros(c, F64), np.ones(c, F64), 0
    std_r, rn_mean, rn_std = np.ones(c, F64), np.zeros(c, F64), np.ones(c, F64)
    renorm = case.variant.get("renorm")
    k = case.variant.get("virtual_batch_size")
    steps, bounds = [], []
    for step in case.steps:
        x, dy = np.asarray(step.x, F64), np.asarray(step.dy, F64)
        red = tuple(i for i in range(x.ndim) if i != ax)
        if not step.training:
            s = 1.0 / np.sqrt(var_r + eps)
            xmu = x - _per_channel(mean_r, x.ndim, ax)
            y = _per_channel(g * s, x.ndim, ax) * xmu + _per_channel(b, x.ndim, ax)
            out = {"y": y, "dx": dy * _per_channel(g * s, x.ndim, ax),
                   "dgamma": np.sum(dy * xmu * _per_channel(s, x.ndim, ax), axis=red), "dbeta": np.sum(dy, axis=red)}
            n = x.size // x.shape[ax]
        elif renorm is not None:
            _, _, _, _, mean, var, n = _bn(x, dy, g, b, ax, eps, np.ones(c), np.zeros(c))
            rstd = np.maximum(rn_std, np.sqrt(eps))
            r = np.clip(np.sqrt(var + eps) / rstd, renorm.get("rmin", -np.inf), renorm.get("rmax", np.inf))
            d = np.clip((mean - rn_mean) / rstd, -renorm.get("dmax", np.inf), renorm.get("dmax", np.inf))
            y, dx, dg, db, mean, var, n = _bn(x, dy, g, b, ax, eps, r, d)
            t += 1
            keep, take = _weights(conv, t)
            stat_var = var * n / (n - 1) if conv.unbiased_running_var else var
            mean_r = keep * mean_r + take * mean
            std_r = keep * std_r + take * np.sqrt(stat_var + eps)
            var_r = np.maximum(std_r * std_r - eps, 0.0)
            m = float(case.variant.get("renorm_momentum", 0.99))
            rn_mean, rn_std = m * rn_mean + (1 - m) * mean, m * rn_std + (1 - m) * np.sqrt(var + eps)
            out = {"y": y, "dx": dx, "dgamma": dg, "dbeta": db}
        else:
            parts = [_bn(x[i:i + k], dy[i:i + k], g, b, ax, eps, np.ones(c), np.zeros(c))
                     for i in range(0, x.shape[0], k)]
            n = parts[0][6]
            t += 1
            keep, take = _weights(conv, t)
            stat_vars = [p[5] * n / (n - 1) if conv.unbiased_running_var else p[5] for p in parts]
            mean_r = keep * mean_r + take * np.mean([p[4] for p in parts], axis=0)
            var_r = keep * var_r + take * np.mean(stat_vars, axis=0)
            out = {"y": np.concatenate([p[0] for p in parts]), "dx": np.concatenate([p[1] for p in parts]),
                   "dgamma": sum(p[2] for p in parts), "dbeta": sum(p[3] for p in parts)}
        if conv.fix_gamma:
            out["dgamma"] = np.zeros(c, F64)
        out.update(running_mean=mean_r, running_var=var_r, num_batches_tracked=t)
        u = UNIT_ROUNDOFF[case.dtype]
        bounds.append({q: np.full(np.shape(v), (n + 16) * u * max(float(np.max(np.abs(v), initial=0.0)), 1e-30))
                       for q, v in out.items() if q != "num_batches_tracked"})
        steps.append(out)
    return Run(steps, None, bounds)
