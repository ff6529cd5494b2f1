"""``multibn train --plot``: the figure's title fits, epoch ticks are whole numbers, the legend covers no curve."""

from __future__ import annotations

import numpy as np
import pytest

from multibn.cli.train.tasks import TASKS
from tests.helpers import need

pytestmark = pytest.mark.commands  # the commands run once, in the full environment (tests/conftest.py)

need("matplotlib", why="--plot needs matplotlib")


def _runs(task, epochs, seeds):
    rng = np.random.default_rng(0)
    runs = []
    for backend in ("torch", "jax", "mxnet", "numpy"):
        for variant in task.variants:
            for seed in seeds:
                runs.append({"backend": backend, "variant": variant, "seed": seed, "epochs": [
                    {"epoch": e + 1, "train_loss": float(rng.uniform(1, 50)), "test_loss": float(rng.uniform(1, 50)),
                     "test_acc": float(rng.uniform(0, 1)) if task.loss == "xent" else None} for e in range(epochs)]})
    return runs


@pytest.mark.parametrize(("task", "epochs", "seeds", "data"), [
    ("mlp-regression", 2, (0, 1, 2), "y = x^2 + N(0, 1), x ~ U[-5, 5] (subset 256/128)"),
    ("placement", 2, (0,), "y = sin(u) + v^2/2 + noise on 8 inputs (subset 256/128)"),
    ("lenet", 3, (0,), "scikit-learn digits, 8x8 resized to 28x28 (subset 256/128)"),
])
def test_plot_layout(task, epochs, seeds, data, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from multibn.cli.train.plot import write_plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    path = tmp_path / "p.png"
    write_plot(str(path), TASKS[task], data, _runs(TASKS[task], epochs, seeds), 1.23e-5)
    assert path.stat().st_size > 0
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    title = fig._suptitle.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= width and title.y1 <= height, "the title is clipped"
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_legend() is None  # no legend inside a panel
        box = ax.get_window_extent(renderer)
        for legend in fig.legends:
            assert not legend.get_window_extent(renderer).overlaps(box), "the legend covers a panel"
    assert fig.legends and len(fig.legends[0].get_texts()) == 4 * len(TASKS[task].variants)
    for legend in fig.legends:
        lb = legend.get_window_extent(renderer)
        assert lb.x0 >= 0 and lb.y0 >= 0 and lb.x1 <= width
