"""The three experiments: network, data, training rule and defaults of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .data import Dataset, load_digits28, load_fashion_mnist, placement_regression, square_regression
from .models import GHOST_BATCH, Layer, Model, d2l_convention, lenet, placement_mlp, tanh_mlp


@dataclass(frozen=True)
class Task:
    """One experiment. ``variants`` are the networks compared (``"bn"``/``"no-bn"``, or BN placements); the first
    ones have BN. ``bn_momentum`` is the BN momentum on the old value (the d2l convention's 0.9 when None)."""

    name: str
    title: str
    variants: tuple[str, ...]
    no_bn_variant: str
    build: Callable[[str], tuple[Layer, ...]]
    loss: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    seeds: tuple[int, ...]
    bn_momentum: float | None
    quick: tuple[int, int, int]  # (training examples, test examples, epochs) of --quick
    dtype: str = "float32"  # float64 for mlp-regression (see TASKS)
    #: the batch size on the shipped default data, where it differs from the textbook's: the 1438 training digits
    #: make 6 batches of 256 per epoch, too few steps for 10 epochs
    shipped_batch_size: int | None = None
    #: ``--variant`` -> its default batch size: the BN variants this task's network can compare with plain BN
    bn_variants: tuple[tuple[str, int], ...] = ()

    def default_batch_size(self, data_dir: str | None, variant: str = "bn") -> int:
        if variant != "bn":
            return dict(self.bn_variants)[variant]
        return self.batch_size if data_dir or self.shipped_batch_size is None else self.shipped_batch_size

    def compared(self, variant: str = "bn", no_bn: bool = False) -> tuple[str, ...]:
        """The networks trained: ``variants`` for ``--variant bn``, else plain BN and the variant (ValueError if
        this task has no such variant); only the network without BN for ``no_bn``."""
        if variant != "bn" and variant not in dict(self.bn_variants):
            have = ", ".join(v for v, _ in self.bn_variants) or "none"
            raise ValueError(f"--variant {variant}: task {self.name} has BN variants: {have} (lenet has renorm, ghost)")
        if no_bn:
            if variant != "bn":
                raise ValueError(f"--no-bn trains no BN network: it cannot compare --variant {variant}")
            return (self.no_bn_variant,)
        return self.variants if variant == "bn" else (self.variants[0], variant)

    def batch_multiple(self, variants: tuple[str, ...]) -> int:
        """Every training batch is a multiple of this many samples: ghost BN's sub-batch size when one of
        ``variants`` is ``"ghost"`` (then for every network, so that all see the same batches), else 1."""
        return GHOST_BATCH if "ghost" in variants else 1

    def model(self, variant: str, lr: float | None = None, dtype: str | None = None,
              optimizer: str | None = None) -> Model:
        """The network ``variant`` with its training rule; ``lr``, ``dtype``, ``optimizer`` override the task's
        (another optimizer than the task's without ``lr`` takes its textbook rate: SGD 1.0, Adam 1e-3)."""
        if optimizer is not None and optimizer != self.optimizer:
            lr = lr if lr is not None else {"sgd": 1.0, "adam": 1e-3}[optimizer]
        return Model(self.build(variant), self.loss, optimizer or self.optimizer, self.lr if lr is None else lr,
                     d2l_convention(self.bn_momentum), dtype or self.dtype)

    def data(self, seed: int, data_dir: str | None = None) -> Dataset:
        if self.name == "lenet":
            return load_fashion_mnist(data_dir) if data_dir else load_digits28()
        if data_dir:
            raise ValueError(f"--data is for --task lenet (Fashion-MNIST); {self.name} trains on synthetic data")
        return square_regression(seed) if self.name == "mlp-regression" else placement_regression(seed)

    def uses_seed_for_data(self) -> bool:
        return self.name != "lenet"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "lenet",
            "LeNet (sigmoid, average pooling) with BN after every conv and hidden dense layer; cross-entropy",
            ("bn", "no-bn"), "no-bn", lenet, "xent", "adam", 1e-3, 256, 10, (0,), None,
            (512, 256, 2), shipped_batch_size=32, bn_variants=(("renorm", 4), ("ghost", 32)),
        ),
        Task(
            "mlp-regression",
            "deep tanh MLP 1-10-10-10-10-1 with BN (momentum 0.5 on the old value) before every tanh, "
            "y = x^2 + N(0,1); MSE",
            ("bn", "no-bn"), "no-bn", lambda v: tanh_mlp(v == "bn"), "mse", "adam", 0.02, 64, 10, (0, 1, 2), 0.5,
            (256, 100, 2), "float64",
        ),
        Task(
            "placement",
            "ReLU MLP 8-32-32-1 with BN before the ReLU, after it, or none; synthetic regression; MSE",
            ("before", "after", "none"), "none", placement_mlp, "mse", "adam", 0.01, 64, 10, (0,), None,
            (256, 128, 2),
        ),
    )
}
