"""The three networks as framework-free layer lists, and their initial weights, generated once in NumPy.

A network is a tuple of :class:`Layer`. Every backend builds the same network from this list with its own
convolution, dense and activation layers and multibn's batch-norm layer, and loads the same weights: conv
``(out, in, k, k)``, dense ``(out, in)`` (the PyTorch and Gluon layouts), BN ``gamma``/``beta`` ones/zeros.
A BN layer may be one of the variants: batch renormalisation (``renorm``) or ghost batch norm
(``virtual_batch_size``), passed under Keras's names to every framework's layer (:func:`layer_variant_kwargs`) and
to :func:`multibn.batch_norm` on NumPy (:func:`functional_variant_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np

from multibn.conventions import Convention, resolve_convention

#: batch renormalisation's clipping: the end values of the schedule of Ioffe (2017), section 4
#: (``r`` in [1/rmax, rmax], ``|d| <= dmax``); Keras's default clips nothing, which at batch 4 lets r reach ~10
RENORM_CLIPPING: dict[str, float] = {"rmin": 1.0 / 3.0, "rmax": 3.0, "dmax": 5.0}
#: the momentum (on the old value) of the averages ``renorm_mean``/``renorm_std`` that r and d compare with (Keras's)
RENORM_MOMENTUM = 0.99
#: ghost batch norm's sub-batch size (Hoffer et al., 2017)
GHOST_BATCH = 4

#: the BN networks a task can compare with plain BN (``--variant``), as in :func:`lenet`
BN_VARIANTS = ("renorm", "ghost")


@dataclass(frozen=True)
class Layer:
    """``kind`` is ``conv`` (``n_in -> n_out`` channels, ``k`` x ``k``, stride 1, no padding), ``dense``,
    ``bn`` (``n_out`` channels on input of rank ``ndim``), ``act`` (``fn``: sigmoid, tanh, relu), ``pool``
    (2x2 average, stride 2) or ``flatten``.

    A conv or dense layer that feeds a BN layer has no bias (``bias=False``): BN subtracts the mean, so such a
    bias changes nothing; its gradient, zero but for rounding, would make Adam take steps of random sign that
    differ between backends. BN's beta takes its place."""

    kind: str
    name: str = ""
    n_in: int = 0
    n_out: int = 0
    k: int = 0
    ndim: int = 2
    fn: str = ""
    bias: bool = True
    renorm: bool = False  # bn: batch renormalisation, RENORM_CLIPPING and RENORM_MOMENTUM
    virtual_batch_size: int | None = None  # bn: ghost batch norm over sub-batches of this many samples


def layer_variant_kwargs(layer: Layer) -> dict[str, object]:
    """The BN layer's variant as the layers' keyword arguments (Keras's names); ``{}`` for plain BN."""
    out: dict[str, object] = {}
    if layer.renorm:
        out |= {"renorm": True, "renorm_clipping": dict(RENORM_CLIPPING), "renorm_momentum": RENORM_MOMENTUM}
    if layer.virtual_batch_size:
        out["virtual_batch_size"] = layer.virtual_batch_size
    return out


def functional_variant_kwargs(layer: Layer) -> dict[str, object]:
    """The BN layer's variant as :func:`multibn.batch_norm`'s (training) keyword arguments; ``{}`` for plain BN."""
    out: dict[str, object] = {}
    if layer.renorm:
        out |= {"renorm": dict(RENORM_CLIPPING), "renorm_momentum": RENORM_MOMENTUM}
    if layer.virtual_batch_size:
        out["virtual_batch_size"] = layer.virtual_batch_size
    return out


def lenet(variant: str) -> tuple[Layer, ...]:
    """The textbook LeNet (sigmoid, average pooling) with BN after every conv and hidden dense layer: ``variant``
    ``"bn"``, ``"no-bn"`` (none), ``"renorm"`` (batch renormalisation) or ``"ghost"`` (ghost BN, sub-batches of
    :data:`GHOST_BATCH`)."""
    if variant not in ("bn", "no-bn", *BN_VARIANTS):
        raise ValueError(f"variant must be one of bn, no-bn, {', '.join(BN_VARIANTS)}; got {variant!r}")
    kind = {"renorm": {"renorm": True}, "ghost": {"virtual_batch_size": GHOST_BATCH}}.get(variant, {})

    def block(layer: Layer, ndim: int) -> list[Layer]:
        if variant == "no-bn":
            return [layer, Layer("act", fn="sigmoid")]
        bn = Layer("bn", f"bn{layer.name[-1]}", n_out=layer.n_out, ndim=ndim, **kind)  # type: ignore[arg-type]
        return [replace(layer, bias=False), bn, Layer("act", fn="sigmoid")]

    return (
        *block(Layer("conv", "conv1", 1, 6, k=5), 4), Layer("pool"),
        *block(Layer("conv", "conv2", 6, 16, k=5), 4), Layer("pool"), Layer("flatten"),
        *block(Layer("dense", "dense3", 16 * 4 * 4, 120), 2),
        *block(Layer("dense", "dense4", 120, 84), 2),
        Layer("dense", "dense5", 84, 10),
    )


def tanh_mlp(bn: bool) -> tuple[Layer, ...]:
    """The textbook's deep tanh MLP 1 -> 10 -> 10 -> 10 -> 10 -> 1, BN before every tanh."""
    layers: list[Layer] = []
    widths = (1, 10, 10, 10, 10)
    for i, (a, b) in enumerate(pairwise(widths), start=1):
        layers.append(Layer("dense", f"dense{i}", a, b, bias=not bn))
        if bn:
            layers.append(Layer("bn", f"bn{i}", n_out=b, ndim=2))
        layers.append(Layer("act", fn="tanh"))
    layers.append(Layer("dense", f"dense{len(widths)}", widths[-1], 1))
    return tuple(layers)


PLACEMENTS = ("none", "before", "after")


def placement_mlp(placement: str, features: int = 8, width: int = 32) -> tuple[Layer, ...]:
    """A ReLU MLP ``features -> width -> width -> 1`` with BN before the ReLU, after it, or none."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    layers: list[Layer] = []
    for i, (a, b) in enumerate(((features, width), (width, width)), start=1):
        bn = [Layer("bn", f"bn{i}", n_out=b, ndim=2)]
        act = [Layer("act", fn="relu")]
        layers += [Layer("dense", f"dense{i}", a, b, bias=placement != "before"),
                   *(bn if placement == "before" else []), *act, *(bn if placement == "after" else [])]
    layers.append(Layer("dense", "dense3", width, 1))
    return tuple(layers)


def init_weights(layers: tuple[Layer, ...], seed: int) -> dict[str, np.ndarray]:
    """float32 weights: Glorot-uniform conv and dense kernels (Keras' and the textbook's default), zero biases,
    BN gamma 1 and beta 0. The kernels depend only on ``seed`` and the layer's name and shape, so the network
    with BN and the one without start from the same kernels."""
    weights: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.kind in ("conv", "dense"):
            rng = np.random.default_rng([seed, *layer.name.encode()])
            shape = (layer.n_out, layer.n_in, layer.k, layer.k) if layer.kind == "conv" else (layer.n_out, layer.n_in)
            receptive = layer.k * layer.k if layer.kind == "conv" else 1
            limit = np.sqrt(6.0 / ((layer.n_in + layer.n_out) * receptive))
            weights[f"{layer.name}.weight"] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
            if layer.bias:
                weights[f"{layer.name}.bias"] = np.zeros(layer.n_out, np.float32)
        elif layer.kind == "bn":
            weights[f"{layer.name}.gamma"] = np.ones(layer.n_out, np.float32)
            weights[f"{layer.name}.beta"] = np.zeros(layer.n_out, np.float32)
    return weights


@dataclass(frozen=True)
class Model:
    """A network with its training rule: ``loss`` is ``xent`` (softmax cross-entropy, mean over the batch) or
    ``mse``; ``optimizer`` ``sgd`` or ``adam`` (beta 0.9/0.999, eps 1e-8) with learning rate ``lr``; BN layers
    follow ``convention``; parameters, activations and data are ``dtype`` (float32 or float64)."""

    layers: tuple[Layer, ...]
    loss: str
    optimizer: str
    lr: float
    convention: Convention
    dtype: str = "float32"


def d2l_convention(momentum: float | None = None) -> Convention:
    """The textbook's BN rules: momentum on the old value (0.9 unless given), biased running variance, eps 1e-5."""
    return resolve_convention("d2l", momentum, None)
