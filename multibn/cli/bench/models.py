"""``multibn bench --model``: one training step of a whole model, with multibn's layers against the native BN.

LeNet as in the textbook's BN chapter: conv(6, 5x5) BN sigmoid avgpool(2), conv(16, 5x5) BN sigmoid avgpool(2),
dense(120) BN sigmoid, dense(84) BN sigmoid, dense(10); 28x28 single-channel input, softmax cross-entropy, SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cases import Runner, Skip, installed
from .runners import import_mxnet

#: ``--model lenet``: one training step per batch size; rows have pass "train-step" and case "lenet_b<batch>"
MODELS = {"lenet": (256, 32)}
MODEL_BACKENDS = ("torch", "mxnet", "jax")
LENET_LR = 0.1


def lenet_data(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, batch)


def torch_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    import torch
    from torch import nn

    from multibn.layers.torch import BatchNorm

    dev = "cuda" if device == "gpu" else "cpu"
    xn, yn = lenet_data(batch)
    x, y = torch.from_numpy(xn).to(dev), torch.from_numpy(yn).to(dev)
    bns = {"native": (nn.BatchNorm2d, nn.BatchNorm1d),
           "multibn": (lambda c: BatchNorm(c, 4), lambda c: BatchNorm(c, 2))}
    out: dict[str, Runner] = {}
    for impl, (bn2, bn1) in bns.items():
        if impl not in impls:
            continue
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5), bn2(6), nn.Sigmoid(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), bn2(16), nn.Sigmoid(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 120), bn1(120), nn.Sigmoid(), nn.Linear(120, 84),
            bn1(84), nn.Sigmoid(), nn.Linear(84, 10)).to(dev).train()
        opt = torch.optim.SGD(net.parameters(), lr=LENET_LR)

        def step(net: Any = net, opt: Any = opt) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            if x.is_cuda:
                torch.cuda.synchronize()

        out[impl] = step
    return out


def gluon_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    mx = import_mxnet()
    from mxnet.gluon import nn

    from multibn.layers.gluon import BatchNorm

    ctx = mx.gpu(0) if device == "gpu" else mx.cpu()
    xn, yn = lenet_data(batch)
    x, y = mx.nd.array(xn, ctx=ctx), mx.nd.array(yn, ctx=ctx)
    bns = {"native": lambda c: nn.BatchNorm(in_channels=c), "multibn": lambda c: BatchNorm(c)}
    loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    out: dict[str, Runner] = {}
    for impl, bn in bns.items():
        if impl not in impls:
            continue
        net = nn.HybridSequential()
        net.add(nn.Conv2D(6, 5, in_channels=1), bn(6), nn.Activation("sigmoid"), nn.AvgPool2D(2),
                nn.Conv2D(16, 5, in_channels=6), bn(16), nn.Activation("sigmoid"), nn.AvgPool2D(2),
                nn.Dense(120, in_units=256), bn(120), nn.Activation("sigmoid"), nn.Dense(84, in_units=120), bn(84),
                nn.Activation("sigmoid"), nn.Dense(10, in_units=84))
        mx.random.seed(0)
        net.initialize(mx.init.Xavier(), ctx=ctx)
        net.hybridize()
        trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LENET_LR})

        def step(net: Any = net, trainer: Any = trainer) -> None:
            with mx.autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(batch)
            mx.nd.waitall()

        out[impl] = step
    return out


def flax_lenet(batch: int, impls: Sequence[str], device: str) -> dict[str, Runner]:
    if not installed(["flax"]):
        raise Skip("flax is not installed")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    try:
        from multibn.layers.flax import BatchNorm as MultibnBatchNorm
    except ImportError as e:
        raise Skip(f"multibn.layers.flax is not available here ({e})") from e

    class LeNet(nn.Module):
        bn: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            def norm(h: Any) -> Any:
                return self.bn(use_running_average=False, momentum=0.9, epsilon=1e-5)(h)

            def pool(h: Any) -> Any:
                return nn.avg_pool(h, (2, 2), strides=(2, 2))

            x = pool(nn.sigmoid(norm(nn.Conv(6, (5, 5), padding="VALID")(x))))
            x = pool(nn.sigmoid(norm(nn.Conv(16, (5, 5), padding="VALID")(x))))
            x = x.reshape((x.shape[0], -1))
            x = nn.sigmoid(norm(nn.Dense(120)(x)))
            x = nn.sigmoid(norm(nn.Dense(84)(x)))
            return nn.Dense(10)(x)

    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    xn, yn = lenet_data(batch)
    x = jax.device_put(jnp.asarray(xn.transpose(0, 2, 3, 1)), dev)  # NHWC
    y = jax.device_put(jnp.asarray(yn), dev)
    out: dict[str, Runner] = {}
    for impl, bn in (("native", nn.BatchNorm), ("multibn", MultibnBatchNorm)):
        if impl not in impls:
            continue
        model = LeNet(bn)
        variables = model.init(jax.random.PRNGKey(0), x)

        def loss_fn(params: Any, stats: Any, model: Any = model) -> tuple[Any, Any]:
            logits, upd = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), upd["batch_stats"]

        @jax.jit
        def train_step(params: Any, stats: Any, loss_fn: Any = loss_fn) -> tuple[Any, Any]:
            grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats)
            return jax.tree.map(lambda p, g: p - LENET_LR * g, params, grads), stats

        box = [variables["params"], variables["batch_stats"]]

        def step(box: list = box, train_step: Any = train_step) -> None:
            box[:] = train_step(*box)
            jax.block_until_ready(box)

        out[impl] = step
    return out


#: backend -> the training-step runners of the asked-for implementations ("multibn", "native") at a batch size
MODEL_IMPLS: dict[str, Callable[[int, Sequence[str], str], dict[str, Runner]]] = {
    "torch": torch_lenet, "mxnet": gluon_lenet, "jax": flax_lenet,
}
