"""MXNet 1.9 adapter: a hand-written array namespace over ``mx.nd`` (MXNet has no array-API support) and
autodiff through ``mxnet.autograd.Function``.

MXNet quirks handled here: it uses the alias ``np.bool`` that NumPy >= 1.24 removed (restored before the
import); importing it drops torch's thread count to 1 (restored if torch is already imported); it cannot
make zero-size arrays (an empty batch is refused); it has no bfloat16. ``num_batches_tracked`` has shape
(1,) since legacy NDArrays have no 0-d shape.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

import numpy as np

if "bool" not in np.__dict__:  # MXNet 1.9 uses np.bool, removed in NumPy 1.24 (NumPy 2 re-added it)
    np.bool = np.bool_  # type: ignore[attr-defined]

_torch = sys.modules.get("torch")
_torch_threads = _torch.get_num_threads() if _torch is not None else None
with warnings.catch_warnings():  # MXNet 1.9 warns about NumPy/SciPy/distutils APIs it uses on import
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx

if _torch is not None and _torch_threads is not None:
    _torch.set_num_threads(_torch_threads)

from .base import Array, Backend, Backward, Forward  # noqa: E402


def _ctx(device: object) -> mx.Context | None:
    if device is None or isinstance(device, mx.Context):
        return device
    kind, _, index = str(device).partition(":")
    return mx.Context("cpu" if kind == "cpu" else "gpu", int(index or 0))


class MXNetNamespace:
    """The handful of array-API functions the algorithm uses, over ``mx.nd``."""

    float16, float32, float64, int64 = (np.dtype(n) for n in ("float16", "float32", "float64", "int64"))

    @staticmethod
    def sum(x: Array, axis: Sequence[int] | None = None) -> Array:
        return mx.nd.sum(x, axis=tuple(axis) if axis is not None else ())

    @staticmethod
    def astype(x: Array, dtype: object, copy: bool = True) -> Array:
        return x.astype(dtype, copy=copy)

    @staticmethod
    def reshape(x: Array, shape: Sequence[int]) -> Array:
        return x.reshape(tuple(shape))

    @staticmethod
    def sqrt(x: Array) -> Array:
        return mx.nd.sqrt(x)

    @staticmethod
    def where(cond: Array, a: Array, b: Array) -> Array:
        return mx.nd.where(cond, a, b)

    @staticmethod
    def zeros_like(x: Array) -> Array:
        return mx.nd.zeros_like(x)

    @staticmethod
    def ones_like(x: Array) -> Array:
        return mx.nd.ones_like(x)

    @staticmethod
    def zeros(shape: Sequence[int], dtype: object = None, device: object = None) -> Array:
        return mx.nd.zeros(tuple(shape), ctx=_ctx(device), dtype=dtype or "float32")

    @staticmethod
    def full(shape: Sequence[int], value: float, dtype: object = None, device: object = None) -> Array:
        return mx.nd.full(tuple(shape), value, ctx=_ctx(device), dtype=dtype or "float32")

    @staticmethod
    def asarray(obj: object, dtype: object = None, device: object = None) -> Array:
        return mx.nd.array(np.asarray(obj), ctx=_ctx(device), dtype=dtype)


class MXNetBackend(Backend):
    name = "mxnet"
    extra = "mxnet"
    xp = MXNetNamespace()

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, mx.nd.NDArray)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        if isinstance(obj, mx.nd.NDArray):
            return obj if dtype is None else obj.astype(self.dtype(dtype), copy=False)
        a = np.asarray(obj)
        if a.size == 0:
            raise ValueError(f"the mxnet backend cannot hold zero-size arrays (MXNet 1.x), got shape {a.shape}")
        return mx.nd.array(a, ctx=_ctx(device), dtype=self.dtype(dtype) if dtype else a.dtype)

    def to_numpy(self, a: Array) -> np.ndarray:
        return a.asnumpy()

    def dtype_name(self, a: Array) -> str:
        return np.dtype(a.dtype).name

    def dtype(self, name: str) -> object:
        if name == "bfloat16":
            raise TypeError("the mxnet backend has no bfloat16 dtype (MXNet 1.9 NDArray)")
        return np.dtype(name)

    def device_of(self, a: Array) -> object:
        return a.context

    def counter(self, value: int = 0, device: object = None) -> Array:
        return mx.nd.array([value], ctx=_ctx(device), dtype="int64")

    def custom_op(self, forward: Forward, backward: Backward) -> Callable[..., tuple[Array, ...]]:
        class BatchNormFunction(mx.autograd.Function):
            def forward(self, *inputs: Array) -> tuple[Array, ...]:
                outputs, self.residuals = forward(*inputs)
                self.consts = inputs[3:]
                return outputs

            def backward(self, dy: Array, *_: Array) -> tuple[Array, ...]:
                return (*backward(self.residuals, dy), *(mx.nd.zeros_like(c) for c in self.consts))

        def op(*inputs: Array) -> tuple[Array, ...]:
            outputs = BatchNormFunction()(*inputs)
            return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

        return op
