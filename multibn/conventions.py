"""Named batch-norm conventions: one table, one row per framework's native BN.

A convention fixes every rule on which frameworks disagree (see ``docs/semantics.md`` §1-2):

* momentum and which side it weighs: ``"new"`` means ``R <- (1 - m) R + m stat`` (PyTorch),
  ``"old"`` means ``R <- m R + (1 - m) stat`` (MXNet, Gluon, Flax, Keras, d2l); ``None`` is PyTorch's
  cumulative average ``R <- R + (stat - R) / t`` over ``num_batches_tracked = t``;
* whether the running variance stores the biased ``M2 / n`` or the unbiased ``M2 / (n - 1)`` estimate
  (normalisation always uses the biased one);
* eps (inside the square root), whether gamma is fixed to 1 (MXNet ``fix_gamma``), the default channel axis,
  the zero-variance guard (``invstd = 0`` when ``var == 0`` and ``eps == 0`` in training), the PyTorch error
  for one value per channel, and whether an empty batch still counts in ``num_batches_tracked``.

An empty batch (zero elements per channel) returns an empty output and never changes the running mean or
variance, under every convention (PyTorch's behaviour; MXNet, Flax and Keras would write NaN into them).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Convention:
    """The rules of one framework's batch norm. See the module docstring for each field."""

    name: str
    momentum: float | None
    momentum_weighs: Literal["new", "old"]
    unbiased_running_var: bool
    eps: float
    axis: int = 1
    fix_gamma: bool = False
    zero_var_guard: bool = False
    single_value_raises: bool = False
    count_empty_batches: bool = False
    reproduces: str = ""

    def __post_init__(self) -> None:
        if self.momentum_weighs not in ("new", "old"):
            raise ValueError(f"momentum_weighs must be 'new' or 'old', got {self.momentum_weighs!r}")
        if self.momentum is None and self.momentum_weighs != "new":
            raise ValueError("momentum=None (cumulative average) is only defined with momentum_weighs='new'")
        check_momentum(self.momentum)
        check_eps(self.eps)

    def with_overrides(self, momentum: float | None = None, eps: float | None = None) -> Convention:
        """This convention with ``momentum``/``eps`` replaced where they are given (None keeps the preset)."""
        changes: dict[str, float] = {}
        if momentum is not None:
            changes["momentum"] = check_momentum(momentum)
        if eps is not None:
            changes["eps"] = check_eps(eps)
        return dataclasses.replace(self, **changes) if changes else self

    def update_weights(self) -> tuple[float, float] | None:
        """``(keep, take)`` with ``R <- keep * R + take * stat``; None for the cumulative average."""
        if self.momentum is None:
            return None
        m = float(self.momentum)
        return (1.0 - m, m) if self.momentum_weighs == "new" else (m, 1.0 - m)


def _real(value: object) -> bool:
    """A real number that is not a bool: Python's int and float, NumPy's integer and floating scalars."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # np.bool_ is no numbers.Real


def check_momentum(momentum: float | None) -> float | None:
    """``momentum`` as a float in [0, 1] (any real number type, NumPy's ``float32`` as PyTorch's layers take it)."""
    if momentum is None:
        return None
    if not _real(momentum):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__} {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return float(momentum)


def check_eps(eps: float) -> float:
    """``eps`` as a float >= 0 (any real number type)."""
    if not _real(eps):
        raise TypeError(f"eps must be a non-negative float, got {type(eps).__name__} {eps!r}")
    if not float(eps) >= 0.0:  # also refuses NaN
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return float(eps)


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            "torch", 0.1, "new", unbiased_running_var=True, eps=1e-5, zero_var_guard=True,
            single_value_raises=True, count_empty_batches=True,
            reproduces="PyTorch 2.x nn.BatchNorm1d/2d/3d and F.batch_norm (momentum=0.1)",
        ),
        Convention(
            "torch_cma", None, "new", unbiased_running_var=True, eps=1e-5, zero_var_guard=True,
            single_value_raises=True, count_empty_batches=True,
            reproduces="PyTorch 2.x nn.BatchNorm*d(momentum=None): cumulative moving average",
        ),
        Convention(
            "mxnet", 0.9, "old", unbiased_running_var=False, eps=1e-3, fix_gamma=True, zero_var_guard=True,
            reproduces="MXNet 1.9.1 mx.nd.BatchNorm / sym.BatchNorm defaults on CPU (fix_gamma=True, eps=1e-3)",
        ),
        Convention(
            "gluon", 0.9, "old", unbiased_running_var=False, eps=1e-5, zero_var_guard=True,
            reproduces="MXNet 1.9.1 gluon.nn.BatchNorm defaults on CPU (scale=True)",
        ),
        Convention(
            "d2l", 0.9, "old", unbiased_running_var=False, eps=1e-5,
            reproduces="d2l.ai from-scratch batch_norm, MXNet tab up to v0.17 (momentum 0.9 on the old value)",
        ),
        Convention(
            "flax", 0.99, "old", unbiased_running_var=False, eps=1e-5, axis=-1,
            reproduces="Flax 0.12 linen.BatchNorm / nnx.BatchNorm (use_fast_variance=False; the default "
            "fast variance differs only by rounding, except on data with large offsets)",
        ),
        Convention(
            "keras", 0.99, "old", unbiased_running_var=False, eps=1e-3, axis=-1,
            reproduces="Keras 3.x layers.BatchNormalization (jax backend; the torch backend's one-pass "
            "variance differs by rounding)",
        ),
    )
}


def resolve_convention(convention: str | Convention, momentum: float | None, eps: float | None) -> Convention:
    """The convention named (or given), with the ``momentum``/``eps`` overrides applied."""
    if isinstance(convention, Convention):
        return convention.with_overrides(momentum, eps)
    if not isinstance(convention, str):
        raise TypeError(
            f"convention must be a name or a multibn.Convention, got {type(convention).__name__} {convention!r}"
        )
    try:
        preset = CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"convention {convention!r} is unknown; known conventions: {', '.join(CONVENTIONS)}"
        ) from None
    return preset.with_overrides(momentum, eps)
