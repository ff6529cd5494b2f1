"""NumPy adapter: ``array_api_compat.numpy``; no autodiff (use :func:`multibn.batch_norm_vjp`)."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

from .base import Array, Backend


class NumpyBackend(Backend):
    name = "numpy"
    extra = "numpy"
    xp = xp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (np.ndarray, np.generic))

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if device not in (None, "cpu"):
            raise ValueError(f"device for the numpy backend must be None or 'cpu', got {device!r}")
        return np.asarray(obj, dtype=dtype)

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def dtype(self, name: str) -> object:
        if name == "bfloat16":
            raise TypeError("the numpy backend has no bfloat16 dtype")
        return np.dtype(name)
