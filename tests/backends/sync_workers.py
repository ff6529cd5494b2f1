"""The workers of tests/backends/test_sync.py: torch.distributed processes (a module that torch.multiprocessing's
spawn can import) and the JAX collectives run on 4 host devices."""

from __future__ import annotations

import json
import os

import numpy as np

CHANNELS = 3


def full_batch(total: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (total, C, 2, 2) with per-channel offsets, upstream gradient g, gamma, beta: float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(total, CHANNELS, 2, 2)) * [[[[1.0]], [[3.0]], [[0.5]]]] + [[[[5.0]], [[-2.0]], [[0.0]]]]
    return x, rng.normal(size=x.shape), rng.uniform(0.5, 2, CHANNELS), rng.normal(size=CHANNELS)


def torch_worker(rank: int, counts: list[int], store: str, out: str, padded: bool = False) -> None:
    """One rank: synchronised batch_norm on its shard (two training steps), forward and backward. ``padded``: every
    shard is padded to the largest count with junk rows that ``mask=`` leaves out."""
    import torch
    import torch.distributed as dist

    import multibn

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(counts))
    try:
        x, g, gamma, beta = full_batch(sum(counts))
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        shard, gs, mask = x[lo:hi], g[lo:hi], None
        if padded:
            rows = max(counts)
            junk = np.full((rows - (hi - lo), *x.shape[1:]), 1e3)
            shard, gs = np.concatenate([shard, junk]), np.concatenate([gs, junk])
            mask = torch.tensor(np.arange(rows) < hi - lo).reshape(-1, 1, 1, 1)
        xs = torch.tensor(shard, requires_grad=True)
        gam = torch.tensor(gamma, requires_grad=True)
        bet = torch.tensor(beta, requires_grad=True)
        state = multibn.init_state(CHANNELS, backend="torch", dtype="float64")
        _, state = multibn.batch_norm(xs.detach() * 2, gam.detach(), bet.detach(), state, sync=True, mask=mask)
        y, state = multibn.batch_norm(xs, gam, bet, state, sync=True, mask=mask)
        (y * torch.tensor(gs) * (1 if mask is None else mask)).sum().backward()
        real = hi - lo
        np.savez(
            f"{out}/rank{rank}.npz", y=y.detach().numpy()[:real], dx=xs.grad.numpy()[:real], dgamma=gam.grad.numpy(),
            dbeta=bet.grad.numpy(), running_mean=state.running_mean.numpy(), running_var=state.running_var.numpy(),
            tracked=state.num_batches_tracked.numpy(),
        )
    finally:
        dist.destroy_process_group()


def ddp_model(seed: int = 1):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, CHANNELS), nn.BatchNorm1d(CHANNELS), nn.Tanh(), nn.Linear(CHANNELS, 1))


def ddp_batch(total: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(total, 4)) * 3 + 1, rng.normal(size=(total, 1))


def ddp_worker(rank: int, world: int, rows: int, store: str, out: str) -> None:
    """One rank of a DistributedDataParallel step with the model's BN converted to multibn's synchronised layer."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from multibn.layers.torch import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(convert_sync_batchnorm(ddp_model().double()))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, t = ddp_batch(rows * world)
        sl = slice(rank * rows, (rank + 1) * rows)
        for _ in range(2):
            opt.zero_grad()
            loss = ((model(torch.tensor(x[sl])) - torch.tensor(t[sl])) ** 2).mean()
            loss.backward()
            opt.step()
        torch.save(model.module.state_dict(), f"{out}/ddp{rank}.pt")
    finally:
        dist.destroy_process_group()


def jax_main(out: str) -> None:
    """4 host devices: shard_map with batch_norm(sync="d") against the unsharded batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import multibn

    try:
        from jax import shard_map
    except ImportError:  # jax < 0.8
        from jax.experimental.shard_map import shard_map

    assert jax.config.jax_enable_x64  # the caller turns x64 on (tests.helpers.jax_float64)
    mesh = jax.make_mesh((4,), ("d",))
    x, g, gamma, beta = (jnp.asarray(a) for a in full_batch(8))
    state = multibn.init_state(CHANNELS, backend="jax", dtype="float64")

    def loss(x, gamma, beta, state, g, sync):
        y, new = multibn.batch_norm(x, gamma, beta, state, sync=sync)
        return jnp.sum(y * g), (y, new)

    def sharded(x, gamma, beta, state, g):
        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            x, gamma, beta, state, g, "d")
        dx, dgamma, dbeta = grads  # gamma and beta are replicated: JAX sums their cotangents over devices
        return y, dx, dgamma, dbeta, new

    shard = NamedSharding(mesh, P("d"))
    rep = NamedSharding(mesh, P())
    args = (jax.device_put(x, shard), jax.device_put(gamma, rep), jax.device_put(beta, rep),
            jax.device_put(state, rep), jax.device_put(g, shard))
    f = jax.jit(shard_map(sharded, mesh=mesh, in_specs=(P("d"), P(), P(), P(), P("d")),
                          out_specs=(P("d"), P("d"), P(), P(), P())))
    y, dx, dgamma, dbeta, new = f(*args)
    (_, (y1, new1)), (dx1, dgamma1, dbeta1) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        x, gamma, beta, state, g, None)
    err = {
        "y": float(jnp.max(jnp.abs(y - y1))), "dx": float(jnp.max(jnp.abs(dx - dx1))),
        "dgamma": float(jnp.max(jnp.abs(dgamma - dgamma1))), "dbeta": float(jnp.max(jnp.abs(dbeta - dbeta1))),
        "running_mean": float(jnp.max(jnp.abs(new.running_mean - new1.running_mean))),
        "running_var": float(jnp.max(jnp.abs(new.running_var - new1.running_var))),
        "tracked": int(new.num_batches_tracked) - int(new1.num_batches_tracked),
    }
    with open(os.path.join(out, "jax.json"), "w") as f_:
        json.dump(err, f_)
    jax_masked(out, mesh, shard_map)


def jax_masked(out: str, mesh: object, shard_map: object) -> None:
    """Shards padded to 8 rows with 3, 8, 0 and 5 real ones (mask=): exactly BN over the 16 real rows."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import multibn

    counts, rows = (3, 8, 0, 5), 8
    x_np, g_np, gamma_np, beta_np = full_batch(rows * len(counts), seed=1)
    x, g, gamma, beta = (jnp.asarray(a) for a in (x_np, g_np, gamma_np, beta_np))
    real = np.concatenate([np.arange(rows) < c for c in counts])
    mask = jnp.asarray(real.reshape(-1, 1, 1, 1))
    state = multibn.init_state(CHANNELS, backend="jax", dtype="float64")

    def loss(x, gamma, beta, state, g, mask, sync):
        y, new = multibn.batch_norm(x, gamma, beta, state, sync=sync, mask=mask)
        return jnp.sum(y * g if mask is None else y * g * mask), (y, new)

    def sharded(x, gamma, beta, state, g, mask):
        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            x, gamma, beta, state, g, mask, "d")
        return y, *grads, new

    f = jax.jit(shard_map(sharded, mesh=mesh, in_specs=(P("d"), P(), P(), P(), P("d"), P("d")),
                          out_specs=(P("d"), P("d"), P(), P(), P())))
    shard, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    y, dx, dgamma, dbeta, new = f(*(jax.device_put(a, s) for a, s in zip(
        (x, gamma, beta, state, g, mask), (shard, rep, rep, rep, shard, shard), strict=True)))
    idx = np.flatnonzero(real)
    (_, (y1, new1)), (dx1, dgamma1, dbeta1) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(x_np[idx]), gamma, beta, state, jnp.asarray(g_np[idx]), None, None)
    err = {
        "y": float(np.max(np.abs(np.asarray(y)[idx] - y1))), "dx": float(np.max(np.abs(np.asarray(dx)[idx] - dx1))),
        "dx_padding": float(np.max(np.abs(np.asarray(dx)[~real]))),
        "dgamma": float(jnp.max(jnp.abs(dgamma - dgamma1))), "dbeta": float(jnp.max(jnp.abs(dbeta - dbeta1))),
        "running_mean": float(jnp.max(jnp.abs(new.running_mean - new1.running_mean))),
        "running_var": float(jnp.max(jnp.abs(new.running_var - new1.running_var))),
        "tracked": int(new.num_batches_tracked) - int(new1.num_batches_tracked),
    }
    with open(os.path.join(out, "jax_masked.json"), "w") as f_:
        json.dump(err, f_)

