"""The cheap path for repeated calls: a call whose signature was seen before skips the checks that signature proves
unnecessary. A later call with a bad input must still raise exactly what an uncached call raises, and a cached call
must compute what the framework's native batch norm computes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import multibn
from multibn import plan as api
from multibn.conventions import CONVENTIONS
from multibn.state import BNState
from tests.helpers import require

BACKENDS = ("numpy", "torch")
C = 3


def _arrays(backend: str) -> tuple[Callable[..., Any], Any]:
    """``(make, x)``: ``make(values, dtype)`` builds an array of ``backend``; ``x`` a (6, C, 2) float32 batch."""
    require(backend)
    if backend == "torch":
        import torch

        def make(v: Any, dtype: str = "float32") -> Any:
            return torch.as_tensor(np.asarray(v), dtype=getattr(torch, dtype))
    else:

        def make(v: Any, dtype: str = "float32") -> Any:
            return np.asarray(v, dtype=dtype)

    x = make(np.random.default_rng(0).standard_normal((6, C, 2)))
    return make, x


@pytest.fixture(autouse=True)
def _fresh_plans() -> Iterator[None]:
    api._PLANS.clear()
    yield
    api._PLANS.clear()


def _raised(call: Callable[[], Any]) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
        call()
    return info.type, str(info.value)


def _cold_and_warm(good: Callable[[], Any], bad: Callable[[], Any]) -> tuple[tuple[type, str], tuple[type, str]]:
    """The error of ``bad`` with no plan cached, and after ``good`` has cached its plan (twice: miss, then hit)."""
    api._PLANS.clear()
    cold = _raised(bad)
    good()
    good()
    assert api._PLANS, "the valid call left no plan: the cheap path is not exercised"
    return cold, _raised(bad)


def _bad_inputs(backend: str) -> dict[str, tuple[dict, dict]]:
    """name -> (valid keyword arguments, the same with one bad input); each pair shares everything else."""
    make, x = _arrays(backend)
    g, b = make(np.ones(C)), make(np.zeros(C))
    st = BNState(make(np.zeros(C)), make(np.ones(C)), make(0, "int64"))
    ok = {"x": x, "gamma": g, "beta": b, "state": st}
    other = make(np.ones((6, C + 1, 2)))
    return {
        "x channels": (ok, {**ok, "x": other}),
        "x rank": (ok, {**ok, "x": make(np.ones(6))}),
        "x dtype": (ok, {**ok, "x": make(np.ones((6, C, 2)), "int32")}),
        "gamma shape": (ok, {**ok, "gamma": make(np.ones(C + 1))}),
        "gamma dtype": (ok, {**ok, "gamma": make(np.ones(C), "int64")}),
        "beta None then bad": ({**ok, "beta": None}, {**ok, "beta": make(np.zeros((1, C)))}),
        "running_var shape": (ok, {**ok, "state": st._replace(running_var=make(np.ones(C + 2)))}),
        "running_mean dtype": (ok, {**ok, "state": st._replace(running_mean=make(np.zeros(C), "int32"))}),
        "float counter": (ok, {**ok, "state": st._replace(num_batches_tracked=make(0.0))}),
        "state of Nones": ({**ok, "state": None}, {**ok, "state": BNState(None, None, None)}),
        "state of two": (ok, {**ok, "state": (st.running_mean, st.running_var)}),
        "training not bool": (ok, {**ok, "training": 1}),
        "momentum True": ({**ok, "momentum": 1.0}, {**ok, "momentum": True}),
        "eps negative": ({**ok, "eps": 1e-5}, {**ok, "eps": -1e-5}),
        "axis bool": ({**ok, "axis": 1}, {**ok, "axis": True}),
        "axis out of range": ({**ok, "axis": 1}, {**ok, "axis": 3}),
        "eval without state": ({**ok, "training": False}, {**ok, "training": False, "state": None}),
        "string gamma": (ok, {**ok, "gamma": "abc"}),
        "convention": (ok, {**ok, "convention": "nope"}),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    "x channels", "x rank", "x dtype", "gamma shape", "gamma dtype", "beta None then bad", "running_var shape",
    "running_mean dtype", "float counter", "state of Nones", "state of two", "training not bool", "momentum True",
    "eps negative", "axis bool", "axis out of range", "eval without state", "string gamma", "convention",
])
def test_a_cached_call_raises_what_an_uncached_call_raises(backend: str, case: str) -> None:
    good, bad = _bad_inputs(backend)[case]
    cold, warm = _cold_and_warm(lambda: multibn.batch_norm(**good), lambda: multibn.batch_norm(**bad))
    assert warm == cold


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixing_frameworks_after_a_cached_call(backend: str) -> None:
    require("numpy", "torch")
    import torch

    make, x = _arrays(backend)
    foreign = np.ones(C, np.float32) if backend == "torch" else torch.ones(C)
    good = {"x": x, "gamma": make(np.ones(C))}
    cold, warm = _cold_and_warm(lambda: multibn.batch_norm(**good),
                                lambda: multibn.batch_norm(**{**good, "gamma": foreign}))
    assert warm == cold
    assert warm[0] is TypeError
    if backend == "torch":  # a backend named that is not x's
        cold, warm = _cold_and_warm(lambda: multibn.batch_norm(**good, backend="torch"),
                                    lambda: multibn.batch_norm(**good, backend="numpy"))
        assert warm == cold
    else:  # NumPy arrays with another backend named are converted, never taken for that backend's arrays
        y, _ = multibn.batch_norm(**good, backend="torch")
        assert isinstance(y, torch.Tensor)


@pytest.mark.torch
def test_device_change_after_a_cached_call() -> None:
    require("torch")
    import torch

    x = torch.randn(6, C, 2)
    good = {"x": x, "gamma": torch.ones(C), "beta": torch.zeros(C)}
    bad = {**good, "gamma": torch.ones(C, device="meta")}
    cold, warm = _cold_and_warm(lambda: multibn.batch_norm(**good), lambda: multibn.batch_norm(**bad))
    assert warm == cold


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_checks_after_a_cached_call(backend: str) -> None:
    make, x = _arrays(backend)
    mask = np.ones((6, C, 2), bool)
    good = {"x": x, "mask": make(mask, "bool")}
    one_left = mask.copy()
    one_left[:, 1] = False
    one_left[0, 1, 0] = True  # channel 1 keeps a single value: PyTorch's rules refuse it
    for bad in ({**good, "mask": make(one_left, "bool")},  # same signature as good: the count is re-read
                {**good, "mask": make(mask, "float32")}, {**good, "mask": make(mask[:, :2], "bool")}):
        cold, warm = _cold_and_warm(lambda: multibn.batch_norm(**good), lambda bad=bad: multibn.batch_norm(**bad))
        assert warm == cold


@pytest.mark.torch
def test_repeated_calls_match_native_torch() -> None:
    """Training steps with fresh state arrays every call (as the layer passes its buffers) and a convention object
    whose momentum differs from the preset's, against ``F.batch_norm``; then eval."""
    require("torch")
    import torch
    import torch.nn.functional as F

    conv = dataclasses.replace(CONVENTIONS["torch"], momentum=0.3)
    rm, rv = torch.zeros(C), torch.ones(C)
    g, b = torch.linspace(0.5, 2.0, C), torch.linspace(-1.0, 1.0, C)
    st = multibn.init_state(C, backend="torch")
    for i in range(4):
        x = torch.randn(6, C, 2) * (i + 1) + i
        want = F.batch_norm(x, rm, rv, g, b, True, 0.3, 1e-5)
        st = BNState(*(a.clone() for a in st))
        y, st = multibn.batch_norm(x, g, b, st, convention=conv)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(st.running_mean, rm)
        torch.testing.assert_close(st.running_var, rv)
        # the preset (momentum 0.1) must not reuse the plan of the momentum-0.3 object
        _, st01 = multibn.batch_norm(x, g, b, multibn.init_state(C, backend="torch"))
        torch.testing.assert_close(st01.running_mean, 0.1 * x.mean((0, 2)))
    assert int(st.num_batches_tracked) == 4
    x = torch.randn(6, C, 2)
    for _ in range(2):
        y, _ = multibn.batch_norm(x, g, b, st, training=False, convention=conv)
        torch.testing.assert_close(y, F.batch_norm(x, rm, rv, g, b, False, 0.3, 1e-5))


def test_repeated_calls_match_float64_on_numpy() -> None:
    """NumPy has no native BN: the float64 textbook formulas, over repeated calls with and without gamma."""
    rng = np.random.default_rng(1)
    st = multibn.init_state(C)
    rm, rv = np.zeros(C), np.ones(C)
    for _ in range(3):
        x = rng.standard_normal((6, C, 2)).astype(np.float32)
        x64 = x.astype(np.float64)
        mean, var = x64.mean((0, 2)), x64.var((0, 2))
        y, st = multibn.batch_norm(x, None, None, st)
        want = (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        rm, rv = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * 12 / 11
        np.testing.assert_allclose(st.running_mean, rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st.running_var, rv, rtol=1e-5, atol=1e-6)
