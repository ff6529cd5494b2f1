"""``--plot``: loss and accuracy (or test MSE) per epoch, one line per backend and network (mean over seeds)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .tasks import Task

_STYLES = ("-", "--", ":", "-.")
_COLORS = {"torch": "tab:red", "jax": "tab:blue", "mxnet": "tab:green", "numpy": "tab:gray"}
_LABELS = {"bn": "BN", "no-bn": "no BN", "before": "BN before ReLU", "after": "BN after ReLU", "none": "no BN",
           "renorm": "batch renorm", "ghost": "ghost BN"}


def _plain(base: type) -> type:
    """A log-axis formatter that labels the ticks ``base`` labels, as plain numbers (0.3, 60) not 3e-01, 6x10^1."""

    class Plain(base):  # type: ignore[misc, valid-type]
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain


def write_plot(path: str, task: Task, data_name: str, runs: list[dict[str, Any]],
               max_divergence: float | None = None, variant: str = "bn", batch_size: int | None = None) -> None:
    """A PNG at ``path`` (needs matplotlib: ``pip install 'multibn[train]'``); the title names ``--variant`` (when
    not ``bn``) and the batch size (when given)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'multibn[train]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, MaxNLocator

    classify = task.loss == "xent"
    name = "loss" if classify else "MSE"
    panels = [("train_loss", f"training {name}"), ("test_loss", f"test {name}")]
    if classify:
        panels.append(("test_acc", "test accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8))
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))  # in the order trained: task.variants or --variant's
    # The backends' curves coincide: draw each one narrower than the one before, so that all stay visible.
    widths = {b: 1.2 + 2.0 * (len(backends) - 1 - i) for i, b in enumerate(backends)}
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for backend in backends:
            for j, variant in enumerate(variants):
                group = [r for r in runs if r["backend"] == backend and r["variant"] == variant]
                if not group:
                    continue
                n = min(len(r["epochs"]) for r in group)
                curve = np.mean([[e[metric] for e in r["epochs"][:n]] for r in group], axis=0)
                ax.plot(range(1, n + 1), curve, _STYLES[j % len(_STYLES)], color=_COLORS.get(backend),
                        linewidth=widths[backend], alpha=0.85, label=f"{backend}, {_LABELS.get(variant, variant)}")
                recomputed = f"{metric}_recomputed"  # the same network evaluated with recomputed BN statistics
                if metric != "train_loss" and group[0]["epochs"][0].get(recomputed) is not None:
                    curve = np.mean([[e[recomputed] for e in r["epochs"][:n]] for r in group], axis=0)
                    ax.plot(range(1, n + 1), curve, linestyle=(0, (1, 1)), marker="o", markersize=2 + widths[backend],
                            color=_COLORS.get(backend), linewidth=widths[backend], alpha=0.85,
                            label=f"{backend}, {_LABELS.get(variant, variant)}, recomputed statistics")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, also in short runs
        ax.set_ylabel(label)
        if metric != "test_acc":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain(LogFormatter)(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(_plain(LogFormatter)(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(True, alpha=0.3)
    seeds = sorted({r["seed"] for r in runs})
    seed_note = f"mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    note = "" if max_divergence is None else f"; largest difference between backends {max_divergence:.2g}"
    # Two short lines, so that no width of figure clips them; the legend below the panels, off the curves.
    command = f"multibn train --task {task.name}" + ("" if variant == "bn" else f" --variant {variant}")
    batch = "" if batch_size is None else f"; batch {batch_size}"
    fig.suptitle(f"{command}: {data_name}\n{seed_note}{batch}{note}", fontsize=10)
    handles, labels = axes[-1].get_legend_handles_labels()  # a test panel: it has the recomputed curves too
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    rows = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
