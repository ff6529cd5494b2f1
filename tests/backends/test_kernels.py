"""Each adapter's fast kernels against the generic array-API kernels of ``base.Backend`` on the same backend.

Every kernel an adapter overrides must compute the same quantity as the generic one: random inputs, data with a
large offset (mean 1000, std 3: where a one-pass E[x^2] - E[x]^2 would lose every digit), NCHW, 2-D, channel-last
and channel-first layouts, float32, float16 and float64, and chunk sizes small enough that the chunked loops run
several times with a ragged last chunk. Then the whole op: under autograd (torch, mxnet), jit and grad (jax).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import multibn
from multibn.backends import get_backend
from multibn.backends.base import Backend
from tests.helpers import jax_float64, need, to_numpy

KERNELS = ("channel_sum", "channel_dev_sums", "scale_shift", "backward_sums", "backward_apply")
#: (shape, channel axis)
LAYOUTS = [((6, 5, 7, 3), 1), ((37, 4), 1), ((5, 3, 4, 6), 3), ((4, 6, 5), 0), ((1, 3, 2, 2), 1), ((130, 3), 1),
           ((2, 64, 5), 2)]


def overridden(be: Backend) -> list[str]:
    return [k for k in KERNELS if getattr(type(be), k) is not getattr(Backend, k)]


def test_fast_paths_exist() -> None:
    """The adapters that have fast paths still have them (a refactor must not silently drop them)."""
    for name in ("numpy", "torch", "mxnet"):
        try:
            be = get_backend(name)
        except ImportError:
            continue
        assert set(overridden(be)) == set(KERNELS), name


@pytest.fixture(params=[None, 7], ids=["chunk-default", "chunk-7"])
def chunk(request: pytest.FixtureRequest, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 7, a chunk holds one (C, Q) slab at most: several chunks and a ragged last one. Either way the fast
    paths run at every size (``_SMALL`` 0: torch keeps tensors under 65536 elements on the generic ops)."""
    mod = importlib.import_module(f"multibn.backends.{backend}")
    if request.param is not None and hasattr(mod, "_CHUNK"):
        monkeypatch.setattr(mod, "_CHUNK", request.param)
    if hasattr(mod, "_SMALL"):
        monkeypatch.setattr(mod, "_SMALL", 0)


def _inputs(be: Backend, shape: tuple[int, ...], axis: int, dtype: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sdt = "float64" if dtype == "float64" else "float32"
    c = shape[axis]
    bshape = tuple(c if i == axis else 1 for i in range(len(shape)))

    def arr(a: np.ndarray, dt: str) -> object:
        return be.asarray(a.astype(dt), dtype=dt)

    x = rng.standard_normal(shape) * 3 + 1000
    return {
        "x": arr(x, dtype), "dy": arr(rng.standard_normal(shape), dtype),
        "mean": arr(x.astype(dtype).astype(np.float64).mean(axis=tuple(i for i in range(len(shape)) if i != axis))
                    .reshape(bshape), sdt),
        "a": arr(rng.standard_normal(bshape), sdt), "b": arr(rng.standard_normal(bshape), sdt),
        "c": arr(rng.standard_normal(bshape), sdt), "sdt": be.dtype(sdt),
        "axes": tuple(i for i in range(len(shape)) if i != axis),
    }


def _call(be: Backend, impl: type, kernel: str, d: dict) -> tuple:
    f = getattr(impl, kernel)
    args = {
        "channel_sum": (d["x"], d["axes"], d["sdt"]),
        "channel_dev_sums": (d["x"], d["mean"], d["axes"]),
        "scale_shift": (d["x"], d["a"], d["c"]),
        "backward_sums": (d["dy"], d["x"], d["mean"], d["axes"]),
        "backward_apply": (d["dy"], d["x"], d["mean"], d["a"], d["b"], d["c"]),
    }[kernel]
    out = f(be, *args)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=[f"{s}-axis{a}" for s, a in LAYOUTS])
def test_kernel_matches_generic(backend: str, chunk: None, shape: tuple, axis: int, dtype: str) -> None:
    be = get_backend(backend)
    if not overridden(be):
        pytest.skip(f"the {backend} adapter overrides no kernel")
    with jax_float64(backend, dtype):  # float64 on jax: with x64 on for this test
        d = _inputs(be, shape, axis, dtype, seed=sum(shape))
        results = {kernel: (_call(be, type(be), kernel, d), _call(be, Backend, kernel, d)) for kernel in overridden(be)}
    for kernel, (fast, generic) in results.items():
        for f, g in zip(fast, generic, strict=True):
            assert be.dtype_name(f) == be.dtype_name(g), kernel
            assert tuple(f.shape) == tuple(g.shape), kernel
            f64, g64 = to_numpy(f).astype(np.float64), to_numpy(g).astype(np.float64)
            scale = max(np.abs(g64).max(), 1e-30)
            # outputs in x's dtype may differ by one rounding of that dtype (fused multiply-add, op order)
            tol = {"float16": 2e-3, "float32": 2e-6, "float64": 1e-13}[be.dtype_name(f)]
            np.testing.assert_allclose(f64 / scale, g64 / scale, rtol=0, atol=tol, err_msg=f"{kernel} {dtype}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_offset_data_variance_is_accurate(backend: str, chunk: None, dtype: str) -> None:
    """Data far from zero: the batch variance stays accurate (two-pass), through the whole op."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 3, 5, 5)) * 2 + 1000).astype(dtype)
    state = multibn.init_state(3, backend=backend)
    _, new = multibn.batch_norm(x, state=state, backend=backend, momentum=1.0)
    ref = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(to_numpy(new.running_var), ref, rtol=1e-3 if dtype == "float16" else 1e-4)


@pytest.mark.torch
def test_torch_autograd_with_fast_kernels() -> None:
    """torch: autograd (fast kernels) equals batch_norm_vjp on tensors requiring grad (generic kernels), and
    double backward (create_graph) still works through the generic path."""
    torch = need("torch")
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((8, 4, 5, 5)) + 50, dtype=torch.float32, requires_grad=True)
    g = torch.tensor(rng.standard_normal(4) + 1, dtype=torch.float32, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    dy = torch.tensor(rng.standard_normal((8, 4, 5, 5)), dtype=torch.float32)
    y, _ = multibn.batch_norm(x, g, b)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    rx, rg, rb = multibn.batch_norm_vjp(x, g, b, None, dy)
    for got, ref in ((dx, rx), (dg, rg), (db, rb)):
        np.testing.assert_allclose(got.numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    y, _ = multibn.batch_norm(x, g, b)
    (dx,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
    (ddg,) = torch.autograd.grad(dx.square().sum(), g)
    assert torch.isfinite(ddg).all()


def test_jax_jit_and_grad_with_kernels() -> None:
    jax = need("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 4, 5, 5)) + 50, dtype=jnp.float32)
    g = jnp.asarray(rng.standard_normal(4) + 1, dtype=jnp.float32)
    b = jnp.zeros(4, dtype=jnp.float32)
    dy = jnp.asarray(rng.standard_normal((8, 4, 5, 5)), dtype=jnp.float32)

    def loss(x: object, g: object, b: object) -> object:
        return jnp.vdot(multibn.batch_norm(x, g, b, axis=1)[0], dy)

    eager = jax.grad(loss, argnums=(0, 1, 2))(x, g, b)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, g, b)
    ref = multibn.batch_norm_vjp(np.asarray(x), np.asarray(g), np.asarray(b), None, np.asarray(dy), axis=1)
    for e, j, r in zip(eager, jitted, ref, strict=True):
        np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(e), r, rtol=1e-4, atol=1e-4)


@pytest.mark.mxnet
def test_mxnet_autograd_with_fast_kernels() -> None:
    need("mxnet")
    be = get_backend("mxnet")
    import mxnet as mx

    rng = np.random.default_rng(2)
    xn = (rng.standard_normal((8, 4, 5, 5)) + 50).astype(np.float32)
    dyn = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
    x, dy = be.asarray(xn), be.asarray(dyn)
    g, b = be.asarray(np.full(4, 1.5, np.float32)), be.asarray(np.zeros(4, np.float32))
    for a in (x, g, b):
        a.attach_grad()
    with mx.autograd.record():
        y, _ = multibn.batch_norm(x, g, b, convention="gluon")
    y.backward(dy)
    ref = multibn.batch_norm_vjp(xn, np.full(4, 1.5, np.float32), np.zeros(4, np.float32), None, dyn,
                                 convention="gluon")
    for got, r in zip((x.grad, g.grad, b.grad), ref, strict=True):
        np.testing.assert_allclose(got.asnumpy(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 3, 4, 5, 6)], ids=["nchw", "ncdhw"])
def test_torch_channels_last_takes_the_fast_kernels(monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: str
                                                    ) -> None:
    """channels_last (and channels_last_3d) tensors run the torch fast kernels, not the generic ops, give what the
    generic ops give on the same values, and their full-size outputs keep the memory format."""
    torch = need("torch")
    mod = importlib.import_module("multibn.backends.torch")
    monkeypatch.setattr(mod, "_SMALL", 0)
    monkeypatch.setattr(mod, "_CHUNK", 50)  # several chunks and a ragged last one
    be = get_backend("torch")
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    d = _inputs(be, shape, 1, dtype, seed=5)
    generic = {k: _call(be, Backend, k, d) for k in KERNELS}
    d = dict(d, x=d["x"].contiguous(memory_format=fmt), dy=d["dy"].contiguous(memory_format=fmt))

    def refuse(*args: object) -> None:
        raise AssertionError("the generic kernel ran")

    for k in KERNELS:
        monkeypatch.setattr(Backend, k, refuse)
    for k in KERNELS:
        fast = _call(be, type(be), k, d)
        for f, g in zip(fast, generic[k], strict=True):
            if f.shape == d["x"].shape:
                assert f.is_contiguous(memory_format=fmt), k
            f64, g64 = f.double().numpy(), g.double().numpy()
            scale = max(np.abs(g64).max(), 1e-30)
            tol = {"float16": 2e-3, "float32": 2e-6}[be.dtype_name(f)]
            np.testing.assert_allclose(f64 / scale, g64 / scale, rtol=0, atol=tol, err_msg=f"{k} {dtype}")


@pytest.mark.torch
def test_torch_scratch_buffers_are_kept() -> None:
    """The chunk buffers are this thread's, reused by the next call (no page faults on a fresh block each call),
    and a second call with other values gives its own answer."""
    torch = need("torch")
    mod = importlib.import_module("multibn.backends.torch")
    be = get_backend("torch")
    x = torch.randn(8, 16, 32, 32)
    center = torch.zeros(1, 16, 1, 1)
    s1, q1 = be.channel_dev_sums(x, center, (0, 2, 3))
    bufs = dict(mod._SCRATCH.bufs)
    s2, _ = be.channel_dev_sums(x + 1, center, (0, 2, 3))
    assert bufs and {k: v.data_ptr() for k, v in mod._SCRATCH.bufs.items()} == {
        k: v.data_ptr() for k, v in bufs.items()}
    torch.testing.assert_close(s2, s1 + 8 * 32 * 32, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(q1, x.square().sum((0, 2, 3)), rtol=1e-5, atol=1e-3)


@pytest.mark.torch
def test_torch_layer_channels_last_gradients() -> None:
    """multibn's layer on a channels_last input: the same y, dx, dgamma, dbeta as on the contiguous input (to
    rounding), and dx and y channels_last, as the native layer gives."""
    torch = need("torch")
    from multibn.layers.torch import BatchNorm

    rng = np.random.default_rng(4)
    x0 = torch.tensor(rng.standard_normal((8, 16, 16, 16)) * 2 + 3, dtype=torch.float32)
    dy0 = torch.tensor(rng.standard_normal((8, 16, 16, 16)), dtype=torch.float32)
    out = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = BatchNorm(16, 4)
        x = x0.contiguous(memory_format=fmt).requires_grad_(True)
        y = layer(x)
        dx, dg, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy0.contiguous(memory_format=fmt))
        out.append((y, dx, dg, db))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out[1][0].is_contiguous(memory_format=torch.channels_last)
    assert out[1][1].is_contiguous(memory_format=torch.channels_last)
