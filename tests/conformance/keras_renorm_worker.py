"""Keras 3 ``BatchNormalization(renorm=True)`` on the steps of an .npz file, in a process of its own (Keras picks
its backend at import, from ``KERAS_BACKEND``): ``python keras_renorm_worker.py IN.npz OUT.npz``.

Each step: the output, the gradients of ``sum(y * dy)`` with respect to x, gamma and beta (training steps), and
every non-trainable variable after the step (moving mean/variance/stddev, renorm mean/stddev).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(src: str, dst: str) -> None:
    import keras

    d = np.load(src)
    cfg = json.loads(str(d["config"]))
    layer = keras.layers.BatchNormalization(axis=cfg["axis"], momentum=cfg["momentum"], epsilon=cfg["eps"],
                                            renorm=True, renorm_clipping=cfg["clip"],
                                            renorm_momentum=cfg["renorm_momentum"])
    layer.build(tuple(d["x0"].shape))
    layer.gamma.assign(d["gamma"])
    layer.beta.assign(d["beta"])
    out = {}
    for i in range(cfg["nsteps"]):
        x, dy, training = d[f"x{i}"], d[f"dy{i}"], bool(d[f"training{i}"])
        y, dx, dgamma, dbeta = STEP[os.environ["KERAS_BACKEND"]](layer, x, dy, training)
        out.update({f"y{i}": y, f"dx{i}": dx, f"dgamma{i}": dgamma, f"dbeta{i}": dbeta})
        for v in layer.non_trainable_variables:
            out[f"{v.path.split('/')[-1]}{i}"] = np.asarray(keras.ops.convert_to_numpy(v.value))
    np.savez(dst, **out)


def _jax_step(layer, x, dy, training):
    import jax
    import jax.numpy as jnp

    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    def loss(x, tv):
        y, new = layer.stateless_call(tv, ntv, x, training=training)
        return jnp.sum(y * dy), (y, new)

    (_, (y, new)), (dx, dtv) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), tv)
    for v, n in zip(layer.non_trainable_variables, new, strict=True):
        v.assign(n)
    grads = {v.path.split("/")[-1]: np.asarray(g) for v, g in zip(layer.trainable_variables, dtv, strict=True)}
    return np.asarray(y), np.asarray(dx), grads["gamma"], grads["beta"]


def _torch_step(layer, x, dy, training):
    import torch

    xt = torch.tensor(x, requires_grad=True)
    for v in layer.trainable_variables:
        v.value.grad = None
    y = layer(xt, training=training)
    (y * torch.tensor(dy)).sum().backward()
    grads = {v.path.split("/")[-1]: v.value.grad.detach().numpy() for v in layer.trainable_variables}
    return y.detach().numpy(), xt.grad.numpy(), grads["gamma"], grads["beta"]


STEP = {"jax": _jax_step, "torch": _torch_step}

if __name__ == "__main__":
    main(*sys.argv[1:3])
