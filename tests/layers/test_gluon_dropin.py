"""multibn.layers.gluon.BatchNorm with gluon.nn.BatchNorm's signature (issue 21, item 6): Gluon's keywords with
their meanings, deferred ``in_channels``, and the textbook's concise LeNet with BN (``nn.BatchNorm()`` after each
layer) run with one import changed, against ``gluon.nn.BatchNorm`` doing the same thing."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import LENET_X, LENET_Y, mxnet_module

pytestmark = pytest.mark.mxnet  # run in the full environment only (see conftest.same_in_current)

TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32: MXNet's kernel and multibn's round differently


@pytest.fixture(scope="module")
def mx() -> Any:
    return mxnet_module()


@pytest.fixture(params=[False, True], ids=["nd", "np"])
def interface(request: pytest.FixtureRequest, mx: Any) -> Iterator[bool]:
    """MXNet's legacy NDArray interface, or its NumPy one (``npx.set_np()``, as the book's MXNet code runs)."""
    if request.param:
        mx.npx.set_np()
    try:
        yield request.param
    finally:
        if request.param:
            mx.npx.reset_np()


def as_numpy(a: Any) -> np.ndarray:
    return a.asnumpy()


def test_every_gluon_argument_is_a_keyword_with_gluons_default(mx: Any) -> None:
    import multibn.layers.gluon as mnn

    native = inspect.signature(mx.gluon.nn.BatchNorm.__init__).parameters
    ours = inspect.signature(mnn.BatchNorm.__init__).parameters
    conv_defaults = {"momentum": 0.9, "epsilon": 1e-5}  # None in ours: the gluon convention's, the same values
    for name, p in native.items():
        if name in ("self", "kwargs"):
            continue
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default == p.default or (ours[name].default is None and conv_defaults[name] == p.default)
    layer = mnn.BatchNorm()
    assert (layer.momentum, layer.eps, layer.axis, layer.num_features) == (0.9, 1e-5, 1, 0)


CASES = [
    {},
    {"scale": False},
    {"center": False},
    {"use_global_stats": True},
    {"axis": 3, "epsilon": 1e-3, "momentum": 0.8},
    {"axis": -1, "center": False, "scale": False, "use_global_stats": True},
    {"in_channels": 3, "gamma_initializer": "zeros", "beta_initializer": "ones",
     "running_mean_initializer": "ones", "running_variance_initializer": "zeros"},
]


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("kw", CASES, ids=str)
def test_gluon_arguments_act_as_in_gluon(mx: Any, kw: dict, hybridize: bool) -> None:
    """Deferred channels (or in_channels), then two recorded steps from set weights and statistics: outputs, input
    and parameter gradients, the running statistics and the stored parameters equal gluon.nn.BatchNorm's."""
    import multibn.layers.gluon as mnn

    rng = np.random.default_rng(0)
    x = mx.nd.array(rng.normal(size=(4, 3, 2, 3) if kw.get("axis", 1) == 1 else (4, 2, 3, 3)) * 2 + 1)
    results = []
    for nn in (mx.gluon.nn, mnn):
        bn = nn.BatchNorm(**kw)
        bn.initialize()
        if hybridize:
            bn.hybridize()
        with mx.autograd.pause():
            bn(x)  # infers the channels (deferred), as Gluon
        values = {"gamma": [1.5, 0.5, 2.0], "beta": [0.1, -0.2, 0.3], "running_mean": [0.2, 0.4, -0.1],
                  "running_var": [1.5, 2.0, 0.7]}
        if "in_channels" not in kw:
            for name, value in values.items():
                getattr(bn, name).set_data(mx.nd.array(value))
        out = []
        for step in range(2):
            xs = x * (step + 1)
            xs.attach_grad()
            with mx.autograd.record():
                y = bn(xs)
            y.backward(mx.nd.array(np.random.default_rng(10 + step).normal(size=y.shape)))
            params = {n: as_numpy(getattr(bn, n).data()) for n in values}
            grads = {n: as_numpy(getattr(bn, n).grad()) for n in ("gamma", "beta")
                     if getattr(bn, n).grad_req != "null"}
            out.append((as_numpy(y), as_numpy(xs.grad), params, grads))
        results.append(out)
    for (y0, dx0, p0, g0), (y1, dx1, p1, g1) in zip(*results, strict=True):
        np.testing.assert_allclose(y1, y0, **TOL)
        np.testing.assert_allclose(dx1, dx0, **TOL)
        assert set(g1) == set(g0)
        for name in g0:
            np.testing.assert_allclose(g1[name], g0[name], **TOL, err_msg=name)
        for name in p0:
            if name == "gamma" and kw.get("scale") is False:
                continue  # MXNet writes 1 into a fixed gamma at each forward; multibn leaves it (docstring)
            np.testing.assert_allclose(p1[name], p0[name], **TOL, err_msg=name)


def test_the_two_forms_told_apart(mx: Any) -> None:
    from multibn.layers.gluon import BatchNorm

    textbook = BatchNorm(6, 4)
    assert (textbook.num_features, textbook.num_dims) == (6, 4)
    assert BatchNorm(in_channels=6).num_features == 6 and BatchNorm(6, in_channels=6).num_features == 6
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        textbook.initialize()
        textbook(mx.nd.ones((2, 6)))
    with pytest.raises(TypeError, match=r"keywords here: BatchNorm\(axis=1, momentum=0.9\)"):
        BatchNorm(1, 0.9)  # gluon.nn.BatchNorm(axis, momentum) by position
    with pytest.raises(ValueError, match="num_features and in_channels are the same argument"):
        BatchNorm(6, in_channels=4)
    with pytest.raises(ValueError, match="epsilon and eps are the same argument"):
        BatchNorm(epsilon=1e-3, eps=1e-5)
    with pytest.raises(ValueError, match="in_channels must be a non-negative int"):
        BatchNorm(in_channels=-1)


# ---- the textbook's concise LeNet with BN, one import changed --------------------------------------------------------
def concise_bn_lenet(nn: Any) -> Any:
    """d2l's concise MXNet LeNet with batch norm, as the book writes it against ``from mxnet.gluon import nn``."""
    net = nn.Sequential()
    net.add(nn.Conv2D(6, kernel_size=5), nn.BatchNorm(), nn.Activation("sigmoid"),
            nn.AvgPool2D(pool_size=2, strides=2),
            nn.Conv2D(16, kernel_size=5), nn.BatchNorm(), nn.Activation("sigmoid"),
            nn.AvgPool2D(pool_size=2, strides=2),
            nn.Dense(120), nn.BatchNorm(), nn.Activation("sigmoid"),
            nn.Dense(84), nn.BatchNorm(), nn.Activation("sigmoid"),
            nn.Dense(10))
    return net


@pytest.mark.filterwarnings("ignore:All children of this Sequential")  # the book's nn.Sequential, hybridized
@pytest.mark.parametrize("hybridize", [False, True])
def test_concise_lenet_runs_with_one_import_changed(mx: Any, interface: bool, hybridize: bool,
                                                    tmp_path: Path) -> None:
    """``from multibn.layers import gluon as nn`` in place of ``from mxnet.gluon import nn``; the weights of one
    net saved and loaded into the other (the files interchange, deferred shapes and all); three SGD steps give the
    same losses, gradients and running statistics, and the same eval outputs."""
    import multibn.layers.gluon as mnn

    array = mx.np.array if interface else mx.nd.array
    x, y = array(LENET_X), array(LENET_Y.astype(np.float32))
    mx.random.seed(0)
    nets = [concise_bn_lenet(mx.gluon.nn), concise_bn_lenet(mnn)]
    native, ours = nets
    assert [type(b).__module__ for b in ours._children.values() if type(b).__name__ == "BatchNorm"] == \
        ["multibn.layers.gluon"] * 4
    native.initialize(init=mx.init.Xavier())
    native(x)
    native.save_parameters(str(tmp_path / "native.params"))
    ours.load_parameters(str(tmp_path / "native.params"))  # deferred BN parameters take the file's shapes
    loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    trainers = []
    for net in nets:
        if hybridize:
            net.hybridize()
        trainers.append(mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.9}))
    for _ in range(3):
        values = []
        for net, trainer in zip(nets, trainers, strict=True):
            with mx.autograd.record():
                lv = loss(net(x), y)
            lv.backward()
            grads = {k: as_numpy(p.grad()) for k, p in net._collect_params_with_prefix().items()
                     if p.grad_req != "null"}
            trainer.step(x.shape[0])
            state = {k: as_numpy(p.data()) for k, p in net._collect_params_with_prefix().items()}
            values.append((as_numpy(lv), grads, state))
        (l0, g0, s0), (l1, g1, s1) = values
        np.testing.assert_allclose(l1, l0, **TOL)
        assert set(g1) == set(g0) and set(s1) == set(s0)
        assert {k for k in s0 if k.endswith(("running_mean", "running_var"))} == {
            f"{i}.{n}" for i in (1, 5, 9, 12) for n in ("running_mean", "running_var")}
        for k in g0:  # atol: the biases before a BN have gradient 0 in exact arithmetic, rounding noise here
            np.testing.assert_allclose(g1[k], g0[k], rtol=1e-3, atol=1e-4, err_msg=k)
        for k in s0:
            np.testing.assert_allclose(s1[k], s0[k], rtol=1e-3, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(as_numpy(ours(x)), as_numpy(native(x)), rtol=1e-3, atol=1e-5)
    ours.save_parameters(str(tmp_path / "ours.params"))
    back = concise_bn_lenet(mx.gluon.nn)
    back.load_parameters(str(tmp_path / "ours.params"))  # and back into gluon.nn.BatchNorm
    np.testing.assert_allclose(as_numpy(back(x)), as_numpy(ours(x)), rtol=1e-5, atol=1e-6)
