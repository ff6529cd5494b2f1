"""The cases of the conformance battery: fixed-seed data for a sequence of training and eval steps, and the
combinations a backend refuses (with the error it raises)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..conventions import Convention, resolve_convention
from . import reference as R

F64 = np.float64


@dataclass
class Step:
    """One call: ``x`` and the upstream gradient ``dy`` as float64 arrays holding values of the case's dtype."""

    x: np.ndarray
    dy: np.ndarray
    training: bool = True


@dataclass
class Case:
    name: str
    convention: str | Convention
    dtype: str
    gamma: np.ndarray  # float64 values of the parameter dtype (float32, or float64 for float64 input)
    beta: np.ndarray
    steps: list[Step]
    axis: int | None = None
    momentum: float | None = None
    eps: float | None = None
    stateful: bool = True  # False: state=None (PyTorch's track_running_stats=False), training steps only
    variant: dict = field(default_factory=dict)  # batch_norm's keywords of a BN variant (renorm=, virtual_batch_size=)

    @property
    def conv(self) -> Convention:
        return resolve_convention(self.convention, self.momentum, self.eps)

    @property
    def conv_name(self) -> str:
        return self.convention if isinstance(self.convention, str) else self.convention.name

    @property
    def channel_axis(self) -> int:
        ndim = self.steps[0].x.ndim
        return (self.conv.axis if self.axis is None else self.axis) % ndim

    @property
    def channels(self) -> int:
        return len(self.gamma)

    @property
    def pdtype(self) -> str:
        return R.param_dtype(self.dtype)

    def describe(self) -> str:
        shapes = sorted({tuple(s.x.shape) for s in self.steps})
        modes = "".join("T" if s.training else "E" for s in self.steps)
        return (f"{self.name}: {self.conv_name} {self.dtype} shapes={shapes} axis={self.axis} steps={modes} "
                f"momentum={self.momentum} eps={self.eps} stateful={self.stateful}"
                + (f" variant={self.variant}" if self.variant else ""))


def make_case(
    name: str, convention: str | Convention, dtype: str, shapes: Sequence[tuple[int, ...]], *,
    training: Sequence[bool] | None = None, axis: int | None = None, seed: int = 0,
    offsets: float | Sequence[float] = 0.0, spread: float = 1.0, constant: Iterable[int] = (),
    specials: Iterable[tuple[int, int, float]] = (), momentum: float | None = None, eps: float | None = None,
    stateful: bool = True, gamma: Sequence[float] | None = None, beta: Sequence[float] | None = None,
    dy_scale: float = 1.0,
) -> Case:
    """A case with data drawn from ``seed``: one step per shape in ``shapes`` (``training`` flags, default all).

    Channel c holds ``mean_c + spread * N(0, 1)`` with ``|mean_c| = offsets[c] * spread`` (random sign; ``offsets``
    is repeated or cut to the number of channels);
    channels in ``constant`` hold one integer value; ``specials`` are ``(step, flat index, value)`` entries
    (NaN, inf) written into x. Everything is rounded to ``dtype`` (parameters to the parameter dtype).
    """
    rng = np.random.default_rng(seed)
    conv = resolve_convention(convention, momentum, eps)
    ndim = len(shapes[0])
    ax = (conv.axis if axis is None else axis) % ndim
    channels = shapes[0][ax]
    ratio = np.resize(np.asarray(offsets, F64), channels)  # repeated or cut to one per channel
    mean = ratio * spread * rng.choice([-1.0, 1.0], channels)
    pdt = R.param_dtype(dtype)
    g = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels) if gamma is None else gamma
    b = rng.uniform(-1.0, 1.0, channels) if beta is None else beta
    training = [True] * len(shapes) if training is None else list(training)
    steps = []
    for shape in shapes:
        bc = [1] * ndim
        bc[ax] = channels
        x = mean.reshape(bc) + spread * rng.standard_normal(shape)
        for c in constant:
            idx = [slice(None)] * ndim
            idx[ax] = c
            x[tuple(idx)] = np.round(mean[c])
        steps.append(Step(x, dy_scale * rng.standard_normal(shape)))
    for i, flat, value in specials:
        if steps[i].x.size:
            steps[i].x.reshape(-1)[flat % steps[i].x.size] = value
    for s, t in zip(steps, training, strict=True):
        s.x, s.dy, s.training = R.quantize(s.x, dtype), R.quantize(s.dy, dtype), bool(t)
    return Case(name, convention, dtype, R.quantize(g, pdt), R.quantize(b, pdt), steps, axis, momentum, eps, stateful)


# ---- what a backend cannot do ---------------------------------------------------------------------------------------
def jax_x64() -> bool:
    """Whether JAX keeps float64 here: its flag if JAX is imported, else ``JAX_ENABLE_X64`` (imports nothing)."""
    jax = sys.modules.get("jax")
    if jax is not None:
        return bool(jax.config.jax_enable_x64)
    return os.environ.get("JAX_ENABLE_X64", "").lower() in ("1", "true", "yes")


#: Every combination a backend refuses, with the reason and the error it raises (asserted by the test suite).
#: ``(backend, what) -> (exception type, text the message contains, reason)``.
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str, str]] = {
    ("numpy", "bfloat16"): (TypeError, "no bfloat16", "NumPy has no bfloat16 dtype"),
    ("mxnet", "bfloat16"): (TypeError, "no bfloat16", "MXNet 1.9 NDArray has no bfloat16 dtype"),
    ("mxnet", "empty"): (ValueError, "zero-size", "MXNet 1.x cannot hold zero-size arrays (empty batches)"),
    ("jax", "float64"): (TypeError, "jax_enable_x64",
                         "JAX keeps float64 only with jax_enable_x64; multibn refuses it rather than truncate"),
}


def unsupported(case: Case, backend: str) -> str | None:
    """Why ``backend`` cannot run ``case`` (a key of :data:`UNSUPPORTED`), or None."""
    if (backend, case.dtype) in UNSUPPORTED and not (backend == "jax" and jax_x64()):
        return case.dtype
    if (backend, "empty") in UNSUPPORTED and any(s.x.size == 0 for s in case.steps):
        return "empty"
    return None
