"""The framework-native layers of multibn.layers against the frameworks' own BN layers.

* parity runs: a native layer and the multibn layer start from the same values, take five SGD steps on the
  same batches, and end with the same parameters, running statistics and num_batches_tracked
  (torch ``nn.BatchNorm1d/2d`` incl. ``momentum=None``; Gluon ``nn.BatchNorm`` with ``update="backward"``;
  Flax ``linen.BatchNorm`` where Flax is installed);
* state dicts and parameter files in both directions; rank checks; the textbook LeNet with BN, one training
  step with each framework's layer.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import multibn
from tests.helpers import mxnet_module, need

STEPS = 5
LR = 0.1


def batches(shape: tuple[int, ...], n: int = STEPS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (input, target) pairs, float32, inputs with per-channel offsets (channels on axis 1)."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    offset, scale = rng.normal(size=c).reshape(bshape), rng.uniform(0.5, 2.0, c).reshape(bshape)
    return [((rng.normal(size=shape) * scale + offset).astype(np.float32), rng.normal(size=shape).astype(np.float32))
            for _ in range(n)]


def test_layers_package_imports_no_framework() -> None:
    import subprocess
    import sys

    code = "import sys, multibn.layers; print(sorted(m for m in ('torch', 'jax', 'mxnet') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["torch", "jax"])
def test_layer_modules_import(module: str) -> None:
    need(module)
    layer = importlib.import_module(f"multibn.layers.{module}").BatchNorm
    assert "BatchNorm" in repr(layer(3))


# ==== PyTorch ========================================================================================================
torch_cases = [
    ("BatchNorm1d", (8, 3), 2, "torch", 0.1),
    ("BatchNorm1d", (4, 3, 5), 3, "torch", 0.1),
    ("BatchNorm1d", (8, 3), 2, "torch_cma", None),
    ("BatchNorm2d", (4, 3, 3, 2), 4, "torch", 0.1),
    ("BatchNorm2d", (4, 3, 3, 2), 4, "torch_cma", None),
    ("BatchNorm2d", (4, 3, 3, 2), None, "torch", 0.3),
]


@pytest.mark.torch
@pytest.mark.parametrize(("native_name", "shape", "num_dims", "convention", "momentum"), torch_cases,
                         ids=[f"{c[0]}-{len(c[1])}d-{c[3]}-{c[4]}" for c in torch_cases])
def test_torch_parity_sgd(native_name: str, shape: tuple, num_dims: int | None, convention: str,
                          momentum: float | None) -> None:
    torch = need("torch")
    from multibn.layers.torch import BatchNorm

    torch.manual_seed(0)
    native = getattr(torch.nn, native_name)(shape[1], momentum=momentum)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.normal_()
    ours = BatchNorm(shape[1], num_dims, convention=convention,
                     momentum=momentum if convention == "torch" else None)
    ours.load_state_dict(native.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in (native, ours)]
    for x, target in batches(shape):
        for layer, opt in zip((native, ours), opts, strict=True):
            opt.zero_grad()
            loss = ((layer(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2).mean()
            loss.backward()
            opt.step()
    want, got = native.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(ours.num_batches_tracked) == STEPS
    assert got["num_batches_tracked"].dtype == torch.long and got["num_batches_tracked"].shape == ()
    native.eval()
    ours.eval()
    x = torch.from_numpy(batches(shape, 1, seed=9)[0][0])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    np.testing.assert_allclose(ours(x).detach().numpy(), native(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # eval changes nothing


@pytest.mark.torch
@pytest.mark.parametrize(
    ("native_name", "num_dims", "shape"),
    [("BatchNorm1d", 2, (6, 4)), ("BatchNorm2d", 4, (2, 4, 3, 3)), ("BatchNorm3d", 5, (2, 4, 2, 2, 2))],
)
def test_torch_state_dict_round_trip(native_name: str, num_dims: int, shape: tuple) -> None:
    torch = need("torch")
    from multibn.layers.torch import BatchNorm

    x = torch.from_numpy(batches(shape, 1)[0][0])
    native = getattr(torch.nn, native_name)(4)
    native(x)  # moves the running statistics
    ours = BatchNorm(4, num_dims)
    ours.load_state_dict(native.state_dict())  # native -> multibn
    for _ in range(2):
        ours(x)
    back = getattr(torch.nn, native_name)(4)
    back.load_state_dict(ours.state_dict())  # multibn -> native
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 3
    back.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), back(x), rtol=1e-5, atol=1e-5)
    # a state dict from before num_batches_tracked existed (version 1) still loads, with the counter at 0
    old = OrderedDict((k, v) for k, v in native.state_dict().items() if k != "num_batches_tracked")
    old._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    fresh = BatchNorm(4, num_dims)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0


@pytest.mark.torch
def test_torch_rank_check_and_options() -> None:
    torch = need("torch")
    from multibn.layers.torch import BatchNorm

    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        BatchNorm(3, 4)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected 2D input \(got 4D input\)"):
        BatchNorm(3, 2)(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="num_dims"):
        BatchNorm(3, 1)
    any_rank = BatchNorm(3)
    for shape in [(4, 3), (2, 3, 4), (2, 3, 2, 2), (2, 3, 2, 1, 2)]:
        assert any_rank(torch.randn(shape)).shape == shape
    # affine=False and track_running_stats=False, as nn.BatchNorm2d: eval then uses the batch statistics
    ours = BatchNorm(3, 4, affine=False, track_running_stats=False)
    native = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    assert ours.weight is None and ours.bias is None and ours.running_mean is None
    assert set(ours.state_dict()) == set(native.state_dict()) == set()
    x = torch.randn(2, 3, 2, 2) * 3 + 1
    for mode in (True, False):
        ours.train(mode)
        native.train(mode)
        torch.testing.assert_close(ours(x), native(x), rtol=1e-5, atol=1e-5)
    # channels last, and the parameters follow .double()
    nhwc = BatchNorm(3, 4, axis=-1).double()
    y = nhwc(x.double().permute(0, 2, 3, 1))
    torch.testing.assert_close(y.permute(0, 3, 1, 2), torch.nn.BatchNorm2d(3).double()(x.double()))
    assert nhwc.running_mean.dtype == torch.float64


# ==== MXNet Gluon ===================================================================================================
def gluon_pair(mx: Any, channels: int, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    """A native gluon.nn.BatchNorm and a multibn one with update="backward", the same random gamma/beta."""
    from multibn.layers.gluon import BatchNorm

    native = mx.gluon.nn.BatchNorm(in_channels=channels, momentum=0.9, epsilon=1e-5)
    ours = BatchNorm(channels, update="backward", **kw)
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.normal(size=channels)
    for layer in (native, ours):
        layer.initialize()
        layer.gamma.set_data(mx.nd.array(gamma))
        layer.beta.set_data(mx.nd.array(beta))
    return native, ours


def assert_gluon_equal(native: Any, ours: Any, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for name in ("gamma", "beta", "running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours, name).data().asnumpy(), getattr(native, name).data().asnumpy(),
                                   rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.mxnet
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 2)], ids=["NC", "NCHW"])
def test_gluon_parity_sgd_update_backward(shape: tuple) -> None:
    mx = mxnet_module()
    native, ours = gluon_pair(mx, shape[1])
    trainers = [mx.gluon.Trainer(layer.collect_params(), "sgd", {"learning_rate": LR}) for layer in (native, ours)]
    for x, target in batches(shape):
        x, target = mx.nd.array(x), mx.nd.array(target)
        x.attach_grad()  # as the output of a previous layer (see test_gluon_gradients_when_input_needs_no_gradient)
        for layer, trainer in zip((native, ours), trainers, strict=True):
            with mx.autograd.train_mode():  # training forward outside record(): no backward, no update
                layer(x)
            with mx.autograd.record():  # a recorded forward never followed by backward: no update either
                layer(x * 2)
            with mx.autograd.record():
                loss = ((layer(x) - target) ** 2).mean()
            loss.backward()
            trainer.step(1)
        assert_gluon_equal(native, ours)
    assert int(ours.num_batches_tracked().asscalar()) == STEPS
    x = mx.nd.array(batches(shape, 1, seed=9)[0][0])  # eval: outside record(), running statistics
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.mxnet
def test_gluon_update_timing() -> None:
    """update="backward": no update without a backward; after one, visible at once (no race with MXNet's engine
    threads, which run Function.backward after loss.backward() returns); update="forward": at the forward."""
    mx = mxnet_module()
    from multibn.layers.gluon import BatchNorm

    native, ours = gluon_pair(mx, 3)
    x = mx.nd.array(batches((6, 3), 1, seed=3)[0][0])
    x.attach_grad()
    for layer in (native, ours):
        with mx.autograd.record():
            loss = (layer(x) ** 3).sum()
        assert np.array_equal(layer.running_mean.data().asnumpy(), np.zeros(3))
        assert np.array_equal(layer.running_var.data().asnumpy(), np.ones(3))
        loss.backward()
    assert_gluon_equal(native, ours)
    assert int(ours.num_batches_tracked().asscalar()) == 1
    eager = BatchNorm(3, update="forward")
    eager.initialize()
    with mx.autograd.record():
        eager(x)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(eager, name).data().asnumpy(), getattr(native, name).data().asnumpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    with mx.autograd.train_mode():  # training forward outside record(): update="forward" still updates
        eager(x)
    assert int(eager.num_batches_tracked().asscalar()) == 2


@pytest.mark.mxnet
def test_gluon_gradients_when_input_needs_no_gradient() -> None:
    mx = mxnet_module()
    native, ours = gluon_pair(mx, 3)
    x = mx.nd.array(batches((6, 3), 1, seed=5)[0][0])  # raw data: no attach_grad
    for layer in (native, ours):
        with mx.autograd.record():
            loss = (layer(x) ** 3).sum()
        loss.backward()
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(getattr(ours, name).grad().asnumpy(), getattr(native, name).grad().asnumpy(),
                                   rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.mxnet
def test_gluon_gradient_accumulation_grad_req_add() -> None:
    mx = mxnet_module()
    native, ours = gluon_pair(mx, 3)
    x = mx.nd.array(batches((6, 3), 1, seed=6)[0][0])
    x.attach_grad()
    for layer in (native, ours):
        layer.collect_params().setattr("grad_req", "add")
        layer.running_mean.grad_req = layer.running_var.grad_req = "null"
        for _ in range(2):
            with mx.autograd.record():
                loss = (layer(x) ** 3).sum()
            loss.backward()
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(getattr(ours, name).grad().asnumpy(), getattr(native, name).grad().asnumpy(),
                                   rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.mxnet
def test_gluon_parameter_files_interchange(tmp_path: Any) -> None:
    mx = mxnet_module()
    from multibn.layers.gluon import BatchNorm

    native, ours = gluon_pair(mx, 4)
    x = mx.nd.array(batches((2, 4, 3, 3), 1)[0][0])
    x.attach_grad()
    for layer in (native, ours):
        with mx.autograd.record():
            y = layer(x)
        y.backward()
    assert ours.running_mean.grad_req == ours.running_var.grad_req == "null"
    assert ours.gamma.grad_req == ours.beta.grad_req == "write"
    native.save_parameters(str(tmp_path / "native.params"))
    ours.save_parameters(str(tmp_path / "ours.params"))
    assert sorted(mx.nd.load(str(tmp_path / "ours.params"))) == sorted(mx.nd.load(str(tmp_path / "native.params")))
    loaded = BatchNorm(4, 4)
    loaded.load_parameters(str(tmp_path / "native.params"))  # native -> multibn
    back = mx.gluon.nn.BatchNorm(in_channels=4)
    back.load_parameters(str(tmp_path / "ours.params"))  # multibn -> native
    assert_gluon_equal(native, loaded, rtol=0, atol=0)
    assert_gluon_equal(ours, back, rtol=0, atol=0)
    np.testing.assert_allclose(loaded(x).asnumpy(), back(x).asnumpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        loaded(mx.nd.ones((2, 4)))


# ==== JAX =============================================================================================================
def test_jax_layer_pure_init_apply_under_jit_and_grad() -> None:
    jax = need("jax")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    bn = BatchNorm(3)
    params, state = bn.init()
    assert params["scale"].shape == params["bias"].shape == state.running_mean.shape == (3,)
    x = jnp.asarray(batches((4, 3, 2, 2), 1)[0][0]).transpose(0, 2, 3, 1)  # channels last, as Flax
    step = jax.jit(bn.apply, static_argnames="training")
    y, new = step(params, state, x, training=True)
    y_ref, new_ref = multibn.batch_norm(x, params["scale"], params["bias"], state, convention="flax")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    for a, b in zip(new, new_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(new.num_batches_tracked) == 1 and int(state.num_batches_tracked) == 0  # pure

    def loss(params: Any, state: Any, x: Any) -> Any:
        y, new = bn.apply(params, state, x, training=True)
        return jnp.sum(y ** 3), new

    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, x)
    assert set(grads) == {"scale", "bias"} and all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
    y_eval, same = step(params, new, x, training=False)
    assert same is not None and np.isfinite(np.asarray(y_eval)).all()
    plain = BatchNorm(3, affine=False, axis=1, convention="torch")
    p0, s0 = plain.init()
    assert p0 == {}
    assert plain.apply(p0, s0, x.transpose(0, 3, 1, 2), training=True)[0].shape == (4, 3, 2, 2)


def test_jax_layer_matches_flax_linen() -> None:
    jax = need("jax")
    flax_nn = need("flax.linen")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    shape = (6, 2, 2, 3)
    native = flax_nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, use_fast_variance=False)
    variables = native.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    rng = np.random.default_rng(1)
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
                 "batch_stats": variables["batch_stats"]}
    bn = BatchNorm(3)
    params, state = bn.from_flax(variables)

    def native_loss(params: Any, stats: Any, x: Any, t: Any) -> Any:
        y, upd = native.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.mean((y - t) ** 2), upd["batch_stats"]

    def our_loss(params: Any, state: Any, x: Any, t: Any) -> Any:
        y, new = bn.apply(params, state, x, training=True)
        return jnp.mean((y - t) ** 2), new

    native_params, stats = variables["params"], variables["batch_stats"]
    for x, t in batches((6, 3, 2, 2)):
        x, t = jnp.asarray(x).transpose(0, 2, 3, 1), jnp.asarray(t).transpose(0, 2, 3, 1)
        g, stats = jax.grad(native_loss, has_aux=True)(native_params, stats, x, t)
        native_params = jax.tree_util.tree_map(lambda p, g: p - LR * g, native_params, g)
        g, state = jax.grad(our_loss, has_aux=True)(params, state, x, t)
        params = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, g)
    got = BatchNorm.to_flax(params, state)
    want = {"params": native_params, "batch_stats": stats}
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(state.num_batches_tracked) == STEPS


# ==== the textbook LeNet with BN, one training step per framework =====================================================
LENET_X = np.random.default_rng(7).normal(size=(8, 1, 28, 28)).astype(np.float32)
LENET_Y = np.arange(8) % 10


@pytest.mark.torch
def test_lenet_torch() -> None:
    torch = need("torch")
    from torch import nn

    from multibn.layers.torch import BatchNorm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(), nn.Linear(84, 10),
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.9)
    loss = nn.functional.cross_entropy(net(torch.from_numpy(LENET_X)), torch.from_numpy(LENET_Y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = net.state_dict()
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "13.weight", "13.running_var"):
        assert not torch.equal(before[key], after[key]), key
    assert int(after["5.num_batches_tracked"]) == 1
    net.eval()
    assert net(torch.from_numpy(LENET_X)).shape == (8, 10)


@pytest.mark.mxnet
@pytest.mark.parametrize("update", ["forward", "backward"])
def test_lenet_gluon(update: str) -> None:
    mx = mxnet_module()
    from mxnet.gluon import nn

    from multibn.layers.gluon import BatchNorm

    net = nn.Sequential()
    net.add(
        nn.Conv2D(6, kernel_size=5), BatchNorm(6, num_dims=4, update=update), nn.Activation("sigmoid"),
        nn.AvgPool2D(pool_size=2, strides=2),
        nn.Conv2D(16, kernel_size=5), BatchNorm(16, num_dims=4, update=update), nn.Activation("sigmoid"),
        nn.AvgPool2D(pool_size=2, strides=2),
        nn.Dense(120), BatchNorm(120, num_dims=2, update=update), nn.Activation("sigmoid"),
        nn.Dense(84), BatchNorm(84, num_dims=2, update=update), nn.Activation("sigmoid"),
        nn.Dense(10),
    )
    net.initialize(mx.init.Xavier())
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.9})
    x, label = mx.nd.array(LENET_X), mx.nd.array(LENET_Y)
    with mx.autograd.record():
        loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()(net(x), label).mean()
    bn = net[1]
    gamma_before, mean_before = bn.gamma.data().asnumpy(), bn.running_mean.data().asnumpy()
    assert np.array_equal(mean_before, np.zeros(6)) == (update == "backward")
    loss.backward()
    trainer.step(1)
    assert np.isfinite(loss.asscalar())
    assert not np.array_equal(bn.gamma.data().asnumpy(), gamma_before)
    assert not np.array_equal(bn.running_mean.data().asnumpy(), np.zeros(6))
    assert int(net[12].num_batches_tracked().asscalar()) == 1
    assert net(x).shape == (8, 10)  # eval (outside record())


def test_lenet_jax() -> None:
    jax = need("jax")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    conv_dims = ("NCHW", "OIHW", "NCHW")
    bns = [BatchNorm(6, axis=1), BatchNorm(16, axis=1), BatchNorm(120), BatchNorm(84)]
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> Any:
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[1:])), jnp.float32)

    def dense(n_in: int, n_out: int) -> dict[str, Any]:
        return {"w": weights(n_out, n_in).T, "b": jnp.zeros(n_out)}

    params = {
        "conv1": {"w": weights(6, 1, 5, 5), "b": jnp.zeros(6)},
        "conv2": {"w": weights(16, 6, 5, 5), "b": jnp.zeros(16)},
        "fc1": dense(256, 120), "fc2": dense(120, 84), "fc3": dense(84, 10),
    }
    bn_params, states = zip(*(bn.init() for bn in bns), strict=True)
    params["bn"] = list(bn_params)

    def pool(x: Any) -> Any:
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4

    def net(params: Any, states: Any, x: Any, training: bool) -> tuple[Any, list]:
        new = []

        def bn(i: int, h: Any) -> Any:
            h, s = bns[i].apply(params["bn"][i], states[i], h, training=training)
            new.append(s)
            return jax.nn.sigmoid(h)

        for i, name in enumerate(("conv1", "conv2")):
            h = jax.lax.conv_general_dilated(x, params[name]["w"], (1, 1), "VALID", dimension_numbers=conv_dims)
            x = pool(bn(i, h + params[name]["b"].reshape(1, -1, 1, 1)))
        x = x.reshape(x.shape[0], -1)
        x = bn(2, x @ params["fc1"]["w"] + params["fc1"]["b"])
        x = bn(3, x @ params["fc2"]["w"] + params["fc2"]["b"])
        return x @ params["fc3"]["w"] + params["fc3"]["b"], new

    def loss(params: Any, states: Any, x: Any, y: Any) -> tuple[Any, list]:
        logits, new = net(params, states, x, True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)), new

    @jax.jit
    def step(params: Any, states: Any, x: Any, y: Any) -> tuple[Any, Any, list]:
        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params, states, x, y)
        return value, jax.tree_util.tree_map(lambda p, g: p - 0.9 * g, params, grads), new

    value, new_params, new_states = step(params, list(states), jnp.asarray(LENET_X), jnp.asarray(LENET_Y))
    assert np.isfinite(float(value))
    assert not np.array_equal(np.asarray(new_params["bn"][0]["scale"]), np.asarray(params["bn"][0]["scale"]))
    assert all(int(s.num_batches_tracked) == 1 for s in new_states)
    assert not np.array_equal(np.asarray(new_states[2].running_var), np.ones(120))
    logits, _ = jax.jit(net, static_argnums=3)(new_params, new_states, jnp.asarray(LENET_X), False)
    assert logits.shape == (8, 10)
