"""Training loop, divergence between backends, JSON."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import Dataset
from .models import init_weights
from .tasks import Task

#: ``*_recomputed``: in eval mode with every BN layer's statistics recomputed exactly over the training set
#: (``recompute_statistics``) instead of the running averages; None for a network without BN
METRICS = ("train_loss", "test_loss", "test_acc", "test_loss_recomputed", "test_acc_recomputed")

#: backend -> module with its ``Trainer``; NumPy last (slowest: its convolutions are tensordots)
TRAINERS = {"torch": "multibn.cli.train.nets_torch", "jax": "multibn.cli.train.nets_jax",
            "mxnet": "multibn.cli.train.nets_mxnet", "numpy": "multibn.cli.train.nets_numpy"}


def make_trainer(backend: str, task: Task, variant: str, seed: int, lr: float | None = None,
                 dtype: str | None = None, optimizer: str | None = None) -> Any:
    """The ``Trainer`` of ``backend`` for one network, holding the weights every backend starts from."""
    model = task.model(variant, lr, dtype, optimizer)
    return importlib.import_module(TRAINERS[backend]).Trainer(model, init_weights(model.layers, seed))


class Unsupported(Exception):
    """A backend's layer cannot build a network (a BN variant it does not take yet): the command skips the
    backend with this reason."""


def batch_order(n: int, batch_size: int, seed: int, epoch: int, multiple: int = 1) -> list[np.ndarray]:
    """The batches of one epoch: a permutation fixed by ``(seed, epoch)``, the same on every backend (and for every
    variant); a last batch of one example is dropped (its batch variance would be 0). With ``multiple`` (ghost BN's
    sub-batch size) the last batch is cut to a multiple of it, and dropped if that leaves fewer than 2 examples."""
    perm = np.random.default_rng([seed, 1, epoch]).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = [b[:len(b) - len(b) % multiple] for b in batches]
    return [b for b in batches if len(b) > 1]


def recompute_batches(x_train: np.ndarray, batch_size: int, seed: int, multiple: int = 1) -> list[np.ndarray]:
    """The training inputs in the batches over which the BN statistics are recomputed: the whole training set in
    batches of the training batch size, in a shuffled order fixed by ``seed`` (epoch 0 of :func:`batch_order`, which
    no training epoch uses), the same after every epoch and on every backend."""
    return [x_train[idx] for idx in batch_order(len(x_train), batch_size, seed, 0, multiple)]


def train_run(
    trainer: Any, data: Dataset, epochs: int, batch_size: int, seed: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None, on_batch: Callable[[int, int, int], None] | None = None,
    multiple: int = 1,
) -> list[dict[str, Any]]:
    """Train for ``epochs``; per epoch ``{"epoch", "train_loss", "test_loss", "test_acc", "test_loss_recomputed",
    "test_acc_recomputed", "seconds"}``, where ``train_loss`` is the mean training-mode loss over the epoch's batches
    and the test metrics are in eval mode, with the running averages and with recomputed statistics; every batch a
    multiple of ``multiple`` examples (:func:`batch_order`)."""
    out = []
    has_bn = any(layer.kind == "bn" for layer in trainer.model.layers)
    recompute_on = recompute_batches(data.x_train, batch_size, seed, multiple) if has_bn else []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        batches = batch_order(len(data.x_train), batch_size, seed, epoch, multiple)
        total, count = 0.0, 0
        for i, idx in enumerate(batches):
            loss = trainer.step(data.x_train[idx], data.y_train[idx])
            if not np.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} in epoch {epoch}, batch {i + 1}")
            total, count = total + loss * len(idx), count + len(idx)
            if on_batch is not None:
                on_batch(epoch, i + 1, len(batches))
        test_loss, test_acc = trainer.evaluate(data.x_test, data.y_test)
        rec_loss, rec_acc = (trainer.evaluate_recomputed(recompute_on, data.x_test, data.y_test) if has_bn
                             else (None, None))
        row = {"epoch": epoch, "train_loss": total / count, "test_loss": test_loss, "test_acc": test_acc,
               "test_loss_recomputed": rec_loss, "test_acc_recomputed": rec_acc,
               "seconds": time.perf_counter() - start}
        out.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return out


def divergence(runs: list[dict[str, Any]]) -> tuple[float, dict[str, Any] | None]:
    """The largest ``|a - b|`` of a per-epoch metric between two backends' runs of the same network, seed and
    epoch, with where it occurs (None with fewer than two backends)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["seed"]), []).append(r)
    worst, where = 0.0, None
    for (variant, seed), group in groups.items():
        for metric in METRICS:
            for e in range(min(len(r["epochs"]) for r in group)):
                vals = [(r["epochs"][e][metric], r["backend"]) for r in group if r["epochs"][e].get(metric) is not None]
                if len(vals) < 2:
                    continue
                (lo, b_lo), (hi, b_hi) = min(vals), max(vals)
                if where is None or hi - lo > worst:
                    worst = hi - lo
                    where = {"variant": variant, "seed": seed, "epoch": e + 1, "metric": metric,
                             "backends": [b_lo, b_hi], "values": [lo, hi]}
    return worst, where


def to_json(task: Task, data_name: str, runs: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: ``{"task", "runs": [{"backend", "bn", "variant", "seed", "epochs": [...]}],
    "max_divergence"}`` (plus ``data``, ``config``, ``divergence_at`` and, for ``placement``, each run's
    ``placement``); ``variant`` is the network: ``bn``, ``no-bn``, ``renorm``, ``ghost`` or a placement."""
    worst, where = divergence(runs)
    out_runs = []
    for r in runs:
        entry: dict[str, Any] = {"backend": r["backend"], "bn": r["variant"] != task.no_bn_variant,
                                 "variant": r["variant"], "seed": r["seed"]}
        if task.name == "placement":
            entry["placement"] = r["variant"]
        entry["epochs"] = [{k: e[k] for k in ("epoch", *METRICS, "seconds")} for e in r["epochs"]]
        out_runs.append(entry)
    return {"task": task.name, "data": data_name, "config": config, "runs": out_runs,
            "max_divergence": worst if where is not None else None, "divergence_at": where}
