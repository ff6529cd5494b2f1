"""The networks in JAX: pure functions over a parameter dict, :class:`multibn.layers.jax.BatchNorm` for BN, the
whole training step (forward, ``jax.grad``, optimizer) under one ``jax.jit``."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multibn.algorithm import Layout, Stats, batch_stats
from multibn.backends import get_backend
from multibn.layers.jax import BatchNorm
from multibn.moments import ChannelMoments
from multibn.state import BNState, RenormState

from .models import Model, layer_variant_kwargs
from .optim import adam, bias_corrections, sgd

EVAL_CHUNK = 1000
#: each BN layer's state by name (a RenormState under batch renormalisation)
States = dict[str, BNState | RenormState]
_ACTS = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}


def x64_context(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """64-bit JAX inside the block only (float64 models), leaving the process-wide ``jax_enable_x64`` alone."""
    if not enabled:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):  # jax >= 0.8
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # jax 0.7

    return enable_x64()


class Trainer:
    """``model`` as a pure JAX function holding ``weights``; :meth:`step` trains on one batch."""

    def __init__(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        self.model = model
        self.bn = {layer.name: BatchNorm(layer.n_out, convention=model.convention, axis=1,
                                         **layer_variant_kwargs(layer))  # type: ignore[arg-type]
                   for layer in model.layers if layer.kind == "bn"}
        self.x64 = lambda: x64_context(model.dtype == "float64")
        with self.x64():
            self.params = {k: jnp.asarray(v, model.dtype) for k, v in weights.items()}
            self.states = {name: bn.init(dtype=model.dtype)[1] for name, bn in self.bn.items()}
            zeros = {k: jnp.zeros_like(v) for k, v in self.params.items()}
            self.opt = (zeros, zeros)
        self.t = 0
        self._step = jax.jit(self._train_step)
        self._eval = jax.jit(self._eval_chunk)
        self._capture = jax.jit(self._bn_input_stats)

    def forward(self, params: dict[str, Any], states: States, x: Any, training: bool,
                capture: dict[str, Stats] | None = None) -> tuple[Any, States]:
        """The output and the new BN states; ``capture`` collects each BN layer's input statistics."""
        new_states = dict(states)
        for layer in self.model.layers:
            if layer.kind == "conv":
                x = jax.lax.conv_general_dilated(
                    x, params[f"{layer.name}.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"),
                    precision=jax.lax.Precision.HIGHEST,
                )
                if layer.bias:
                    x = x + params[f"{layer.name}.bias"][None, :, None, None]
            elif layer.kind == "dense":
                x = jnp.matmul(x, params[f"{layer.name}.weight"].T, precision=jax.lax.Precision.HIGHEST)
                if layer.bias:
                    x = x + params[f"{layer.name}.bias"]
            elif layer.kind == "bn":
                if capture is not None:
                    st = batch_stats(get_backend("jax"), x, Layout.of(x.shape, 1))
                    capture[layer.name] = Stats(jnp.asarray(st.count), st.mean, st.m2)
                p = {"scale": params[f"{layer.name}.gamma"], "bias": params[f"{layer.name}.beta"]}
                x, new_states[layer.name] = self.bn[layer.name].apply(p, states[layer.name], x, training=training)
            elif layer.kind == "act":
                x = _ACTS[layer.fn](x)
            elif layer.kind == "pool":
                n, c, h, w = x.shape
                x = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
            else:
                x = x.reshape(x.shape[0], -1)
        return x, new_states

    def _losses(self, out: Any, y: Any) -> Any:
        if self.model.loss == "xent":
            logp = jax.nn.log_softmax(out, axis=1)
            return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        return jnp.sum((out - y) ** 2, axis=1)

    def _train_step(self, params: dict[str, Any], states: States, opt: Any, corrections: Any, x: Any,
                    y: Any) -> Any:
        def loss_fn(p: dict[str, Any]) -> tuple[Any, States]:
            out, new_states = self.forward(p, states, x, True)
            return jnp.mean(self._losses(out, y)), new_states

        (loss, new_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        m, v = opt
        if self.model.optimizer == "sgd":
            params = {k: sgd(params[k], grads[k], self.model.lr) for k in params}
        else:
            upd = {k: adam(params[k], grads[k], m[k], v[k], corrections, self.model.lr) for k in params}
            params = {k: u[0] for k, u in upd.items()}
            m, v = {k: u[1] for k, u in upd.items()}, {k: u[2] for k, u in upd.items()}
        return params, new_states, (m, v), loss

    def _eval_chunk(self, params: dict[str, Any], states: States, x: Any, y: Any) -> tuple[Any, Any]:
        out, _ = self.forward(params, states, x, False)
        correct = jnp.sum(jnp.argmax(out, axis=1) == y) if self.model.loss == "xent" else jnp.asarray(0)
        return jnp.sum(self._losses(out, y)), correct

    def _bn_input_stats(self, params: dict[str, Any], states: States, x: Any) -> tuple[dict[str, Stats], States]:
        captured: dict[str, Stats] = {}
        _, states = self.forward(params, states, x, True, captured)
        return captured, states

    def _cast(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dt = self.model.dtype
        return x.astype(dt, copy=False), (y if self.model.loss == "xent" else y.astype(dt, copy=False))

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.t += 1
        with self.x64():
            corrections = tuple(jnp.asarray(c, self.model.dtype) for c in bias_corrections(self.t))
            self.params, self.states, self.opt, loss = self._step(self.params, self.states, self.opt, corrections,
                                                                  *self._cast(x, y))
            return float(loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray, states: States | None = None) -> tuple[
            float, float | None]:
        """Eval mode (running statistics): mean loss and accuracy (None for regression) over ``x``."""
        states = self.states if states is None else states
        total, correct = 0.0, 0
        with self.x64():
            for i in range(0, len(x), EVAL_CHUNK):
                s, c = self._eval(self.params, states, *self._cast(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]))
                total, correct = total + float(s), correct + int(c)
        return total / len(x), (correct / len(x) if self.model.loss == "xent" else None)

    def evaluate_recomputed(self, batches: list[np.ndarray], x: np.ndarray,
                            y: np.ndarray) -> tuple[float, float | None]:
        """:meth:`evaluate` with BN statistics recomputed exactly over ``batches``: each BN layer's training-mode
        input statistics per batch (jitted), merged in float64 by :class:`multibn.ChannelMoments`."""
        moments = {name: ChannelMoments() for name in self.bn}
        with self.x64():
            moving = self.states  # moves from batch to batch, as the layers' recompute_statistics lets it (renorm's
            for b in batches:     # training-mode output depends on it), then is dropped
                captured, moving = self._capture(self.params, moving, b.astype(self.model.dtype, copy=False))
                for name, st in captured.items():
                    moments[name].merge(Stats(int(st.count), *(np.asarray(a, np.float64) for a in st[1:])))
            ddof = int(self.model.convention.unbiased_running_var)
            states = {name: self.states[name]._replace(running_mean=jnp.asarray(m.mean, self.model.dtype),
                                                       running_var=jnp.asarray(m.var(ddof), self.model.dtype))
                      for name, m in moments.items()}  # eval reads these two only (a RenormState too)
        return self.evaluate(x, y, states)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float64) for k, v in self.params.items()}


