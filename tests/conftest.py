"""Hooks and fixtures: one parametrised ``backend`` over all four adapters, hypothesis profiles, --slow, and what
the current environment runs. The helpers tests import are in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

# XLA reads its flags once, when JAX starts, so they are set before any test imports JAX (and the subprocesses the
# tests start inherit them): JAX on the CPU as 4 host devices, for the collectives tests (sync, shard_map, device
# placement) to run in this process; and the suite's programs compiled without LLVM's optimisations (XLA's own
# passes, fusion included, still run): the tests' programs are tiny and compiling them was most of the JAX tests'
# time (the current environment's suite 140 s -> 105 s). tests/cli/test_check.py runs `multibn check --quick` at
# the default optimisation (tests/helpers.py:default_xla_env), so that the optimised build is checked too.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"),
                                                     "--xla_force_host_platform_device_count=4")))
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# Import torch before MXNet: importing MXNet drops torch's thread count (the adapter restores it only for a
# torch already imported).
if importlib.util.find_spec("torch") is not None:
    import torch

from tests.helpers import ALL_BACKENDS, SAME_IN_CURRENT, _why_missing, left_to_full, missing

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


def same_in_current(item: pytest.Item) -> bool:
    """Whether ``item`` exercises only what the current environment shares with the full one: a test of the torch
    or mxnet backend (by its ``backend`` or ``fw`` parameter), one marked ``torch``/``mxnet`` (a test of that
    framework's layer or machinery), or one marked ``commands`` (the command-line tool). The library's NumPy- and
    JAX-dependent tests, and the framework-free ones, run in both."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(left_to_full(str(callspec.params.get(name))) for name in ("backend", "fw")):
        return True
    return any(item.get_closest_marker(name) is not None and left_to_full(name) for name in SAME_IN_CURRENT)


#: The test files that take longest (measured with --durations=0 in each environment: from about 80 s down to 15 s),
#: longest first: ``make test`` runs pytest-xdist with ``--dist loadfile --no-loadscope-reorder``, which hands the
#: files to its workers in collection order (by default it would hand out the files with the most tests first,
#: leaving a long file of few tests to the end, where one worker runs it alone), so that the workers finish together.
LONGEST_FIRST = ("tests/cli/test_train.py", "tests/cli/test_bench.py", "tests/core/test_autodiff.py",
                 "tests/conformance/test_conformance.py", "tests/core/test_variants.py",
                 "tests/layers/test_recompute.py", "tests/cli/test_check.py", "tests/layers/test_flax.py",
                 "tests/core/test_gradients.py", "tests/layers/test_torch.py", "tests/backends/test_sync.py",
                 "tests/backends/test_sync_faults.py", "tests/conformance/test_native.py", "tests/core/test_vectors.py",
                 "tests/backends/test_mxnet_memory.py", "tests/core/test_shapes.py", "tests/core/test_properties.py")


def _longest_first(item: pytest.Item) -> int:
    path = item.nodeid.split("::")[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The current environment pins the same torch as the full one and has no MXNet: what only those run is tested
    # once, in the full environment (deselected here, counted in the summary; MULTIBN_ALL_IN_CURRENT=1 keeps them).
    deselected = [item for item in items if same_in_current(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not same_in_current(item)]
    items.sort(key=_longest_first)  # stable: the rest keep their order
    no_gpu = pytest.mark.skip(reason="gpu: needs a CUDA GPU, none here")
    if any("gpu" in item.keywords for item in items) and not _cuda():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(no_gpu)
    if config.getoption("--slow") or os.environ.get("MULTIBN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _cuda() -> bool:
    return importlib.util.find_spec("torch") is not None and torch.cuda.is_available()


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend name; skipped (with the reason) where its framework does not import."""
    why = _why_missing(request.param)
    if why:
        missing(request.param, why)
    return request.param
