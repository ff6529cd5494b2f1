"""The networks in NumPy, with their backward written out: the BN part is :func:`multibn.batch_norm` and
:func:`multibn.batch_norm_vjp` (NumPy has no autodiff; batch renormalisation with a :class:`multibn.RenormState`,
ghost BN with ``virtual_batch_size``), the rest (convolution, dense, sigmoid/tanh/ReLU,
average pooling, the losses) is a few lines each."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from multibn.api import batch_norm, batch_norm_vjp, init_state
from multibn.moments import ChannelMoments

from .models import Layer, Model, functional_variant_kwargs
from .optim import Optimizer

EVAL_CHUNK = 1000


def _windows(x: np.ndarray, k: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H-k+1, W-k+1, k, k) view of every k x k patch."""
    return sliding_window_view(x, (k, k), axis=(2, 3))


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Valid cross-correlation, stride 1 (``nn.Conv2d``): (N, C, H, W), (O, C, k, k) -> (N, O, H-k+1, W-k+1)."""
    out = np.tensordot(_windows(x, w.shape[-1]), w, axes=([1, 4, 5], [1, 2, 3]))  # (N, Ho, Wo, O)
    out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out if b is None else out + b[None, :, None, None]


def conv_backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, ...]:
    """``(dx, dw, db)`` of :func:`conv_forward` (``dx`` None unless ``need_dx``)."""
    k = w.shape[-1]
    dw = np.tensordot(dy, _windows(x, k), axes=([0, 2, 3], [0, 2, 3]))  # (O, C, k, k)
    db = dy.sum(axis=(0, 2, 3))
    dx = None
    if need_dx:  # full convolution of dy with the flipped kernel
        padded = np.pad(dy, ((0, 0), (0, 0), (k - 1, k - 1), (k - 1, k - 1)))
        dx = np.tensordot(_windows(padded, k), w[:, :, ::-1, ::-1], axes=([1, 4, 5], [0, 2, 3]))  # (N, H, W, C)
        dx = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))
    return dx, dw, db


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype)  # no overflow for large |x|


class Trainer:
    """``model`` in NumPy holding ``weights``; :meth:`step` runs the forward, the backward and the update."""

    def __init__(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        self.model = model
        self.dtype = np.dtype(model.dtype)
        self.params = {k: v.astype(self.dtype, copy=True) for k, v in weights.items()}
        self.states = {layer.name: init_state(layer.n_out, backend="numpy", convention=model.convention,
                                              dtype=model.dtype, renorm=layer.renorm)
                       for layer in model.layers if layer.kind == "bn"}
        self.variants = {layer.name: functional_variant_kwargs(layer) for layer in model.layers if layer.kind == "bn"}
        self.opt = Optimizer(model.optimizer, model.lr, list(self.params.values()), np.zeros_like)
        self._bn = dict(convention=model.convention, axis=1, backend="numpy")

    def forward(self, x: np.ndarray, training: bool) -> tuple[np.ndarray, list[tuple[Layer, np.ndarray, Any, Any]]]:
        """The output and, per layer, ``(layer, input, output, state)`` for the backward, ``state`` being the BN
        state the layer normalised with (batch renormalisation's ``r`` and ``d`` come from it), else None."""
        p, tape = self.params, []
        for layer in self.model.layers:
            state = None
            if layer.kind == "conv":
                y = conv_forward(x, p[f"{layer.name}.weight"], p.get(f"{layer.name}.bias"))
            elif layer.kind == "dense":
                y = x @ p[f"{layer.name}.weight"].T
                if layer.bias:
                    y = y + p[f"{layer.name}.bias"]
            elif layer.kind == "bn":
                state = self.states[layer.name]
                y, new = batch_norm(x, p[f"{layer.name}.gamma"], p[f"{layer.name}.beta"], state, training=training,
                                    **self._bn, **(self.variants[layer.name] if training else {}))
                if training:
                    self.states[layer.name] = new
            elif layer.kind == "act":
                y = {"sigmoid": _sigmoid, "tanh": np.tanh, "relu": lambda a: np.maximum(a, 0)}[layer.fn](x)
            elif layer.kind == "pool":
                n, c, h, w = x.shape
                y = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
            else:
                y = x.reshape(len(x), -1)
            tape.append((layer, x, y, state))
            x = y
        return x, tape

    def backward(self, tape: list[tuple[Layer, np.ndarray, Any, Any]], dy: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of every parameter given ``dy``, the gradient of the loss with respect to the output."""
        p, grads = self.params, {}
        for i in range(len(tape) - 1, -1, -1):
            layer, x, y, state = tape[i]
            if layer.kind == "conv":
                dy, grads[f"{layer.name}.weight"], db = conv_backward(x, p[f"{layer.name}.weight"], dy, need_dx=i > 0)
                if layer.bias:
                    grads[f"{layer.name}.bias"] = db
            elif layer.kind == "dense":
                grads[f"{layer.name}.weight"] = dy.T @ x
                if layer.bias:
                    grads[f"{layer.name}.bias"] = dy.sum(axis=0)
                dy = dy @ p[f"{layer.name}.weight"]
            elif layer.kind == "bn":
                dy, grads[f"{layer.name}.gamma"], grads[f"{layer.name}.beta"] = batch_norm_vjp(
                    x, p[f"{layer.name}.gamma"], p[f"{layer.name}.beta"], state if layer.renorm else None, dy,
                    training=True, **self._bn, **self.variants[layer.name])
            elif layer.kind == "act":
                if layer.fn == "sigmoid":
                    dy = dy * y * (1 - y)
                elif layer.fn == "tanh":
                    dy = dy * (1 - y * y)
                else:
                    dy = dy * (x > 0)
            elif layer.kind == "pool":
                dy = np.repeat(np.repeat(dy, 2, axis=2), 2, axis=3) * self.dtype.type(0.25)
            else:
                dy = dy.reshape(x.shape)
        return grads

    def _losses(self, out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-example losses and their gradient with respect to ``out`` (for the mean over the batch)."""
        n = len(out)
        if self.model.loss == "xent":
            shifted = out - out.max(axis=1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            d = np.exp(logp)
            d[np.arange(n), y] -= 1
            return -logp[np.arange(n), y], d / n
        diff = out - y
        return (diff * diff).sum(axis=1), 2 * diff / n

    def _cast(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x.astype(self.dtype, copy=False), (y if self.model.loss == "xent" else y.astype(self.dtype, copy=False))

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = self._cast(x, y)
        out, tape = self.forward(x, training=True)
        losses, dout = self._losses(out, y)
        grads = self.backward(tape, dout.astype(self.dtype))
        names = list(self.params)
        new = self.opt.step([self.params[k] for k in names], [grads[k] for k in names])
        self.params = {k: v.astype(self.dtype, copy=False) for k, v in zip(names, new, strict=True)}
        return float(losses.mean())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
        """Eval mode (running statistics): mean loss and accuracy (None for regression) over ``x``."""
        total, correct = 0.0, 0
        for i in range(0, len(x), EVAL_CHUNK):
            xb, yb = self._cast(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
            out, _ = self.forward(xb, training=False)
            total += float(self._losses(out, yb)[0].sum())
            if self.model.loss == "xent":
                correct += int((out.argmax(axis=1) == yb).sum())
        return total / len(x), (correct / len(x) if self.model.loss == "xent" else None)

    def evaluate_recomputed(self, batches: list[np.ndarray], x: np.ndarray,
                            y: np.ndarray) -> tuple[float, float | None]:
        """:meth:`evaluate` with BN statistics recomputed exactly over ``batches`` (each BN layer's training-mode
        inputs, merged by :class:`multibn.ChannelMoments`); the running averages are put back afterwards."""
        running = dict(self.states)  # the training-mode forward below replaces the entries of self.states
        moments = {name: ChannelMoments(axis=1) for name in running}
        ddof = int(self.model.convention.unbiased_running_var)
        try:
            for b in batches:
                _, tape = self.forward(b.astype(self.dtype, copy=False), training=True)
                for layer, inp, *_ in tape:
                    if layer.kind == "bn":
                        moments[layer.name].partial_fit(inp)
            self.states = {name: running[name]._replace(running_mean=m.mean.astype(self.dtype),
                                                        running_var=m.var(ddof).astype(self.dtype))
                           for name, m in moments.items()}  # eval reads these two only (a RenormState too)
            return self.evaluate(x, y)
        finally:
            self.states = running

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float64) for k, v in self.params.items()}
