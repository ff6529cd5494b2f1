"""Exact population statistics for a trained model ("precise BN"): the framework-free driver of the three
``recompute_statistics`` (:mod:`multibn.layers.torch`, :mod:`multibn.layers.gluon`, :mod:`multibn.layers.flax`).

Running averages lag the weights: they mix statistics of inputs that earlier versions of the network produced.
After training, ``recompute_statistics`` runs the model in training mode over ``batches`` and sets every
batch-norm layer's running mean and variance to the mean and variance of *all* the inputs that layer saw (its
training-mode input, as in Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), each layer's per-batch
summary ``(n, mean, M2)`` merged exactly by :class:`multibn.ChannelMoments` (Chan et al.'s count-weighted
merge, :func:`multibn.algorithm.merge_stats`). The stored variance is that of the data, ``M2 / (N - 1)`` with
the total count ``N`` where the layer's convention keeps the unbiased estimate (PyTorch's), ``M2 / N``
otherwise, whatever the batch sizes (:func:`stored_variance`). ``torch.optim.swa_utils.update_bn`` and fvcore's
``update_bn_stats`` instead average the per-batch variances with equal weights, which is not the variance of
the data when the batch means differ (always), and weighs small batches like large ones.

Only the running mean and variance change: weights, every other buffer (``num_batches_tracked`` included: it
keeps its value) and each module's train/eval mode are as before; a call that fails changes nothing.
Memory: O(channels) per layer, whatever the number of batches.

Here: the batches (:func:`run`: the inputs, ``num_batches``, the progress bar), the stored variance and the
warnings. Each framework's module finds its BN layers, captures their inputs and writes the results.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TextIO

from ..algorithm import Stats
from ..backends.base import Array
from ..progress import progress_bar

__all__ = ["run", "stored_variance", "warn_no_layers", "warn_unreached"]

#: the progress bar's label and the name in warnings
LABEL = "recompute_statistics"


def check_num_batches(num_batches: int | None) -> None:
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be None or a positive int, got {num_batches!r}")


def _inputs(batches: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    """The model inputs: each batch, or its first element when it is a tuple or list (``(x, y)`` pairs)."""
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of inputs (or of (input, ...) tuples), got "
                        f"{type(batches).__name__}")
    for i, batch in enumerate(islice(batches, num_batches)):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"batches: batch {i} is an empty {type(batch).__name__}; expected an input or "
                                 "a tuple/list whose first element is the input")
            batch = batch[0]
        yield batch


def _total(batches: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, num_batches)


def run(batches: Iterable[Any], num_batches: int | None, progress: bool | TextIO, step: Callable[[Any], None]
        ) -> int:
    """``step(x)`` for every input, with the progress bar (:func:`multibn.progress.progress_bar`: on stderr when it
    is a terminal for ``progress=True``, on a given text stream, none for False); the number of batches
    (ValueError if none)."""
    check_num_batches(num_batches)
    bar = progress_bar(progress, _total(batches, num_batches), LABEL, unit="batch")
    n = 0
    try:
        for x in _inputs(batches, num_batches):
            step(x)
            n += 1
            bar.update(1)
    finally:
        bar.refresh()  # the final count, however soon after the last redraw it comes
        bar.close()
    if n == 0:
        raise ValueError("batches yielded no batch: nothing to compute the statistics from")
    return n


def stored_variance(st: Stats, unbiased: bool) -> Array:
    """The running variance a layer stores for the summary ``st`` of all its inputs (``st.count > 0``):
    ``M2 / (N - 1)`` where it keeps the unbiased estimate (and ``N > 1``), ``M2 / N`` otherwise."""
    return st.m2 / (st.count - 1 if unbiased and st.count > 1 else st.count)


def warn_no_layers(what: str) -> None:
    warnings.warn(f"{LABEL}: {what}", stacklevel=3)


def warn_unreached(names: list[str]) -> None:
    if names:
        warnings.warn(f"{LABEL}: no input reached the batch-norm layer(s) {', '.join(names)}; "
                      "their running statistics are unchanged", stacklevel=3)
