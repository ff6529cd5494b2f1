"""The adapters, found by name or by the type of an array, imported only when used.

``import multibn`` imports no framework: :func:`backend_name_of` looks only at frameworks already in
``sys.modules`` (an array of a framework cannot exist before that framework is imported).
"""

from __future__ import annotations

import importlib
import sys
from functools import cache

from .base import Backend

#: backend name -> (adapter module, class, the framework's top-level module, the pip extra that installs it)
ADAPTERS: dict[str, tuple[str, str, str, str]] = {
    "numpy": ("multibn.backends.numpy", "NumpyBackend", "numpy", "numpy"),
    "torch": ("multibn.backends.torch", "TorchBackend", "torch", "torch"),
    "jax": ("multibn.backends.jax", "JaxBackend", "jax", "jax"),
    "mxnet": ("multibn.backends.mxnet", "MXNetBackend", "mxnet", "mxnet"),
}


def get_backend(name: str) -> Backend:
    """The adapter called ``name``, made once; ValueError if there is none, ImportError if its framework is
    missing. (A plain dict, not ``functools.cache``: torch.compile traces through this lookup and warns about
    caches.)"""
    if name in _LOADED:
        return _LOADED[name]
    if not isinstance(name, str) or name not in ADAPTERS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, ADAPTERS))} or None, got {name!r}")
    module, cls, framework, extra = ADAPTERS[name]
    try:
        adapter = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the {name} backend needs {framework}, which cannot be imported here ({e}); "
            f"install it with: pip install 'multibn[{extra}]'"
        ) from e
    return _LOADED.setdefault(name, getattr(adapter, cls)())


_LOADED: dict[str, Backend] = {}


def backend_name_of(obj: object) -> str | None:
    """The backend whose array type ``obj`` is, looking only at frameworks already imported; else None."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.ndarray, np.generic)):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(obj, jax.Array):
        return "jax"
    mx = sys.modules.get("mxnet")
    if mx is not None and isinstance(obj, mx.nd.NDArray):
        return "mxnet"
    return None


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller: then no plan is looked up or kept (Dynamo guards on the
    arguments itself, and a guard on a cache's contents would recompile whenever an eager call fills it)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


@cache
def available_backends() -> tuple[str, ...]:
    """The backends whose framework imports here (this imports them)."""
    found = []
    for name in ADAPTERS:
        try:
            get_backend(name)
        except ImportError:
            continue
        found.append(name)
    return tuple(found)
