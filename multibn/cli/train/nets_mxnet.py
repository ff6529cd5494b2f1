"""The networks in MXNet 1.9 Gluon: ``nn.Conv2D``/``nn.Dense`` and :class:`multibn.layers.gluon.BatchNorm`
(the network is a plain ``nn.Sequential`` run imperatively, as the nets of the other backends run)."""

from __future__ import annotations

import numpy as np

from multibn.backends.mxnet import mx  # MXNet after the NumPy alias it needs
from multibn.layers.gluon import BatchNorm, recompute_statistics

from .models import Model, layer_variant_kwargs
from .optim import Optimizer
from .runner import Unsupported

EVAL_CHUNK = 1000
nn = mx.gluon.nn
autograd = mx.autograd


class Trainer:
    """``model`` as a Gluon ``nn.Sequential`` holding ``weights``; :meth:`step` trains on one batch."""

    def __init__(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        self.model = model
        self.net = nn.Sequential()
        self.params = {}
        with self.net.name_scope():
            for layer in model.layers:
                if layer.kind in ("conv", "dense"):
                    if layer.kind == "conv":
                        m = nn.Conv2D(layer.n_out, layer.k, in_channels=layer.n_in, use_bias=layer.bias)
                    else:
                        m = nn.Dense(layer.n_out, in_units=layer.n_in, use_bias=layer.bias)
                    self.params[f"{layer.name}.weight"] = m.weight
                    if layer.bias:
                        self.params[f"{layer.name}.bias"] = m.bias
                elif layer.kind == "bn":
                    variant = layer_variant_kwargs(layer)
                    try:
                        m = BatchNorm(layer.n_out, layer.ndim, convention=model.convention, **variant)
                    except TypeError as e:
                        if not variant:
                            raise
                        raise Unsupported(f"multibn.layers.gluon.BatchNorm does not take {', '.join(variant)} "
                                          f"yet ({e})") from None
                    self.params |= {f"{layer.name}.gamma": m.gamma, f"{layer.name}.beta": m.beta}
                elif layer.kind == "act":
                    m = nn.Activation(layer.fn)
                elif layer.kind == "pool":
                    m = nn.AvgPool2D(2)
                else:
                    m = nn.Flatten()
                self.net.add(m)
        self.net.initialize(ctx=mx.cpu())
        self.net.cast(model.dtype)
        for name, p in self.params.items():
            p.set_data(mx.nd.array(weights[name], dtype=model.dtype))
        self.opt = Optimizer(model.optimizer, model.lr, [p.data() for p in self.params.values()], mx.nd.zeros_like)

    def _losses(self, out: mx.nd.NDArray, y: mx.nd.NDArray) -> mx.nd.NDArray:
        if self.model.loss == "xent":
            return -mx.nd.pick(mx.nd.log_softmax(out, axis=1), y, axis=1)
        return mx.nd.sum((out - y) ** 2, axis=1)

    def _target(self, y: np.ndarray) -> mx.nd.NDArray:
        return mx.nd.array(y, dtype=self.model.dtype)  # class indices are exact as floats; pick takes them

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        xb, yb = mx.nd.array(x, dtype=self.model.dtype), self._target(y)
        with autograd.record():
            loss = mx.nd.mean(self._losses(self.net(xb), yb))
        loss.backward()
        params = list(self.params.values())
        for p, new in zip(params, self.opt.step([p.data() for p in params], [p.grad() for p in params]),
                          strict=True):
            p.set_data(new)
        return float(loss.asscalar())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
        """Eval mode (running statistics): mean loss and accuracy (None for regression) over ``x``."""
        total, correct = 0.0, 0
        for i in range(0, len(x), EVAL_CHUNK):
            out = self.net(mx.nd.array(x[i:i + EVAL_CHUNK], dtype=self.model.dtype))
            yb = self._target(y[i:i + EVAL_CHUNK])
            total += float(mx.nd.sum(self._losses(out, yb)).asscalar())
            if self.model.loss == "xent":
                correct += int(mx.nd.sum(mx.nd.argmax(out, axis=1) == yb).asscalar())
        return total / len(x), (correct / len(x) if self.model.loss == "xent" else None)

    def evaluate_recomputed(self, batches: list[np.ndarray], x: np.ndarray,
                            y: np.ndarray) -> tuple[float, float | None]:
        """:meth:`evaluate` with the BN statistics :func:`recompute_statistics` sets exactly over ``batches``; the
        running averages (every parameter without a gradient: batch renormalisation's renorm_mean/renorm_std too)
        are put back afterwards, for training to go on."""
        running = [(p, p.data().copy()) for p in self.net.collect_params().values() if p.grad_req == "null"]
        try:
            recompute_statistics(self.net, (mx.nd.array(b, dtype=self.model.dtype) for b in batches), progress=False)
            return self.evaluate(x, y)
        finally:
            for p, value in running:
                p.set_data(value)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: p.data().asnumpy().astype(np.float64) for k, p in self.params.items()}
