"""Shared fixtures: one parametrised ``backend`` over all four adapters, hypothesis profiles, --slow."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Import torch before MXNet: importing MXNet drops torch's thread count (the adapter restores it only for a
# torch already imported).
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

import multibn
from multibn.backends import ADAPTERS, get_backend

settings.register_profile(
    "default", max_examples=25, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run tests marked slow and many more hypothesis examples")


def pytest_configure(config: pytest.Config) -> None:
    slow = config.getoption("--slow") or os.environ.get("MULTIBN_SLOW") == "1"
    settings.load_profile("slow" if slow else os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or os.environ.get("MULTIBN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _why_missing(name: str) -> str | None:
    try:
        get_backend(name)
    except ImportError as e:
        return f"the {name} backend is not installed in this environment ({e.__cause__ or e})"
    return None


ALL_BACKENDS = tuple(ADAPTERS)


def require(*backends: str) -> None:
    """Skip the test, with the reason, unless every named backend imports here."""
    for name in backends:
        why = _why_missing(name)
        if why:
            pytest.skip(why)


@contextlib.contextmanager
def jax_float64(backend: str, dtype: str = "float64") -> Iterator[None]:
    """JAX keeps float64 only with x64 on: turn it on for the duration (thread-local, undone on exit)."""
    if backend != "jax" or dtype != "float64":
        yield
        return
    import jax

    if hasattr(jax, "enable_x64"):
        ctx = jax.enable_x64(True)
    else:  # jax < 0.8
        from jax.experimental import enable_x64

        ctx = enable_x64()
    with ctx:
        yield


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend name; skipped (with the reason) where its framework does not import."""
    why = _why_missing(request.param)
    if why:
        pytest.skip(why)
    return request.param


def arr(backend: str, a: object, dtype: str | None = "float32") -> object:
    """``a`` as an array of ``backend`` in ``dtype`` (via NumPy)."""
    return get_backend(backend).asarray(np.asarray(a, dtype=dtype))


def to_numpy(a: object) -> np.ndarray:
    """Any backend's array as a NumPy array (bfloat16 widened to float32)."""
    if isinstance(a, (int, float, np.ndarray, np.generic)):
        return np.asarray(a)
    from multibn.backends import backend_name_of

    return get_backend(backend_name_of(a)).to_numpy(a)


__all__ = ["ALL_BACKENDS", "arr", "backend", "jax_float64", "multibn", "require", "to_numpy"]
