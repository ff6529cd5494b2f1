"""The one module of shared test helpers: backends, test dependencies, arrays, JAX float64, the repository root.

A missing test dependency skips a test only where the environment is documented not to have it, and fails it
everywhere else, so that a broken environment cannot pass by skipping. The Makefile names the environment in
``MULTIBN_TEST_ENV`` (``full`` or ``current``, one per ``requirements/<env>.txt``); without it (a developer's own
environment) a missing dependency skips, with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from multibn.backends import ADAPTERS, get_backend

ROOT = Path(__file__).resolve().parents[1]
ALL_BACKENDS = tuple(ADAPTERS)

#: The environment running the tests (set by the Makefile), or None for any other environment.
TEST_ENV = os.environ.get("MULTIBN_TEST_ENV") or None
#: What each environment lacks by design (see requirements/current.txt): MXNet 1.9 cannot import on NumPy 2, and
#: Flax, Keras and ONNX are test dependencies of the full environment only.
ABSENT_BY_DESIGN = {
    "full": frozenset(),
    "current": frozenset({"mxnet", "flax", "keras", "onnx", "onnxruntime", "onnxscript"}),
}
#: Backends (and markers) whose tests the current environment leaves to the full one: it pins the same torch and
#: has no MXNet; the commands (``commands``: multibn demo/check/bench/train/port) are the same Python over the
#: library, whose NumPy 2 and newer-JAX behaviour the library's own tests cover there
#: (``pytest_collection_modifyitems`` in conftest.py deselects them; see the Makefile's test-current;
#: MULTIBN_ALL_IN_CURRENT=1 keeps them).
SAME_IN_CURRENT = frozenset({"torch", "mxnet", "commands"})


def default_xla_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess that compiles JAX programs at XLA's default optimisation (the
    suite compiles them at level 0: tests/conftest.py), with ``extra``."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_backend_optimization_level"))
    return dict(os.environ, XLA_FLAGS=flags, **extra)


def left_to_full(backend: str) -> bool:
    """Whether this run leaves ``backend`` to the full environment: in the current one, torch (the same pin) and
    MXNet (absent), unless MULTIBN_ALL_IN_CURRENT=1."""
    return TEST_ENV == "current" and backend in SAME_IN_CURRENT and os.environ.get("MULTIBN_ALL_IN_CURRENT") != "1"


def missing(module: str, why: str) -> None:
    """``module`` does not import here: skip if this environment lacks it by design (or is unknown), else fail.
    ``module`` is the framework that is missing (a backend name is its framework's top-level module)."""
    top = module.split(".")[0]
    if TEST_ENV is None:
        pytest.skip(f"{why} (not run: {module} is not installed here)", allow_module_level=True)
    if TEST_ENV not in ABSENT_BY_DESIGN:
        pytest.fail(f"MULTIBN_TEST_ENV={TEST_ENV!r} is not one of {sorted(ABSENT_BY_DESIGN)}", pytrace=False)
    if top in ABSENT_BY_DESIGN[TEST_ENV]:
        pytest.skip(f"{why} ({top} is absent from the {TEST_ENV} environment by design)", allow_module_level=True)
    pytest.fail(f"test dependency {module} is missing from the {TEST_ENV} environment: {why} "
                f"(install requirements/{TEST_ENV}.txt)", pytrace=False)


def need(module: str, why: str = "a test dependency") -> ModuleType:
    """``pytest.importorskip`` under the rule above: the module, or a skip where its absence is by design."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # the module that is missing: ``module`` itself, or what it imports (multibn.backends.mxnet -> mxnet)
        cause = e if getattr(e, "name", None) else e.__cause__
        missing(getattr(cause, "name", None) or module, f"{why}: {e}")
        raise  # unreachable: missing() skips or fails


def need_installed(module: str, why: str = "a test dependency") -> None:
    """``need`` for a module the test runs in a subprocess and must not import here (Keras picks its backend at
    import, TensorFlow by default): installed, or the rule above."""
    if importlib.util.find_spec(module) is None:
        missing(module, f"{why}: {module} is not installed")


def has(module: str) -> bool:
    """Whether ``module`` imports (for a test that runs differently without it, not for one that needs it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _why_missing(name: str) -> str | None:
    """Why backend ``name`` does not import here, or None."""
    try:
        get_backend(name)
    except ImportError as e:
        return f"the {name} backend is not installed in this environment ({e.__cause__ or e})"
    return None


def installed(names: tuple[str, ...] = ALL_BACKENDS) -> tuple[str, ...]:
    """The backends among ``names`` that import here; a missing one this environment should have fails the run."""
    out = []
    for name in names:
        if _why_missing(name) is None:
            out.append(name)
        elif TEST_ENV is not None and name not in ABSENT_BY_DESIGN.get(TEST_ENV, ()):
            raise RuntimeError(f"the {name} backend is missing from the {TEST_ENV} environment: {_why_missing(name)}")
    return tuple(out)


def backends_tested_here(names: tuple[str, ...] = ALL_BACKENDS) -> tuple[str, ...]:
    """The installed backends among ``names`` that this run tests (all of them but where left_to_full says)."""
    return tuple(b for b in installed(names) if not left_to_full(b))


def only_tested_here(names: tuple[str, ...] = ALL_BACKENDS) -> list[str]:
    """A command's backend selection for this run: none (every installed one) unless this run leaves some to the
    full environment, then those it tests, comma-separated, as the one argument of ``--backends``/``--backend``."""
    here = backends_tested_here(names)
    return [] if here == installed(names) else [",".join(here)]


def require(*backends: str) -> None:
    """Skip the test, with the reason, unless every named backend imports here (fail where it should)."""
    for name in backends:
        why = _why_missing(name)
        if why:
            missing(name, why)


def mxnet_module() -> ModuleType:
    """MXNet through the multibn adapter (it restores the NumPy alias MXNet 1.9 needs)."""
    return need("multibn.backends.mxnet", "MXNet 1.9").mx


#: The layer parity runs: a native layer and multibn's take PARITY_STEPS SGD steps at PARITY_LR on the same batches.
PARITY_STEPS = 5
PARITY_LR = 0.1
#: The textbook LeNet's input and labels, one batch of 8 (channels first).
LENET_X = np.random.default_rng(7).normal(size=(8, 1, 28, 28)).astype(np.float32)
LENET_Y = np.arange(8) % 10


def batches(shape: tuple[int, ...], n: int = PARITY_STEPS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (input, target) pairs, float32, inputs with per-channel offsets (channels on axis 1)."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    offset, scale = rng.normal(size=c).reshape(bshape), rng.uniform(0.5, 2.0, c).reshape(bshape)
    return [((rng.normal(size=shape) * scale + offset).astype(np.float32), rng.normal(size=shape).astype(np.float32))
            for _ in range(n)]


@contextlib.contextmanager
def jax_float64(backend: str = "jax", dtype: str = "float64") -> Iterator[None]:
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


def host_devices(n: int) -> list:
    """At least ``n`` JAX CPU devices (conftest.py asks XLA for 4 before JAX starts), the first ``n``."""
    jax = need("jax")
    devices = jax.devices("cpu")
    if len(devices) < n:
        pytest.fail(f"needs {n} JAX host devices, JAX started with {len(devices)}: XLA_FLAGS="
                    f"{os.environ.get('XLA_FLAGS')!r} was set after JAX started (tests/conftest.py sets it)")
    return devices[:n]


def arr(backend: str, a: object, dtype: str | None = "float32") -> object:
    """``a`` as an array of ``backend`` in ``dtype`` (via NumPy)."""
    return get_backend(backend).asarray(np.asarray(a, dtype=dtype))


def to_numpy(a: object) -> np.ndarray:
    """Any backend's array as a NumPy array (bfloat16 widened to float32)."""
    if isinstance(a, (int, float, np.ndarray, np.generic)):
        return np.asarray(a)
    from multibn.backends import backend_name_of

    return get_backend(backend_name_of(a)).to_numpy(a)


__all__ = ["ABSENT_BY_DESIGN", "ALL_BACKENDS", "LENET_X", "LENET_Y", "PARITY_LR", "PARITY_STEPS", "ROOT",
           "SAME_IN_CURRENT", "TEST_ENV", "arr", "backends_tested_here", "batches", "has", "host_devices", "installed",
           "jax_float64", "left_to_full", "missing", "mxnet_module", "need", "need_installed", "only_tested_here",
           "require", "to_numpy"]
