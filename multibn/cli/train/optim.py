"""SGD and Adam written once over array operators, so that every backend takes exactly the same step.

The frameworks' own optimizers differ in small ways (MXNet's Adam adds eps before the bias correction,
PyTorch's after), which would make the backends' curves part ways for reasons that have nothing to do with
batch norm. These functions use only ``+ - * / **`` and so run unchanged on NumPy, PyTorch, JAX and MXNet arrays.
"""

from __future__ import annotations

from typing import Any

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def sgd(p: Any, g: Any, lr: float) -> Any:
    """The new parameter: ``p - lr * g``."""
    return p - lr * g


def bias_corrections(t: int) -> tuple[float, float]:
    """Adam's ``(1 - beta1**t, 1 - beta2**t)`` for step ``t`` (1-based), in Python floats: every backend then
    rounds the same two numbers to its dtype (JAX would otherwise compute the powers in float32 under jit)."""
    return 1.0 - BETA1**t, 1.0 - BETA2**t


def adam(p: Any, g: Any, m: Any, v: Any, corrections: tuple[Any, Any], lr: float) -> tuple[Any, Any, Any]:
    """``(p, m, v)`` after one Adam step (Kingma & Ba, eps outside the root) with the step's ``corrections``."""
    m = BETA1 * m + (1.0 - BETA1) * g
    v = BETA2 * v + (1.0 - BETA2) * (g * g)
    m_hat = m / corrections[0]
    v_hat = v / corrections[1]
    return p - lr * m_hat / (v_hat**0.5 + ADAM_EPS), m, v


class Optimizer:
    """The optimizer state of a list of parameters, updated functionally: ``step(params, grads) -> params``."""

    def __init__(self, kind: str, lr: float, params: list[Any], zeros_like: Any) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")
        self.kind, self.lr, self.t = kind, lr, 0
        self.m = [zeros_like(p) for p in params] if kind == "adam" else []
        self.v = [zeros_like(p) for p in params] if kind == "adam" else []

    def step(self, params: list[Any], grads: list[Any]) -> list[Any]:
        self.t += 1
        if self.kind == "sgd":
            return [sgd(p, g, self.lr) for p, g in zip(params, grads, strict=True)]
        out = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p, self.m[i], self.v[i] = adam(p, g, self.m[i], self.v[i], bias_corrections(self.t), self.lr)
            out.append(p)
        return out
