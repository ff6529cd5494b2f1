"""The running statistics carried between training calls."""

from __future__ import annotations

from typing import Any, NamedTuple


class BNState(NamedTuple):
    """Running statistics of one BN layer, per channel. A NamedTuple, so JAX treats it as a pytree.

    ``num_batches_tracked`` is a 0-d integer array counting the training calls that had a state (the
    cumulative-average convention ``torch_cma`` weighs batch ``t`` by ``1/t``).
    """

    running_mean: Any
    running_var: Any
    num_batches_tracked: Any
