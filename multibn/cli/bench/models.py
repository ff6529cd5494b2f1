"""``multibn bench --model``: one training step of a whole model, with multibn's layers against the native BN.

LeNet as in the textbook's BN chapter: conv(6, 5x5) BN sigmoid avgpool(2), conv(16, 5x5) BN sigmoid avgpool(2),
dense(120) BN sigmoid, dense(84) BN sigmoid, dense(10); 28x28 single-channel input, softmax cross-entropy, SGD.

ResNet-18 for CIFAR (torch): conv(w, 3x3) BN ReLU, four stages of two BasicBlocks (conv 3x3, BN, ReLU, conv 3x3,
BN, + shortcut (conv 1x1 + BN where the shape changes), ReLU) of widths w, 2w, 4w, 8w (strides 1, 2, 2, 2),
global average pool, dense(10); w = 32, 3x32x32 input, 20 BN layers; SGD with momentum 0.9. The multibn net is
the native one passed through :func:`multibn.layers.torch.convert_batchnorm`. Variants: NCHW, channels_last
(``_cl`` in the case name) and, with ``--compiled``, both nets under ``torch.compile`` (NCHW, ``_compiled``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cases import Runner, Skip, installed
from .runners import import_mxnet

#: ``--model NAME``: one training step per batch size; rows have pass "train-step" and case
#: "<model>[_<variant>]_b<batch>"
MODELS = {"lenet": (256, 32), "resnet18": (32, 8)}
MODEL_BACKENDS = ("torch", "mxnet", "jax")
#: the passes of ``--model`` without ``--passes``: "train-step" (time), "step-mem" (peak memory of a step)
MODEL_PASSES = {"lenet": ("train-step",), "resnet18": ("train-step", "step-mem")}
LENET_LR = 0.1
RESNET_WIDTH = 32
RESNET_LR = 0.01


def model_variants(backend: str, model: str, compiled: bool) -> tuple[str, ...]:
    """The variants of ``model`` timed on ``backend`` ("" is the plain one)."""
    if backend == "torch" and model == "resnet18":
        return ("", "cl", *(("compiled",) if compiled else ()))
    return ("",)


def model_case(model: str, variant: str, batch: int) -> str:
    return f"{model}{'_' + variant if variant else ''}_b{batch}"


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
        out[impl] = _torch_step(net, torch.optim.SGD(net.parameters(), lr=LENET_LR), x, y)
    return out


def _torch_step(fwd: Any, opt: Any, x: Any, y: Any) -> Runner:
    """One SGD training step of ``fwd`` on ``(x, y)`` with cross-entropy (synchronised on CUDA)."""
    import torch

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fwd(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def torch_resnet18(batch: int, impls: Sequence[str], device: str, variant: str = "") -> dict[str, Runner]:
    """Training steps of the CIFAR ResNet-18 (module docstring) with ``nn.BatchNorm2d`` ("native") and with those
    layers converted to multibn's ("multibn"); ``variant`` "cl": channels_last, "compiled": ``torch.compile``."""
    import torch
    from torch import nn

    from multibn.layers.torch import convert_batchnorm

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(h)) + self.short(x))

    def resnet18(w: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))

    if variant not in ("", "cl", "compiled"):
        raise Skip(f"resnet18 has no variant {variant!r}")
    dev = "cuda" if device == "gpu" else "cpu"
    fmt = torch.channels_last if variant == "cl" else torch.contiguous_format
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)).to(dev, memory_format=fmt)
    y = torch.from_numpy(rng.integers(0, 10, batch)).to(dev)
    out: dict[str, Runner] = {}
    for impl in ("native", "multibn"):
        if impl not in impls:
            continue
        torch.manual_seed(0)
        net = resnet18(RESNET_WIDTH).to(dev, memory_format=fmt).train()
        if impl == "multibn":
            net = convert_batchnorm(net)
        opt = torch.optim.SGD(net.parameters(), lr=RESNET_LR, momentum=0.9)
        out[impl] = _torch_step(torch.compile(net) if variant == "compiled" else net, opt, x, y)
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


#: (model, backend) -> the training-step runners of the asked-for implementations ("multibn", "native") at a
#: batch size on a device, of a variant
MODEL_IMPLS: dict[tuple[str, str], Callable[..., dict[str, Runner]]] = {
    ("lenet", "torch"): torch_lenet, ("lenet", "mxnet"): gluon_lenet, ("lenet", "jax"): flax_lenet,
    ("resnet18", "torch"): torch_resnet18,
}


def model_runners(backend: str, model: str, batch: int, impls: Sequence[str], device: str,
                  variant: str = "") -> dict[str, Runner]:
    """The training-step runners of ``model`` on ``backend`` (:class:`Skip` where it has none)."""
    build = MODEL_IMPLS.get((model, backend))
    if build is None:
        raise Skip(f"{model} is timed on {', '.join(b for m, b in MODEL_IMPLS if m == model)} only")
    return build(batch, impls, device, variant) if variant else build(batch, impls, device)
