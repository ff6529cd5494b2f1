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


class RenormState(NamedTuple):
    """:class:`BNState` and what batch renormalisation tracks besides, per channel: the running standard deviation
    (``running_var`` is derived from it, ``max(running_std^2 - eps, 0)``, as in Keras), and the moving
    ``renorm_mean`` and ``renorm_std`` that the corrections ``r`` and ``d`` compare the batch with.
    ``running_mean``/``running_var`` stay the inference statistics, as in a :class:`BNState`."""

    running_mean: Any
    running_var: Any
    num_batches_tracked: Any
    running_std: Any
    renorm_mean: Any
    renorm_std: Any
