"""The networks in PyTorch: ``nn.Conv2d``/``nn.Linear`` and :class:`multibn.layers.torch.BatchNorm`."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from multibn.layers.torch import BatchNorm, recompute_statistics

from .models import Model, layer_variant_kwargs
from .optim import Optimizer

EVAL_CHUNK = 1000
_ACTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class Trainer:
    """``model`` as an ``nn.Sequential`` holding ``weights``; :meth:`step` trains on one batch."""

    def __init__(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        self.model = model
        modules: list[nn.Module] = []
        self.params: dict[str, nn.Parameter] = {}
        for layer in model.layers:
            if layer.kind in ("conv", "dense"):
                if layer.kind == "conv":
                    m = nn.Conv2d(layer.n_in, layer.n_out, layer.k, bias=layer.bias)
                else:
                    m = nn.Linear(layer.n_in, layer.n_out, bias=layer.bias)
                self.params[f"{layer.name}.weight"] = m.weight
                if layer.bias:
                    self.params[f"{layer.name}.bias"] = m.bias
            elif layer.kind == "bn":
                m = BatchNorm(layer.n_out, layer.ndim, convention=model.convention, **layer_variant_kwargs(layer))
                self.params |= {f"{layer.name}.gamma": m.weight, f"{layer.name}.beta": m.bias}
            elif layer.kind == "act":
                m = _ACTS[layer.fn]()
            elif layer.kind == "pool":
                m = nn.AvgPool2d(2)
            else:
                m = nn.Flatten()
            modules.append(m)
        self.dtype = getattr(torch, model.dtype)
        self.net = nn.Sequential(*modules).to(self.dtype)  # parameters converted in place: self.params still holds them
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(weights[name]))
        self.opt = Optimizer(model.optimizer, model.lr, list(self.params.values()), torch.zeros_like)

    def _loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.model.loss == "xent":
            return F.cross_entropy(out, y, reduction=reduction)
        return F.mse_loss(out, y, reduction=reduction)

    def _input(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(self.model.dtype, copy=False))

    def _target(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y if self.model.loss == "xent" else y.astype(self.model.dtype, copy=False))

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.net.train()
        params = list(self.params.values())
        loss = self._loss(self.net(self._input(x)), self._target(y))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, new in zip(params, self.opt.step([p.detach() for p in params], list(grads)), strict=True):
                p.copy_(new)
        return float(loss.detach())

    def evaluate(self, x: np.ndarray, y: np.ndarray, net: nn.Module | None = None) -> tuple[float, float | None]:
        """Eval mode (running statistics): mean loss and accuracy (None for regression) over ``x``."""
        net = self.net if net is None else net
        net.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(x), EVAL_CHUNK):
                out = net(self._input(x[i:i + EVAL_CHUNK]))
                yb = self._target(y[i:i + EVAL_CHUNK])
                total += float(self._loss(out, yb, "sum"))
                if self.model.loss == "xent":
                    correct += int((out.argmax(1) == yb).sum())
        return total / len(x), (correct / len(x) if self.model.loss == "xent" else None)

    def evaluate_recomputed(self, batches: list[np.ndarray], x: np.ndarray,
                            y: np.ndarray) -> tuple[float, float | None]:
        """:meth:`evaluate` on a copy of the network whose BN statistics :func:`recompute_statistics` set exactly
        over ``batches`` (the network being trained keeps its running averages)."""
        net = recompute_statistics(copy.deepcopy(self.net), (self._input(b) for b in batches), progress=False)
        return self.evaluate(x, y, net)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().astype(np.float64) for k, p in self.params.items()}
