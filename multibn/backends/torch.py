"""PyTorch adapter (CPU and CUDA): ``array_api_compat.torch``, autodiff through ``torch.autograd.Function``."""

from __future__ import annotations

from collections.abc import Callable

import array_api_compat.torch as xp
import numpy as np
import torch

from .base import Array, Backend, Backward, Forward


class TorchBackend(Backend):
    name = "torch"
    extra = "torch"
    xp = xp

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, torch.Tensor)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> Array:
        return torch.as_tensor(obj, dtype=None if dtype is None else self.dtype(dtype), device=device)

    def to_numpy(self, a: Array) -> np.ndarray:
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()

    def custom_op(self, forward: Forward, backward: Backward) -> Callable[..., tuple[Array, ...]]:
        class BatchNormFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):  # type: ignore[override]
                outputs, residuals = forward(*inputs)
                ctx.save_for_backward(*residuals)
                ctx.mark_non_differentiable(*outputs[1:])
                ctx.n_consts = len(inputs) - 3
                return outputs

            @staticmethod
            def backward(ctx, dy, *_):  # type: ignore[override]
                grads = backward(ctx.saved_tensors, dy.contiguous())
                grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)]
                return (*grads, *([None] * ctx.n_consts))

        def op(*inputs: Array) -> tuple[Array, ...]:
            outputs = BatchNormFunction.apply(*inputs)
            return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

        return op
