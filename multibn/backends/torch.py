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

    def sync_group(self, sync: object) -> object:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync needs torch.distributed initialised: call torch.distributed.init_process_group")
        if sync is True:
            return None  # the default process group
        if isinstance(sync, dist.ProcessGroup):
            return sync
        raise TypeError(f"sync on the torch backend must be True or a torch.distributed.ProcessGroup, got {sync!r}")

    def replica_counts(self, count: int, group: object) -> tuple[int, ...]:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=device), group=group)
        return tuple(int(c) for c in counts)

    def all_reduce_sum(self, a: Array, group: object) -> Array:
        import torch.distributed as dist

        a = a.clone()
        dist.all_reduce(a, op=dist.ReduceOp.SUM, group=group)
        return a

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
