"""Variable shapes: one op per backend and mode (none per shape, momentum or convention), bounded caches, and
torch.compile(dynamic=True) / torch.export with dynamic dimensions as for native BN."""

from __future__ import annotations

import copy
import gc
import warnings

import numpy as np
import pytest

import multibn
from multibn import plan
from tests.helpers import need

torch = need("torch")
pytestmark = pytest.mark.torch  # torch's machinery (compile, export, the layer): the full environment runs it


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ops_are_made_per_mode_not_per_shape_or_momentum(backend: str) -> None:
    rng = np.random.default_rng(0)
    state = multibn.init_state(3, backend=backend)
    multibn.batch_norm(rng.standard_normal((4, 3, 5)).astype("float32"), state=state, backend=backend)
    before, plans_before = len(plan._OPS), len(plan._PLANS)
    for i in range(60):
        x = rng.standard_normal((2 + i % 7, 3, 1 + i)).astype("float32")
        if backend == "torch":
            x = torch.from_numpy(x)
        _, state = multibn.batch_norm(x, None, None, state, momentum=0.05 + i / 100, backend=backend)
        multibn.batch_norm(x, None, None, state, training=False, backend=backend)
    assert len(plan._OPS) - before <= 1  # the eval op, made once; the train op existed already
    assert len(plan._PLANS) - plans_before <= 61  # one per momentum value (bounded), none per length


def test_caches_are_bounded() -> None:
    assert plan._OPS.bound <= 256
    x = np.ones((2, 3), "float32")
    for i in range(plan._MAX_PLANS + 10):
        multibn.batch_norm(x, momentum=1.0 / (i + 2), state=multibn.init_state(3))
    assert len(plan._PLANS) <= plan._MAX_PLANS


def _loop(layer: torch.nn.Module, lengths: range, steps: int) -> None:
    for L in lengths:
        layer(torch.randn(4, 8, L))
    for i in range(steps):
        layer.momentum = 0.01 + (i % 1000) / 2000
        layer(torch.randn(4, 8, 16))


def test_memory_of_variable_lengths_and_a_momentum_schedule_stays_flat() -> None:
    """1500 sequence lengths, then 1000 steps of a momentum schedule: RSS grows no more than with native BN plus a
    few MiB (an op made per shape and momentum grew it by about 16 KiB a call: some 40 MiB here)."""
    from multibn.layers.torch import BatchNorm

    growth = {}
    for name, layer in (("native", torch.nn.BatchNorm1d(8)), ("multibn", BatchNorm(8, 3))):
        _loop(layer, range(2, 40), 50)  # warm up allocator and caches
        gc.collect()
        start = _rss_mib()
        _loop(layer, range(40, 1540), 1000)
        gc.collect()
        growth[name] = _rss_mib() - start
    assert growth["multibn"] <= growth["native"] + 8, growth


def test_compile_dynamic_fullgraph_compiles_no_more_than_native() -> None:
    from multibn.layers.torch import BatchNorm

    def compiles(bn: torch.nn.Module) -> tuple[int, list]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3, padding=1), bn)
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        outs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n, length in zip(range(3, 25, 2), range(8, 30, 2), strict=True):
                x = torch.randn(n, 4, length)
                y = compiled(x)
                y.square().sum().backward()
                torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
                outs.append(y.detach())
        ours = [str(w.message) for w in caught if "lru_cache" in str(w.message) or "multibn" in w.filename]
        assert not ours, ours  # no warnings from multibn's caches under dynamo
        torch.testing.assert_close(model[1].running_var, eager[1].running_var)
        return torch._dynamo.utils.counters["stats"]["unique_graphs"], outs

    native, _ = compiles(torch.nn.BatchNorm1d(6))
    ours, _ = compiles(BatchNorm(6, 3))
    assert ours <= max(native, 2), (ours, native)


@pytest.mark.parametrize("training", [False, True])
def test_export_with_dynamic_batch_and_length_equals_eager(training: bool) -> None:
    from torch.export import Dim, export

    from multibn.layers.torch import BatchNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3, padding=1), BatchNorm(6, 3)).train(training)
    ep = export(copy.deepcopy(model), (torch.randn(5, 4, 10),),
                dynamic_shapes=({0: Dim("batch", min=2), 2: Dim("length", min=2)},))
    for shape in ((7, 4, 13), (3, 4, 31)):
        x = torch.randn(shape)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)
