"""The Gluon layer's BN variants: batch renormalisation against :func:`multibn.batch_norm` over several steps
(outputs, the gradients MXNet's autograd gives, all six statistics), ghost batch norm against a float64 textbook
transcription per sub-batch, imperative and hybridized, under both update timings; parameter files; refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import multibn
from tests.helpers import mxnet_module

pytestmark = pytest.mark.mxnet  # run in the full environment only (see conftest.same_in_current)

CLIP = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.3}  # tight enough that every step clips some channel
STEPS = 4
SHAPE = (8, 3, 2, 2)


@pytest.fixture(scope="module")
def mx() -> Any:
    return mxnet_module()


def _batch(step: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """x whose channels drift in mean and scale from step to step (so r and d leave their clipping bounds), and
    the upstream gradient dy."""
    rng = np.random.default_rng(100 + step)
    c = np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    x = rng.normal(size=shape) * (1.0 + 0.7 * c + 0.3 * step) + (c - 1.0) * (1 + step)
    return x.astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _train_step(mx: Any, bn: Any, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """One recorded forward and backward of ``bn``: ``(y, dx, dgamma, dbeta)``."""
    xa = mx.nd.array(x)
    xa.attach_grad()
    with mx.autograd.record():
        y = bn(xa)
        loss = (y * mx.nd.array(dy)).sum()
    loss.backward()
    return y.asnumpy(), xa.grad.asnumpy(), bn.gamma.grad().asnumpy(), bn.beta.grad().asnumpy()


def _layer(mx: Any, hybridize: bool, **kw: Any) -> Any:
    from multibn.layers.gluon import BatchNorm

    bn = BatchNorm(SHAPE[1], len(SHAPE), **kw)
    bn.initialize()
    rng = np.random.default_rng(5)
    bn.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, SHAPE[1])))
    bn.beta.set_data(mx.nd.array(rng.normal(size=SHAPE[1])))
    if hybridize:
        bn.hybridize()
    return bn


RENORM_FIELDS = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")


@pytest.fixture(params=["host", "mxnet"])
def road(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The operator's two roads: the NumPy adapter on host views (CPU), and MXNet's own operators (off the CPU;
    here forced on the CPU, with inputs in MXNet's default layout)."""
    if request.param == "mxnet":
        from multibn.layers import _gluon_op

        monkeypatch.setattr(_gluon_op, "HOST_DEVICES", ())
    return request.param


@pytest.mark.parametrize("update", ["forward", "backward"])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_renorm_equals_batch_norm_over_steps(mx: Any, hybridize: bool, update: str, road: str) -> None:
    bn = _layer(mx, hybridize, renorm=True, renorm_clipping=CLIP, renorm_momentum=0.8, update=update)
    gamma, beta = bn.gamma.data().asnumpy(), bn.beta.data().asnumpy()
    state = multibn.init_state(SHAPE[1], renorm=True, backend="numpy")
    kw = {"convention": "gluon", "renorm": CLIP, "renorm_momentum": 0.8, "backend": "numpy"}
    for step in range(STEPS):
        x, dy = _batch(step)
        y, dx, dgamma, dbeta = _train_step(mx, bn, x, dy)
        y_ref, new = multibn.batch_norm(x, gamma, beta, state, **kw)
        dx_ref, dg_ref, db_ref = multibn.batch_norm_vjp(x, gamma, beta, state, dy, **kw)
        state = new
        for got, want, what in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (dgamma, dg_ref, "dgamma"),
                                (dbeta, db_ref, "dbeta")):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"step {step}: {what}")
        for name in RENORM_FIELDS:
            np.testing.assert_allclose(getattr(bn, name).data().asnumpy(), getattr(state, name), rtol=1e-5,
                                       atol=1e-6, err_msg=f"step {step}: {name}")
        assert int(bn.num_batches_tracked().asnumpy()[0]) == int(np.asarray(state.num_batches_tracked)) == step + 1
    # the corrections were clipped (else this would not test the clipping), and eval is plain BN
    assert not np.allclose(y, multibn.batch_norm(x, gamma, beta, convention="gluon", backend="numpy")[0], atol=1e-3)
    x, _ = _batch(STEPS)
    y_eval = bn(mx.nd.array(x)).asnumpy()
    want = multibn.batch_norm(x, gamma, beta, state, training=False, convention="gluon", backend="numpy")[0]
    np.testing.assert_allclose(y_eval, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(bn.running_mean.data().asnumpy(), state.running_mean, rtol=1e-5)  # eval moved none


def test_renorm_forward_without_backward_under_update_backward_moves_nothing(mx: Any) -> None:
    bn = _layer(mx, False, renorm=True, update="backward")
    with mx.autograd.record():
        bn(mx.nd.array(_batch(0)[0]))
    for name, init in zip(RENORM_FIELDS, (0, 1, 1, 0, 1), strict=True):
        np.testing.assert_array_equal(getattr(bn, name).data().asnumpy(), np.full(SHAPE[1], init, np.float32))


def _ghost_reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray, k: int, axis: int,
                     eps: float) -> tuple[np.ndarray, ...]:
    """Float64 textbook ghost BN, one sub-batch of ``k`` samples at a time: ``(y, dx, dgamma, dbeta, mean of the
    sub-batches' means, mean of their biased variances)``."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    g, b = gamma.astype(np.float64).reshape(shape), beta.astype(np.float64).reshape(shape)
    y, dx = np.empty_like(x), np.empty_like(x)
    dgamma, dbeta = np.zeros(x.shape[axis]), np.zeros(x.shape[axis])
    means, variances = [], []
    for start in range(0, x.shape[0], k):
        xs, dys = x[start:start + k], dy[start:start + k]
        n = xs.size // xs.shape[axis]
        mean, var = xs.mean(axis=red, keepdims=True), xs.var(axis=red, keepdims=True)
        s = 1 / np.sqrt(var + eps)
        xhat = (xs - mean) * s
        y[start:start + k] = g * xhat + b
        sum_dy, sum_dy_xhat = dys.sum(axis=red, keepdims=True), (dys * xhat).sum(axis=red, keepdims=True)
        dx[start:start + k] = g * s / n * (n * dys - sum_dy - xhat * sum_dy_xhat)
        dgamma += sum_dy_xhat.ravel()
        dbeta += sum_dy.ravel()
        means.append(mean.ravel())
        variances.append(var.ravel())
    return y, dx, dgamma, dbeta, np.mean(means, axis=0), np.mean(variances, axis=0)


@pytest.mark.parametrize("update", ["forward", "backward"])
@pytest.mark.parametrize("axis", [1, 3])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_ghost_equals_per_sub_batch_textbook(mx: Any, hybridize: bool, axis: int, update: str, road: str) -> None:
    from multibn.layers.gluon import BatchNorm

    k, channels = 2, 3
    shape = (8, 2, 2, channels) if axis == 3 else SHAPE
    bn = BatchNorm(channels, 4, axis=axis, virtual_batch_size=k, update=update)
    bn.initialize()
    rng = np.random.default_rng(9)
    gamma, beta = rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.normal(size=channels).astype(np.float32)
    bn.gamma.set_data(mx.nd.array(gamma))
    bn.beta.set_data(mx.nd.array(beta))
    if hybridize:
        bn.hybridize()
    rmean, rvar = np.zeros(channels), np.ones(channels)
    for step in range(3):
        x = np.random.default_rng(step).normal(size=shape).astype(np.float32)
        x = x * (1 + np.arange(shape[0]).reshape(-1, 1, 1, 1)) + np.arange(shape[0]).reshape(-1, 1, 1, 1)
        x = x.astype(np.float32)  # sub-batches with their own means and scales
        dy = np.random.default_rng(50 + step).normal(size=shape).astype(np.float32)
        got = _train_step(mx, bn, x, dy)
        *want, mean, var = _ghost_reference(x, gamma, beta, dy, k, axis, bn.eps)
        for g, w, what in zip(got, want, ("y", "dx", "dgamma", "dbeta"), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {step}: {what}")
        rmean, rvar = 0.9 * rmean + 0.1 * mean, 0.9 * rvar + 0.1 * var  # gluon: momentum 0.9, biased variance
        np.testing.assert_allclose(bn.running_mean.data().asnumpy(), rmean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.data().asnumpy(), rvar, rtol=1e-5, atol=1e-6)
    # plain BN would differ: the sub-batches' statistics differ
    assert not np.allclose(got[0], multibn.batch_norm(x, gamma, beta, convention="gluon", axis=axis,
                                                      backend="numpy")[0], atol=1e-2)
    # eval is plain BN with the running statistics
    y_eval = bn(mx.nd.array(x)).asnumpy()
    state = multibn.BNState(rmean.astype(np.float32), rvar.astype(np.float32), np.zeros((), np.int64))
    np.testing.assert_allclose(y_eval, multibn.batch_norm(x, gamma, beta, state, training=False, convention="gluon",
                                                          axis=axis, backend="numpy")[0], rtol=1e-4, atol=1e-4)


def test_renorm_parameter_file_round_trips(mx: Any, tmp_path: Path) -> None:
    from multibn.layers.gluon import BatchNorm

    bn = _layer(mx, True, renorm=True, renorm_clipping=CLIP)
    for step in range(2):
        _train_step(mx, bn, *_batch(step))
    params = {n[len(bn.prefix):]: p.data().asnumpy() for n, p in bn.collect_params().items()}
    assert set(params) == {"gamma", "beta", "running_mean", "running_var", "running_std", "renorm_mean",
                           "renorm_std"}
    assert {n: bn.collect_params()[bn.prefix + n].grad_req for n in RENORM_FIELDS} == dict.fromkeys(
        RENORM_FIELDS, "null")
    assert not np.allclose(params["renorm_mean"], 0) and not np.allclose(params["running_std"], 1)
    path = str(tmp_path / "renorm.params")
    bn.save_parameters(path)
    other = BatchNorm(SHAPE[1], len(SHAPE), renorm=True, renorm_clipping=CLIP)
    other.initialize()
    other.load_parameters(path)
    for name, value in params.items():
        np.testing.assert_array_equal(getattr(other, name).data().asnumpy(), value, err_msg=name)
    x, dy = _batch(5)
    np.testing.assert_array_equal(other(mx.nd.array(x)).asnumpy(), bn(mx.nd.array(x)).asnumpy())
    for got, want in zip(_train_step(mx, other, x, dy), _train_step(mx, bn, x, dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # the renorm statistics were loaded too


def test_ghost_layer_file_is_gluon_batchnorms(mx: Any, tmp_path: Path) -> None:
    """Ghost BN keeps no extra statistic: its files load into gluon.nn.BatchNorm, whose eval then agrees."""
    bn = _layer(mx, False, virtual_batch_size=4)
    _train_step(mx, bn, *_batch(0))
    path = str(tmp_path / "ghost.params")
    bn.save_parameters(path)
    native = mx.gluon.nn.BatchNorm(in_channels=SHAPE[1])
    native.load_parameters(path)
    x = mx.nd.array(_batch(1)[0])
    np.testing.assert_allclose(native(x).asnumpy(), bn(x).asnumpy(), rtol=1e-5, atol=1e-5)


def test_gluon_form_takes_the_variants(mx: Any) -> None:
    """gluon.nn.BatchNorm's form (deferred channels, keywords) takes the same arguments."""
    from multibn.layers import gluon as nn

    bn = nn.BatchNorm(renorm=True, renorm_clipping=CLIP, renorm_momentum=0.8, epsilon=1e-3)
    bn.initialize()
    x, dy = _batch(0)
    _train_step(mx, bn, x, dy)
    assert bn.running_std.shape == (SHAPE[1],) and "renorm=True" in repr(bn)
    state = multibn.batch_norm(x, np.ones(3, np.float32), np.zeros(3, np.float32),
                               multibn.init_state(3, renorm=True, backend="numpy"), convention="gluon", eps=1e-3,
                               renorm=CLIP, renorm_momentum=0.8, backend="numpy")[1]
    for name in RENORM_FIELDS:
        np.testing.assert_allclose(getattr(bn, name).data().asnumpy(), getattr(state, name), rtol=1e-5, atol=1e-6)
    ghost = nn.BatchNorm(axis=1, virtual_batch_size=2)
    ghost.initialize()
    y = _train_step(mx, ghost, x, dy)[0]
    want = _ghost_reference(x, np.ones(3), np.zeros(3), dy, 2, 1, 1e-5)[0]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_refusals(mx: Any) -> None:
    from multibn.layers.gluon import BatchNorm

    with pytest.raises(ValueError, match="virtual_batch_size with renorm"):
        BatchNorm(3, 4, renorm=True, virtual_batch_size=2)
    with pytest.raises(ValueError, match="renorm=True with use_global_stats=True"):
        BatchNorm(3, 4, renorm=True, use_global_stats=True)
    with pytest.raises(ValueError, match="virtual_batch_size=2 with use_global_stats=True"):
        BatchNorm(3, 4, virtual_batch_size=2, use_global_stats=True)
    with pytest.raises(ValueError, match="unknown keys"):
        BatchNorm(3, 4, renorm=True, renorm_clipping={"rmaxx": 2.0})
    with pytest.raises(ValueError, match="renorm_momentum"):
        BatchNorm(3, 4, renorm=True, renorm_momentum=1.5)
    with pytest.raises(ValueError, match="virtual_batch_size must be None or a positive int"):
        BatchNorm(3, 4, virtual_batch_size=0)
    with pytest.raises(ValueError, match="channel axis must not be 0"):
        BatchNorm(3, 4, axis=0, virtual_batch_size=2)
    bn = _layer(mx, True, virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size=3 must divide the batch size"):
        _train_step(mx, bn, *_batch(0))
    np.testing.assert_array_equal(bn.running_mean.data().asnumpy(), np.zeros(3))  # the refused call moved nothing
    assert int(bn.num_batches_tracked().asnumpy()[0]) == 0
    bn(mx.nd.array(_batch(0)[0]))  # eval is plain BN: any batch size


def test_renorm_export_and_import(mx: Any, tmp_path: Path) -> None:
    """A hybridized renorm layer exports its node with the three extra auxiliary states; the imported symbol gives
    the same eval output."""
    bn = _layer(mx, True, renorm=True, renorm_clipping=CLIP)
    _train_step(mx, bn, *_batch(0))
    x = mx.nd.array(_batch(1)[0])
    want = bn(x).asnumpy()
    prefix = str(tmp_path / "renorm")
    bn.export(prefix)
    loaded = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    np.testing.assert_allclose(loaded(x).asnumpy(), want, rtol=1e-6, atol=1e-6)


def test_recompute_statistics_keeps_running_std_agreeing(mx: Any) -> None:
    from multibn.layers.gluon import recompute_statistics

    bn = _layer(mx, False, renorm=True)
    xs = [_batch(s)[0] for s in range(2)]
    recompute_statistics(bn, [mx.nd.array(x) for x in xs], progress=False)
    every = np.concatenate(xs).astype(np.float64)
    var = every.var(axis=(0, 2, 3))
    np.testing.assert_allclose(bn.running_var.data().asnumpy(), var, rtol=1e-5)
    np.testing.assert_allclose(bn.running_std.data().asnumpy(), np.sqrt(var + bn.eps), rtol=1e-5)
    np.testing.assert_array_equal(bn.renorm_mean.data().asnumpy(), np.zeros(3))  # what renorm tracks: as it was
