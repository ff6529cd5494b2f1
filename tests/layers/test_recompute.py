"""``recompute_statistics`` (precise BN) on torch, Gluon and Flax: each BN layer's running mean and variance
against float64 NumPy statistics of the concatenated inputs of that layer, captured independently (hooks on a
copy of the model, or an interceptor of our own); against ``torch.optim.swa_utils.update_bn`` where the two must
agree and where they must not; everything else untouched; the cross-process merge under torch.distributed."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import need, require

SIZES = (5, 9, 3, 12)


def _batches(sizes: tuple[int, ...], shape: tuple[int, ...], seed: int = 0, offsets: bool = True) -> list[np.ndarray]:
    """float32 batches whose means differ from batch to batch (each has its own offset)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, *shape)) * 2 + (rng.normal() * 3 if offsets else 0)).astype(np.float32)
            for n in sizes]


def _reference(inputs: dict[str, list[np.ndarray]], axes: dict[str, int]) -> dict[str, tuple[np.ndarray, ...]]:
    """Per layer: (mean, biased var, unbiased var) of the concatenated float64 inputs."""
    out = {}
    for name, xs in inputs.items():
        x = np.concatenate([np.moveaxis(a.astype(np.float64), axes[name], -1).reshape(-1, a.shape[axes[name]])
                            for a in xs])
        out[name] = (x.mean(axis=0), x.var(axis=0), x.var(axis=0, ddof=1))
    return out


# ---- torch ----------------------------------------------------------------------------------------------------
def _torch_model(last: str = "BatchNorm1d") -> Any:
    """Conv - BatchNorm2d - ReLU - Conv - multibn BN (torch convention) - pool - Linear - multibn BN (channels
    last, gluon convention: biased) - Linear - BatchNorm1d (or ``last``, SyncBatchNorm): four layers deep, native
    and multibn mixed."""
    import torch
    from torch import nn

    from multibn.layers.torch import BatchNorm

    class ChannelsLast(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.bn = BatchNorm(c, 3, convention="gluon", axis=-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C*L) -> (N, L, C) -> BN over C
            n = x.shape[0]
            return self.bn(x.reshape(n, 3, -1).transpose(1, 2)).transpose(1, 2).reshape(n, -1)

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), BatchNorm(3, 4), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 9), ChannelsLast(3), nn.Sigmoid(), nn.Linear(9, 5),
        getattr(nn, last)(5),
    )


def _torch_bn_layers(model: Any) -> dict[str, Any]:
    from torch import nn

    from multibn.layers.torch import BatchNorm

    return {n: m for n, m in model.named_modules() if isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm))}


def _torch_captured(model: Any, batches: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each BN layer's training-mode inputs, from hooks on a copy of the model."""
    import torch

    twin = copy.deepcopy(model).train()
    seen: dict[str, list[np.ndarray]] = {}
    for name, m in _torch_bn_layers(twin).items():
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].numpy()))
    with torch.no_grad():
        for b in batches:
            twin(torch.from_numpy(b))
    return seen


def _unbiased(m: Any) -> bool:
    from multibn.layers.torch import BatchNorm

    return m.convention.unbiased_running_var if isinstance(m, BatchNorm) else True


@pytest.mark.torch
def test_torch_equals_float64_statistics_of_each_layers_inputs() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _torch_model("SyncBatchNorm")  # plain BN outside torch.distributed
    batches = _batches(SIZES, (2, 6, 6))
    layers = _torch_bn_layers(model)
    assert type(layers["12"]).__name__ == "SyncBatchNorm"
    ref = _reference(_torch_captured(model, batches), {n: m.axis if hasattr(m, "convention") else 1
                                                       for n, m in layers.items()})
    data = [(torch.from_numpy(b), torch.zeros(len(b))) if i % 2 else torch.from_numpy(b) for i, b in enumerate(batches)]
    assert recompute_statistics(model, data, progress=False) is model
    assert [n for n, m in layers.items() if not _unbiased(m)] == ["9.bn"]
    for name, m in layers.items():
        mean, var, var1 = ref[name]
        np.testing.assert_allclose(m.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(m.running_var.numpy(), var1 if _unbiased(m) else var, rtol=1e-5, err_msg=name)


@pytest.mark.torch
def test_torch_leaves_everything_else_as_it_was() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _torch_model()
    with torch.no_grad():  # some history: counters and statistics that are not the initial ones
        model.train()(torch.from_numpy(_batches((8,), (2, 6, 6))[0]))
    model.eval()
    model[4].train()  # a mixed mode, restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    recompute_statistics(model, [torch.from_numpy(b) for b in _batches(SIZES, (2, 6, 6))], progress=False)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.{s}" for n in _torch_bn_layers(model) for s in ("running_mean", "running_var")}
    assert all(int(after[k]) == 1 for k in after if k.endswith("num_batches_tracked"))
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def _native_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3), nn.BatchNorm1d(3))


def _update_bn(model: Any, batches: list[np.ndarray]) -> Any:
    import torch
    from torch.optim.swa_utils import update_bn

    twin = copy.deepcopy(model)
    update_bn([torch.from_numpy(b) for b in batches], twin)
    return twin


@pytest.mark.torch
def test_torch_agrees_with_update_bn_on_the_mean_with_equal_batches_and_not_on_the_variance() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _native_model()
    batches = _batches((8, 8, 8, 8), (4,), seed=2)
    theirs = _update_bn(model, batches)
    recompute_statistics(model, [torch.from_numpy(b) for b in batches], progress=False)
    ref = _reference(_torch_captured(model, batches), {"1": 1, "4": 1})
    # equal batches: the mean of the batch means is the mean of the data
    np.testing.assert_allclose(model[1].running_mean.numpy(), theirs[1].running_mean.numpy(), rtol=1e-5, atol=1e-6)
    # the variance: update_bn averages the batch variances, which leaves out the spread of the batch means
    np.testing.assert_allclose(model[1].running_var.numpy(), ref["1"][2], rtol=1e-5)
    gap = np.abs(theirs[1].running_var.numpy() / ref["1"][2] - 1)
    assert gap.max() > 0.1, gap


@pytest.mark.torch
def test_torch_update_bn_is_off_with_unequal_batches_where_recompute_is_exact() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _native_model()
    batches = _batches(SIZES, (4,), seed=3)
    theirs = _update_bn(model, batches)
    recompute_statistics(model, [torch.from_numpy(b) for b in batches], progress=False)
    ref = _reference(_torch_captured(model, batches), {"1": 1, "4": 1})
    for i, name in ((1, "1"), (4, "4")):
        np.testing.assert_allclose(model[i].running_mean.numpy(), ref[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model[i].running_var.numpy(), ref[name][2], rtol=1e-5)
    assert np.abs(theirs[1].running_mean.numpy() - ref["1"][0]).max() > 0.05  # equal weight for 3 and 12 samples
    assert np.abs(theirs[1].running_var.numpy() / ref["1"][2] - 1).max() > 0.1


@pytest.mark.torch
def test_torch_num_batches_progress_and_device() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _native_model()
    batches = _batches(SIZES, (4,), seed=4)
    stream = io.StringIO()
    recompute_statistics(model, [torch.from_numpy(b) for b in batches], num_batches=2, progress=stream,
                         device="cpu")
    ref = _reference(_torch_captured(model, batches[:2]), {"1": 1, "4": 1})
    np.testing.assert_allclose(model[4].running_var.numpy(), ref["4"][2], rtol=1e-5)
    assert re.search(r"recompute_statistics: 100%\|[^|]*\| 2/2 \[", stream.getvalue())  # the bar, done
    stream = io.StringIO()
    recompute_statistics(model, (torch.from_numpy(b) for b in batches), progress=stream)  # no len: a count
    assert re.search(r"recompute_statistics: 4batch \[[^\r]*$", stream.getvalue().rstrip())  # the last count drawn


@pytest.mark.torch
def test_torch_a_failed_call_changes_nothing() -> None:
    require("torch")
    import torch

    from multibn.layers.torch import recompute_statistics

    model = _torch_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken():
        yield torch.from_numpy(_batches((6,), (2, 6, 6))[0])
        yield torch.zeros(4, 7, 6, 6)  # wrong channel count: the first conv raises

    with pytest.raises(RuntimeError):
        recompute_statistics(model, broken(), progress=False)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recompute_statistics(model, [], progress=False)
    with pytest.raises(ValueError, match="batch 0 is an empty tuple"):
        recompute_statistics(model, [()], progress=False)
    with pytest.raises(ValueError, match="num_batches must be None or a positive int"):
        recompute_statistics(model, [torch.zeros(1)], num_batches=0, progress=False)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        recompute_statistics("model", [], progress=False)
    with pytest.raises(TypeError, match=r"sync must be True, False or a torch.distributed.ProcessGroup"):
        recompute_statistics(model, [], sync="world", progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.torch
def test_torch_layers_without_statistics_or_input() -> None:
    require("torch")
    import torch
    from torch import nn

    from multibn.layers.torch import recompute_statistics

    with pytest.warns(UserWarning, match="no batch-norm layer with running statistics"):
        recompute_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)),
                             [torch.ones(3, 2)], progress=False)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy()
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [5.0, 11.0]])
    with pytest.warns(UserWarning, match="no input reached the batch-norm layer.s. unused"):
        recompute_statistics(model, [x], progress=False)
    np.testing.assert_allclose(model.used.running_var.numpy(), [4.0, 21.0], rtol=1e-6)
    np.testing.assert_array_equal(model.unused.running_var.numpy(), [1.0, 1.0])


def _recompute_worker(rank: int, shards: list[list[int]], store: str, out: str) -> None:
    """One rank of a 2-process gloo group: recompute on its own batches (ranks may hold unequal numbers)."""
    import torch
    import torch.distributed as dist

    from multibn.layers.torch import recompute_statistics

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(shards))
    try:
        batches = _batches(tuple(s for shard in shards for s in shard), (2, 6, 6))
        lo = sum(len(s) for s in shards[:rank])
        mine = [torch.from_numpy(b) for b in batches[lo:lo + len(shards[rank])]]
        model = _torch_model()
        recompute_statistics(model, mine, progress=False)
        np.savez(f"{out}/rank{rank}.npz", **{f"{n}|{k}": getattr(m, k).numpy()
                                             for n, m in _torch_bn_layers(model).items()
                                             for k in ("running_mean", "running_var")})
    finally:
        dist.destroy_process_group()


@pytest.mark.torch
def test_torch_distributed_merges_the_processes_exactly(tmp_path: Path) -> None:
    require("torch")
    import torch
    import torch.multiprocessing as mp

    from multibn.layers.torch import recompute_statistics

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    shards = [[5, 9, 3], [12]]
    mp.start_processes(_recompute_worker, args=(shards, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    model = _torch_model()
    recompute_statistics(model, [torch.from_numpy(b) for b in _batches(SIZES, (2, 6, 6))], progress=False)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for n, m in _torch_bn_layers(model).items():
            for k in ("running_mean", "running_var"):
                np.testing.assert_allclose(got[f"{n}|{k}"], getattr(m, k).numpy(), rtol=1e-6, atol=1e-7,
                                           err_msg=f"rank {rank} {n} {k}")


# ---- Gluon ----------------------------------------------------------------------------------------------------
def _gluon_net() -> tuple[Any, Any]:
    """A hybridized stem (Conv2D - native BatchNorm - ReLU), then multibn's BatchNorm (torch convention: unbiased),
    Dense, native BatchNorm, Dense; the stem separately."""
    from multibn.backends.mxnet import mx
    from multibn.layers.gluon import BatchNorm

    nn = mx.gluon.nn
    mx.random.seed(0)
    net, stem = nn.Sequential(), nn.HybridSequential()
    stem.add(nn.Conv2D(4, 3, in_channels=2), nn.BatchNorm(in_channels=4), nn.Activation("relu"))
    net.add(stem, BatchNorm(4, 4, convention="torch"), nn.Flatten(), nn.Dense(6, in_units=64),
            nn.BatchNorm(in_channels=6), nn.Dense(3, in_units=6))
    net.initialize(mx.init.Xavier())
    return net, stem


def _gluon_bn_blocks(net: Any) -> list[Any]:
    from multibn.backends.mxnet import mx
    from multibn.layers.gluon import BatchNorm

    found: list[Any] = []
    net.apply(lambda b: found.append(b) if isinstance(b, (BatchNorm, mx.gluon.nn.BatchNorm)) else None)
    return found


@pytest.mark.mxnet
def test_gluon_equals_float64_statistics_of_each_layers_inputs() -> None:
    require("mxnet")
    from multibn.backends.mxnet import mx
    from multibn.layers.gluon import BatchNorm, recompute_statistics

    net, stem = _gluon_net()
    blocks = _gluon_bn_blocks(net)
    batches = _batches(SIZES, (2, 6, 6), seed=5)
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [b.register_forward_pre_hook(lambda b, args: seen.setdefault(b.name, []).append(args[0].asnumpy()))
             for b in blocks]
    with mx.autograd.pause(train_mode=True):  # the reference: every layer's training-mode input, not hybridized
        for b in batches:
            net(mx.nd.array(b))
    for h in hooks:
        h.detach()
    ref = _reference(seen, {b.name: 1 for b in blocks})
    stem.hybridize()
    net(mx.nd.array(batches[0]))  # builds the cached graph
    others = {k: p.data().copy() for k, p in net.collect_params().items() if "running" not in k}
    tracked = blocks[1].num_batches_tracked  # a method of the Block version, a parameter of a hybrid one

    def counter() -> np.ndarray:
        return (tracked() if callable(tracked) else tracked.data()).asnumpy()

    count_before = counter()
    data = [(mx.nd.array(b), mx.nd.zeros(len(b))) if i % 2 else mx.nd.array(b) for i, b in enumerate(batches)]
    assert recompute_statistics(net, data, progress=False) is net
    assert [isinstance(b, BatchNorm) for b in blocks] == [False, True, False]
    for b in blocks:
        mean, var, var1 = ref[b.name]
        np.testing.assert_allclose(b.running_mean.data().asnumpy(), mean, rtol=1e-5, atol=1e-6, err_msg=b.name)
        want = var1 if isinstance(b, BatchNorm) else var
        np.testing.assert_allclose(b.running_var.data().asnumpy(), want, rtol=1e-5, err_msg=b.name)
    for k, p in net.collect_params().items():
        if "running" not in k:
            np.testing.assert_array_equal(p.data().asnumpy(), others[k].asnumpy(), err_msg=k)
    np.testing.assert_array_equal(counter(), count_before)
    assert stem._active and all(not b._forward_pre_hooks for b in blocks)
    with mx.autograd.predict_mode():  # the hybridized stem runs again, with the new statistics
        out = stem(mx.nd.array(batches[0]))
    assert np.isfinite(out.asnumpy()).all()


@pytest.mark.mxnet
def test_gluon_num_batches_and_errors() -> None:
    require("mxnet")
    from multibn.backends.mxnet import mx
    from multibn.layers.gluon import recompute_statistics

    net, _ = _gluon_net()
    blocks = _gluon_bn_blocks(net)
    before = [b.running_var.data().copy() for b in blocks]
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recompute_statistics(net, [], progress=False)
    with pytest.raises(mx.base.MXNetError):
        recompute_statistics(net, [mx.nd.ones((3, 5, 6, 6))], progress=False)  # 5 channels into a 2-channel conv
    for b, v in zip(blocks, before, strict=True):
        np.testing.assert_array_equal(b.running_var.data().asnumpy(), v.asnumpy())
    with pytest.raises(TypeError, match=r"net must be an mxnet.gluon.Block"):
        recompute_statistics(object(), [], progress=False)
    stream = io.StringIO()
    batches = _batches(SIZES, (2, 6, 6), seed=6)
    recompute_statistics(net, [mx.nd.array(b) for b in batches], num_batches=1, progress=stream)
    assert re.search(r"recompute_statistics: 100%\|[^|]*\| 1/1 \[", stream.getvalue())
    with pytest.warns(UserWarning, match="no batch-norm block"):
        recompute_statistics(mx.gluon.nn.Dense(2, in_units=2), [mx.nd.ones((2, 2))], progress=False)


# ---- Flax -----------------------------------------------------------------------------------------------------
def _flax_model() -> Any:
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            x = nn.Conv(4, (3, 3), padding="VALID")(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
            x = nn.BatchNorm(use_running_average=not train, axis=(-2, -1), name="two_axes")(x)
            x = nn.Dense(5)(x.reshape(x.shape[0], -1))
            shared = nn.BatchNorm(name="shared")
            return nn.Dense(3)(shared(x, use_running_average=not train) + shared(2 * x, not train))

    return Net()


def _flax_captured(model: Any, variables: Any, batches: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each BN layer's training-mode inputs, run eagerly with an interceptor of the test's own."""
    import flax.linen as nn

    seen: dict[str, list[np.ndarray]] = {}

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            seen.setdefault("/".join(context.module.path), []).append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for b in batches:
            model.apply(variables, b, train=True, mutable=["batch_stats"])
    return seen


def test_flax_equals_float64_statistics_of_each_layers_inputs() -> None:
    need("flax")
    import jax
    import jax.numpy as jnp

    from multibn.layers.flax import recompute_statistics

    model = _flax_model()
    batches = [np.moveaxis(b, 1, -1) for b in _batches(SIZES, (2, 6, 6), seed=7)]
    variables = model.init(jax.random.PRNGKey(0), batches[0], train=False)
    seen = _flax_captured(model, variables, batches)
    assert sorted(seen) == ["BatchNorm_0", "shared", "two_axes"] and len(seen["shared"]) == 8
    ref = _reference({k: v for k, v in seen.items() if k != "two_axes"}, {"BatchNorm_0": -1, "shared": -1})
    two = np.concatenate([a.astype(np.float64) for a in seen["two_axes"]]).reshape(-1, 4 * 4)  # (N*H, W*C)
    ref["two_axes"] = (two.mean(axis=0).reshape(4, 4), two.var(axis=0).reshape(4, 4))
    before = jax.tree_util.tree_map(np.array, variables)
    data = [(b, np.zeros(len(b))) if i % 2 else b for i, b in enumerate(batches)]
    out = recompute_statistics(model, variables, data, progress=False, train=True)
    for path, stats in out["batch_stats"].items():
        np.testing.assert_allclose(stats["mean"], ref[path][0], rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(stats["var"], ref[path][1], rtol=1e-5, err_msg=path)  # Flax: biased
        assert stats["var"].dtype == jnp.float32
    jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"], before["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)  # the input is not modified


def test_flax_needs_training_mode_and_returns_the_container_type() -> None:
    need("flax")
    import jax
    from flax.core import freeze
    from flax.core.frozen_dict import FrozenDict

    from multibn.layers.flax import recompute_statistics

    model = _flax_model()
    batches = [np.moveaxis(b, 1, -1) for b in _batches((4, 6), (2, 6, 6), seed=8)]
    variables = model.init(jax.random.PRNGKey(0), batches[0], train=False)
    with pytest.raises(ValueError, match=r"BatchNorm_0 ran with use_running_average=True.*train=True"):
        recompute_statistics(model, variables, batches, progress=False, train=False)
    with pytest.raises(TypeError, match="sets mutable"):
        recompute_statistics(model, variables, batches, progress=False, train=True, mutable=True)
    frozen = recompute_statistics(model, freeze(variables), batches, num_batches=1, progress=False, train=True)
    assert isinstance(frozen, FrozenDict)
    seen = _flax_captured(model, variables, batches[:1])
    np.testing.assert_allclose(frozen["batch_stats"]["BatchNorm_0"]["var"],
                               seen["BatchNorm_0"][0].reshape(-1, 4).astype(np.float64).var(axis=0), rtol=1e-5)


def test_flax_multibn_layer_stores_its_conventions_variance() -> None:
    need("flax")
    layers = need("multibn.layers.flax")
    import flax.linen as nn
    import jax

    from multibn.layers.flax import recompute_statistics

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            x = layers.BatchNorm(use_running_average=not train, convention="torch")(nn.Dense(3)(x))
            return layers.BatchNorm(use_running_average=not train)(nn.tanh(x))

    model = Net()
    batches = _batches(SIZES, (4,), seed=9)
    variables = model.init(jax.random.PRNGKey(1), batches[0], train=False)
    seen: dict[str, list[np.ndarray]] = {}

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
            seen.setdefault("/".join(context.module.path), []).append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for b in batches:
            model.apply(variables, b, train=True, mutable=["batch_stats"])
    ref = _reference(seen, {k: -1 for k in seen})
    out = recompute_statistics(model, variables, batches, progress=False, train=True)["batch_stats"]
    np.testing.assert_allclose(out["BatchNorm_0"]["var"], ref["BatchNorm_0"][2], rtol=1e-5)  # torch: unbiased
    np.testing.assert_allclose(out["BatchNorm_1"]["var"], ref["BatchNorm_1"][1], rtol=1e-5)  # flax: biased
    np.testing.assert_allclose(out["BatchNorm_1"]["mean"], ref["BatchNorm_1"][0], rtol=1e-5, atol=1e-6)


# ---- multibn train: the recomputed evaluation of every backend ---------------------------------------------------
def _train_data(task: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    if task == "lenet":
        return rng.random((24, 1, 28, 28), np.float32), rng.integers(0, 10, 24)
    x = (rng.normal(size=(24, 8)) * 3).astype(np.float32)
    return x, (x[:, :1] ** 2).astype(np.float32)


def _float64_recomputed(trainer: Any, batches: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[Any, ...]:
    """The NumPy float64 trainer evaluated with each BN layer's statistics set to np.mean / np.var (biased: the d2l
    convention of the experiments) of its concatenated training-mode inputs, read off the forward's tape."""
    from multibn.state import BNState

    running = dict(trainer.states)
    seen: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for layer, inp, *_ in trainer.forward(b.astype(np.float64), training=True)[1]:
            if layer.kind == "bn":
                seen.setdefault(layer.name, []).append(inp)
    ref = _reference(seen, dict.fromkeys(seen, 1))
    trainer.states = {k: BNState(ref[k][0], ref[k][1], running[k].num_batches_tracked) for k in running}
    try:
        return trainer.evaluate(x, y)
    finally:
        trainer.states = running


@pytest.mark.parametrize(("task", "variant"), [("lenet", "bn"), ("placement", "before")])
def test_train_recomputed_evaluation_against_float64_and_training_unchanged(backend: str, task: str,
                                                                           variant: str) -> None:
    from multibn.cli.train.runner import make_trainer
    from multibn.cli.train.tasks import TASKS

    x, y = _train_data(task)
    batches = [x[i:i + 8] for i in (0, 8, 16)]
    ref = make_trainer("numpy", TASKS[task], variant, 0, dtype="float64")
    got, twin = (make_trainer(backend, TASKS[task], variant, 0) for _ in range(2))
    for idx in (np.arange(0, 8), np.arange(8, 16)):
        for t in (ref, got, twin):
            t.step(x[idx], y[idx])
    want = _float64_recomputed(ref, batches, x, y)
    before = got.evaluate(x, y)
    loss, acc = got.evaluate_recomputed(batches, x, y)
    assert loss == pytest.approx(want[0], rel=1e-3)
    assert acc is None if want[1] is None else abs(acc - want[1]) <= 1 / 24
    assert loss != pytest.approx(before[0], rel=1e-3)  # the running averages give another answer
    assert got.evaluate(x, y) == before  # the running averages are back
    idx = np.arange(16, 24)
    assert got.step(x[idx], y[idx]) == twin.step(x[idx], y[idx])
    w, w_twin = got.weights(), twin.weights()
    assert all(np.array_equal(w[k], w_twin[k]) for k in w)


def test_flax_a_batchnorm_that_is_the_whole_model() -> None:
    need("flax")
    import flax.linen as nn
    import jax

    from multibn.layers.flax import recompute_statistics

    batches = _batches((5, 9), (3,), seed=12)
    model = nn.BatchNorm()
    variables = model.init(jax.random.PRNGKey(0), batches[0], use_running_average=True)
    out = recompute_statistics(model, variables, batches, progress=False, use_running_average=False)
    x = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(out["batch_stats"]["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["var"], x.var(axis=0), rtol=1e-5)


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_split_independent_on_data_with_a_large_mean(framework: str) -> None:
    """float32 data of mean 1e4 and spread 1e-3 in batches of 7, 64 or 1000: the same variance, that of the data
    (each batch was summarised in float32 before the merge: 6.4% / 1.9% / 0.065% off)."""
    rng = np.random.default_rng(0)
    data = (1e4 + 1e-3 * rng.standard_normal((7000, 3))).astype(np.float32)
    want = data.astype(np.float64).var(0, ddof=1 if framework == "torch" else 0)
    for batch in (7, 64, 1000):
        batches = [data[i:i + batch] for i in range(0, len(data), batch)]
        if framework == "torch":
            torch = need("torch")
            from multibn.layers.torch import BatchNorm, recompute_statistics

            layer = BatchNorm(3)
            recompute_statistics(layer, [torch.from_numpy(b) for b in batches], progress=False)
            got = layer.running_var.numpy()
        else:
            jax = need("jax")
            need("flax", "the Flax layer")
            from multibn.layers.flax import BatchNorm, recompute_statistics

            model = BatchNorm(use_running_average=False)
            variables = model.init(jax.random.PRNGKey(0), jax.numpy.asarray(data[:8]))
            got = np.asarray(recompute_statistics(model, variables, batches, progress=False)["batch_stats"]["var"])
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"batches of {batch}")
