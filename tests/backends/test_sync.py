"""Synchronised BN equals single-process BN on the concatenated batch: torch.distributed (gloo, 2 and 3
processes, loopback file store) and JAX collectives (4 host devices, in this process: see tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import multibn
from tests.backends.sync_workers import CHANNELS, full_batch
from tests.helpers import host_devices, jax_float64, need, require


def single_process(counts: list[int]) -> dict[str, np.ndarray]:
    torch = need("torch")
    x, g, gamma, beta = full_batch(sum(counts))
    xt = torch.tensor(x, requires_grad=True)
    gam = torch.tensor(gamma, requires_grad=True)
    bet = torch.tensor(beta, requires_grad=True)
    state = multibn.init_state(CHANNELS, backend="torch", dtype="float64")
    _, state = multibn.batch_norm(xt.detach() * 2, gam.detach(), bet.detach(), state)
    y, state = multibn.batch_norm(xt, gam, bet, state)
    (y * torch.tensor(g)).sum().backward()
    return {"y": y.detach().numpy(), "dx": xt.grad.numpy(), "dgamma": gam.grad.numpy(), "dbeta": bet.grad.numpy(),
            "running_mean": state.running_mean.numpy(), "running_var": state.running_var.numpy(), "tracked": 2}


@pytest.mark.torch
@pytest.mark.parametrize(("counts", "padded"), [([4, 4], False), ([2, 6], False), ([3, 0, 5], False),
                                               ([3, 8, 0, 5], True)],
                         ids=["equal", "unequal", "empty-shard", "padded-masked"])
def test_torch_sync_equals_concatenated_batch(counts: list[int], padded: bool, tmp_path: Path) -> None:
    torch = need("torch")
    import torch.multiprocessing as mp

    from tests.backends.sync_workers import torch_worker

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.start_processes(torch_worker, args=(counts, str(tmp_path / "store"), str(tmp_path), padded),
                       nprocs=len(counts), join=True, start_method="spawn")
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(len(counts))]
    ref = single_process(counts)
    np.testing.assert_allclose(np.concatenate([r["y"] for r in ranks]), ref["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r["dx"] for r in ranks]), ref["dx"], rtol=1e-10, atol=1e-12)
    # dgamma/dbeta are local sums (the data-parallel reduction adds them up), as in torch's SyncBatchNorm
    for q in ("dgamma", "dbeta"):
        np.testing.assert_allclose(sum(r[q] for r in ranks), ref[q], rtol=1e-10, atol=1e-12)
    for r in ranks:
        for q in ("running_mean", "running_var"):
            np.testing.assert_allclose(r[q], ref[q], rtol=1e-12, atol=1e-14)
        assert int(r["tracked"]) == ref["tracked"]


def test_jax_sync_equals_concatenated_batch(tmp_path: Path) -> None:
    host_devices(4)
    from tests.backends.sync_workers import jax_main

    with jax_float64():
        jax_main(str(tmp_path))
    err = json.loads((tmp_path / "jax.json").read_text())
    assert err.pop("tracked") == 0
    assert max(err.values()) < 1e-10, err
    # padded shards with 3, 8, 0 and 5 real rows of 8 (mask=): BN over the real rows, exactly
    err = json.loads((tmp_path / "jax_masked.json").read_text())
    assert err.pop("tracked") == 0
    assert max(err.values()) < 1e-10, err


@pytest.mark.parametrize("backend", ["numpy", "mxnet"])
def test_sync_unsupported_backends_say_so(backend: str) -> None:
    require(backend)
    with pytest.raises(NotImplementedError, match=r"torch .* and jax"):
        multibn.batch_norm(np.ones((4, 2), np.float32), backend=backend, sync=True)


@pytest.mark.torch
def test_torch_sync_needs_an_initialised_process_group() -> None:
    torch = need("torch")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        multibn.batch_norm(torch.ones(4, 2), sync=True)


@pytest.mark.torch
def test_torch_sync_double_backward_raises_and_forward_ad_is_exact(tmp_path: Path) -> None:
    """A second derivative through all_reduce would be silently wrong: it raises. Forward mode is exact."""
    torch = need("torch")
    import torch.autograd.forward_ad as fwAD
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
        y, _ = multibn.batch_norm(x, sync=True)
        torch.autograd.grad((y**3).sum(), x, retain_graph=True)  # first derivatives work
        with pytest.raises(NotImplementedError, match="cannot be differentiated twice"):
            torch.autograd.grad((y**3).sum(), x, create_graph=True)
        t = torch.randn_like(x)
        with fwAD.dual_level():
            got = fwAD.unpack_dual(multibn.batch_norm(fwAD.make_dual(x.detach(), t), sync=True)[0]).tangent
            want = fwAD.unpack_dual(torch.nn.functional.batch_norm(fwAD.make_dual(x.detach(), t), None, None,
                                                                   training=True)).tangent
        torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()


@pytest.mark.torch
def test_ddp_step_with_converted_layer_equals_single_process(tmp_path: Path) -> None:
    """Two SGD steps of a DistributedDataParallel model whose nn.BatchNorm1d was converted to multibn's
    synchronised layer (2 ranks of 5 rows) equal two steps of the native model on the 10 rows in one process."""
    torch = need("torch")
    import torch.multiprocessing as mp

    from tests.backends.sync_workers import ddp_batch, ddp_model, ddp_worker

    world, rows = 2, 5
    mp.start_processes(ddp_worker, args=(world, rows, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    model = ddp_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = ddp_batch(rows * world)
    for _ in range(2):
        opt.zero_grad()
        ((model(torch.tensor(x)) - torch.tensor(t)) ** 2).mean().backward()
        opt.step()
    want = model.state_dict()
    for rank in range(world):
        got = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.torch
def test_convert_sync_batchnorm_keeps_everything() -> None:
    torch = need("torch")
    from multibn.layers.torch import BatchNorm, convert_sync_batchnorm

    native = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3, momentum=None, eps=1e-3))
    native[1].running_mean.fill_(0.5)
    native[1].weight.data.fill_(2.0)
    native.eval()
    converted = convert_sync_batchnorm(native)
    layer = converted[1]
    assert isinstance(layer, BatchNorm) and layer.sync is True and not layer.training
    assert layer.convention.name == "torch_cma" and layer.eps == 1e-3
    x = torch.randn(4, 1, 2, 2)
    reference = torch.nn.functional.batch_norm(
        converted[0](x), torch.full((3,), 0.5), torch.ones(3), torch.full((3,), 2.0), torch.zeros(3), eps=1e-3)
    torch.testing.assert_close(converted(x), reference)
