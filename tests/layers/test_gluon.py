"""multibn's Gluon BatchNorm as a HybridBlock: hybridized nets against the same nets with ``gluon.nn.BatchNorm``
(training steps, eval, chained backward-time updates), export/import, and MXNet's NumPy interface (``mx.np``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import LENET_X, LENET_Y, PARITY_LR, PARITY_STEPS, batches, mxnet_module

pytestmark = pytest.mark.mxnet  # run in the full environment only (see conftest.same_in_current)

LR = 0.5


@pytest.fixture(scope="module")
def mx() -> Any:
    return mxnet_module()


@pytest.fixture
def np_mode(mx: Any) -> Iterator[None]:
    """MXNet's NumPy interface on for one test (it is process-global)."""
    mx.npx.set_np()
    try:
        yield
    finally:
        mx.npx.reset_np()


def lenet_like(mx: Any, bn: Any) -> Any:
    """conv -> BN -> sigmoid -> pool -> dense -> BN(2-D) -> sigmoid -> dense, as a HybridSequential."""
    nn = mx.gluon.nn
    net = nn.HybridSequential()
    # 16 channels: oneDNN keeps the convolution's output in a blocked layout, which the layer must read correctly
    net.add(nn.Conv2D(16, 3, in_channels=2, use_bias=False), bn(16), nn.Activation("sigmoid"), nn.AvgPool2D(2),
            nn.Flatten(), nn.Dense(6, in_units=16 * 3 * 3, use_bias=False), bn(6), nn.Activation("sigmoid"),
            nn.Dense(3, in_units=6))
    return net


class Wrapped:
    """A custom HybridBlock holding the BN layer in its own hybrid_forward (not a Sequential)."""

    @staticmethod
    def make(mx: Any, bn: Any) -> Any:
        nn = mx.gluon.nn

        class Net(mx.gluon.HybridBlock):
            def __init__(self) -> None:
                super().__init__()
                with self.name_scope():
                    self.dense = nn.Dense(5, in_units=4, use_bias=False)
                    self.bn = bn(5)
                    self.act = nn.Activation("tanh")
                    self.out = nn.Dense(2, in_units=5)

            def hybrid_forward(self, F: Any, x: Any) -> Any:
                return self.out(self.act(self.bn(self.dense(x))))

        return Net()


def twin_nets(mx: Any, make: Any, update: str, hybridize: bool, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    """The same architecture with gluon.nn.BatchNorm and with multibn's, holding the same random weights."""
    from multibn.layers.gluon import BatchNorm

    native = make(mx, lambda c: mx.gluon.nn.BatchNorm(in_channels=c, momentum=0.9, epsilon=1e-5))
    ours = make(mx, lambda c: BatchNorm(c, update=update, **kw))
    rng = np.random.default_rng(seed)
    native.initialize()
    ours.initialize()
    pn, po = native.collect_params(), ours.collect_params()
    assert len(pn.keys()) == len(po.keys())
    for a, b in zip(pn.values(), po.values(), strict=True):
        assert a.name.rsplit("_", 1)[-1] == b.name.rsplit("_", 1)[-1]  # same layout: gamma, beta, running_*
        v = rng.normal(size=a.shape).astype("float32")
        if a.name.endswith(("running_var", "gamma")):
            v = np.abs(v) + 0.5
        make_array = mx.np.array if mx.util.is_np_array() else mx.nd.array
        a.set_data(make_array(v))
        b.set_data(make_array(v))
    if hybridize:
        native.hybridize()
        ours.hybridize()
    return native, ours


def params_close(a: Any, b: Any, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    for (name, pa), pb in zip(a.collect_params().items(), b.collect_params().values(), strict=True):
        np.testing.assert_allclose(pb.data().asnumpy(), pa.data().asnumpy(), rtol=rtol, atol=atol, err_msg=name)


def train_side_by_side(mx: Any, native: Any, ours: Any, shape: tuple, steps: int = 4) -> None:
    trainers = [mx.gluon.Trainer(n.collect_params(), "sgd", {"learning_rate": LR}) for n in (native, ours)]
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = mx.nd.array(rng.normal(1.0, 2.0, size=shape).astype("float32"))
        losses = []
        for net, tr in zip((native, ours), trainers, strict=True):
            with mx.autograd.record():
                loss = (net(x) ** 2).mean()
            loss.backward()
            tr.step(1)
            losses.append(float(loss.asscalar()))
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
        params_close(native, ours)
    x = mx.nd.array(rng.normal(size=shape).astype("float32"))
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-4, atol=1e-5)  # eval


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
@pytest.mark.parametrize("update", ["backward", "forward"])
def test_lenet_like_trains_like_native(mx: Any, update: str, hybridize: bool) -> None:
    native, ours = twin_nets(mx, lenet_like, update, hybridize)
    train_side_by_side(mx, native, ours, (8, 2, 8, 8))


@pytest.mark.parametrize("update", ["backward", "forward"])
def test_inside_a_custom_hybridblock(mx: Any, update: str) -> None:
    native, ours = twin_nets(mx, Wrapped.make, update, hybridize=True)
    train_side_by_side(mx, native, ours, (7, 4))


def test_mxnet_operator_path(mx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU (GPU) the operator runs the algorithm on MXNet's own operators: the same results, here on the CPU
    with a net whose activations keep MXNet's default layout (dense layers only)."""
    from multibn.layers import _gluon_op

    monkeypatch.setattr(_gluon_op, "HOST_DEVICES", ())
    for update in ("backward", "forward"):
        native, ours = twin_nets(mx, Wrapped.make, update, hybridize=True)
        train_side_by_side(mx, native, ours, (7, 4), steps=3)


def test_static_alloc_hybridize(mx: Any) -> None:
    native, ours = twin_nets(mx, lenet_like, "backward", hybridize=False)
    for net in (native, ours):
        net.hybridize(static_alloc=True, static_shape=True)
    train_side_by_side(mx, native, ours, (8, 2, 8, 8), steps=3)


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_update_backward_chains_like_native(mx: Any, hybridize: bool) -> None:
    """Two forwards before one backward, then a second backward of the retained graph: each backward applies the
    update of its forward to the statistics of that moment (four updates), as gluon.nn.BatchNorm does on the CPU.
    The two nodes of one backward pass may run in either order here (the README lists it), so the running mean
    must be the chain of the four updates in one of the orders MXNet may run them."""
    import itertools

    native, ours = twin_nets(mx, Wrapped.make, "backward", hybridize)
    rng = np.random.default_rng(3)
    x1, x2 = (mx.nd.array(rng.normal(m, 1.0, size=(6, 4)).astype("float32")) for m in (0.0, 2.0))
    m0 = native.bn.running_mean.data().asnumpy().astype(np.float64)
    b1, b2 = (native.dense(x).asnumpy().astype(np.float64).mean(axis=0) for x in (x1, x2))
    grads = []
    for net in (native, ours):
        for x in (x1, x2):
            x.attach_grad()
        with mx.autograd.record():
            loss = (net(x1) ** 3).sum() + (net(x2) ** 3).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([x.grad.asnumpy() for x in (x1, x2)])
    for g_native, g_ours in zip(*grads, strict=True):
        np.testing.assert_allclose(g_ours, g_native, rtol=1e-4, atol=1e-5)
    chains = []
    for first, second in itertools.product([(b1, b2), (b2, b1)], repeat=2):
        m = m0
        for b in (*first, *second):
            m = 0.9 * m + 0.1 * b
        chains.append(m)
    for net in (native, ours):
        got = net.bn.running_mean.data().asnumpy()
        assert any(np.allclose(got, c, rtol=1e-5, atol=1e-5) for c in chains), (got, chains)
    assert int(ours.bn.num_batches_tracked().asscalar()) == 4


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_statistics_read_right_after_backward(mx: Any, hybridize: bool) -> None:
    """A read of the running statistics pushed right after ``loss.backward()`` sees that backward's update (MXNet
    does not order a custom operator's backward writes to its auxiliary states; the layer does)."""
    native, ours = twin_nets(mx, Wrapped.make, "backward", hybridize)
    rng = np.random.default_rng(10)
    for step in range(25):
        x = mx.nd.array(rng.normal(step % 5, 1.0, size=(6, 4)).astype("float32"))
        reads = []
        for net in (native, ours):
            with mx.autograd.record():
                loss = (net(x) ** 2).sum()
            loss.backward()
            reads.append(net.bn.running_mean.data().asnumpy())
        np.testing.assert_allclose(reads[1], reads[0], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")


def test_update_backward_without_backward_leaves_statistics(mx: Any) -> None:
    native, ours = twin_nets(mx, Wrapped.make, "backward", hybridize=True)
    x = mx.nd.array(np.random.default_rng(4).normal(size=(6, 4)).astype("float32"))
    before = ours.bn.running_mean.data().asnumpy()
    for net in (native, ours):
        with mx.autograd.train_mode():
            net(x)
        with mx.autograd.record():
            net(x)  # recorded, never differentiated
    mx.nd.waitall()
    np.testing.assert_array_equal(ours.bn.running_mean.data().asnumpy(), before)
    params_close(native, ours, rtol=0, atol=0)


def test_parameter_files_interchange_hybridized(mx: Any, tmp_path: Path) -> None:
    native, ours = twin_nets(mx, lenet_like, "forward", hybridize=True)
    train_side_by_side(mx, native, ours, (8, 2, 8, 8), steps=2)
    native.save_parameters(str(tmp_path / "native.params"))
    _, fresh = twin_nets(mx, lenet_like, "forward", hybridize=True, seed=9)
    fresh.load_parameters(str(tmp_path / "native.params"))
    params_close(native, fresh, rtol=0, atol=0)
    x = mx.nd.array(np.random.default_rng(5).normal(size=(3, 2, 8, 8)).astype("float32"))
    np.testing.assert_allclose(fresh(x).asnumpy(), native(x).asnumpy(), rtol=1e-5, atol=1e-6)


EXPORT_SCRIPT = """
import sys
import numpy as np
if "bool" not in np.__dict__:
    np.bool = np.bool_
import mxnet as mx
if sys.argv[2] == "1":
    import multibn
net = mx.gluon.SymbolBlock.imports(sys.argv[1] + "-symbol.json", ["data"], sys.argv[1] + "-0000.params")
x = mx.nd.array(np.load(sys.argv[1] + "-x.npy"))
np.save(sys.argv[1] + "-y.npy", net(x).asnumpy())
"""


@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments")  # SymbolBlock.imports' own
def test_export_and_import(mx: Any, tmp_path: Path) -> None:
    native, ours = twin_nets(mx, lenet_like, "forward", hybridize=True)
    train_side_by_side(mx, native, ours, (8, 2, 8, 8), steps=2)
    x = np.random.default_rng(6).normal(size=(3, 2, 8, 8)).astype("float32")
    expected = native(mx.nd.array(x)).asnumpy()
    prefix = str(tmp_path / "net")
    ours.export(prefix)
    np.save(prefix + "-x.npy", x)
    loaded = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    np.testing.assert_allclose(loaded(mx.nd.array(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)

    script = tmp_path / "load.py"
    script.write_text(EXPORT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    fail = subprocess.run([sys.executable, str(script), prefix, "0"], capture_output=True, text=True, env=env)
    assert fail.returncode != 0 and "import multibn" in fail.stderr  # the error says what registers the operator
    subprocess.run([sys.executable, str(script), prefix, "1"], capture_output=True, text=True, env=env, check=True)
    np.testing.assert_allclose(np.load(prefix + "-y.npy"), expected, rtol=1e-5, atol=1e-6)


def test_functional_between_convolutions(mx: Any) -> None:
    """multibn.batch_norm on a convolution's output (oneDNN blocked layout) with its gradient coming from another
    convolution, against mx.nd.BatchNorm in the same place; repeated, since a layout race would show now and then."""
    import multibn

    rng = np.random.default_rng(11)
    x0 = mx.nd.array(rng.normal(size=(4, 3, 10, 10)).astype("float32"))
    w1 = mx.nd.array(rng.normal(size=(16, 3, 3, 3)).astype("float32"))
    w2 = mx.nd.array(rng.normal(size=(16, 16, 3, 3)).astype("float32"))
    gamma, beta = mx.nd.array(rng.uniform(0.5, 1.5, 16).astype("float32")), mx.nd.zeros(16)

    def run(bn: Any) -> tuple[np.ndarray, np.ndarray]:
        x = x0.copy()
        x.attach_grad()
        with mx.autograd.record():
            h = mx.nd.Convolution(x, w1, kernel=(3, 3), num_filter=16, no_bias=True)
            z = mx.nd.Convolution(bn(h), w2, kernel=(3, 3), num_filter=16, no_bias=True)
            loss = (z * z).sum()
        loss.backward()
        return z.asnumpy(), x.grad.asnumpy()

    def ours(h: Any) -> Any:
        return multibn.batch_norm(h, gamma, beta, convention="gluon")[0]

    def native(h: Any) -> Any:
        return mx.nd.BatchNorm(h, gamma, beta, mx.nd.zeros(16), mx.nd.ones(16), eps=1e-5, fix_gamma=False)

    expected = run(native)
    for _ in range(5):
        for got, want in zip(run(ours), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_num_dims_checked_imperatively(mx: Any) -> None:
    from multibn.layers.gluon import BatchNorm

    layer = BatchNorm(3, 4)
    layer.initialize()
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(mx.nd.ones((2, 3)))


# ---- MXNet's NumPy interface -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_np_layer_trains_like_native(mx: Any, np_mode: None, hybridize: bool) -> None:
    native, ours = twin_nets(mx, Wrapped.make, "backward", hybridize)
    trainers = [mx.gluon.Trainer(n.collect_params(), "sgd", {"learning_rate": LR}) for n in (native, ours)]
    rng = np.random.default_rng(7)
    for _ in range(3):
        x = mx.np.array(rng.normal(size=(6, 4)).astype("float32"))
        outs = []
        for net, tr in zip((native, ours), trainers, strict=True):
            with mx.autograd.record():
                y = net(x)
                loss = (y ** 2).mean()
            loss.backward()
            tr.step(1)
            outs.append(y)
        assert isinstance(outs[1], mx.np.ndarray)
        np.testing.assert_allclose(outs[1].asnumpy(), outs[0].asnumpy(), rtol=1e-5, atol=1e-6)
        params_close(native, ours)
    x = mx.np.array(rng.normal(size=(6, 4)).astype("float32"))
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-4, atol=1e-5)


def test_np_functional_matches_legacy_and_native(mx: Any, np_mode: None) -> None:
    import multibn

    rng = np.random.default_rng(8)
    xn = rng.normal(size=(5, 3, 2, 2)).astype("float32")
    dyn = rng.normal(size=xn.shape).astype("float32")
    gn = (1 + rng.normal(size=3)).astype("float32")
    x, dy, g, b = (mx.np.array(a) for a in (xn, dyn, gn, np.zeros(3, "float32")))
    state = multibn.init_state(3, backend="mxnet")
    assert isinstance(state.running_mean, mx.np.ndarray)
    x.attach_grad()
    g.attach_grad()
    with mx.autograd.record():
        y, new = multibn.batch_norm(x, g, b, state, convention="gluon")
    y.backward(dy)
    assert isinstance(y, mx.np.ndarray) and all(isinstance(a, mx.np.ndarray) for a in new)

    # the native op on the same arrays (legacy views): output, running statistics (forward, as PyTorch-style
    # multibn: MXNet's own would move them only in its backward) and gradients
    xl, gl, bl, dyl = (a.as_nd_ndarray() for a in (x, g, b, dy))
    xl.attach_grad()
    gl.attach_grad()
    rm, rv = mx.nd.zeros(3), mx.nd.ones(3)
    with mx.autograd.record():
        ref = mx.nd.BatchNorm(xl, gl, bl, rm, rv, eps=1e-5, momentum=0.9, fix_gamma=False)
    ref.backward(dyl)
    np.testing.assert_allclose(y.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.asnumpy(), xl.grad.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.grad.asnumpy(), gl.grad.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new.running_mean.asnumpy(), rm.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.running_var.asnumpy(), rv.asnumpy(), rtol=1e-5, atol=1e-6)

    ye, _ = multibn.batch_norm(x, g, b, new, training=False, convention="gluon")
    assert isinstance(ye, mx.np.ndarray)
    ref_e = (xn - rm.asnumpy()[None, :, None, None]) / np.sqrt(rv.asnumpy()[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(ye.asnumpy(), gn[None, :, None, None] * ref_e, rtol=1e-5, atol=1e-5)

    const = mx.np.array(np.full((4, 3), 2.5, "float32"))  # eps = 0: the zero-variance guard's comparisons
    yc, _ = multibn.batch_norm(const, convention="gluon", eps=0.0)
    assert isinstance(yc, mx.np.ndarray) and np.array_equal(yc.asnumpy(), np.zeros((4, 3), "float32"))

    dx, dg, db = multibn.batch_norm_vjp(x, g, b, None, dy, convention="gluon")
    assert all(isinstance(a, mx.np.ndarray) for a in (dx, dg, db))
    np.testing.assert_allclose(dx.asnumpy(), xl.grad.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db.asnumpy(), dyn.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_recorded_calls_release_their_autograd_nodes(mx: Any) -> None:
    """A recorded batch_norm on a large array (the fast MXNet path, over 2^17 elements) frees its autograd node,
    and with it the copy of x the backward keeps, once its outputs are gone: the node held itself through the
    saved ``mean``, one of its own outputs, and every call kept one activation for good."""
    import gc
    import time

    import multibn
    from multibn.backends.mxnet import _BatchNormFunction

    def live() -> int:
        mx.nd.waitall()
        gc.collect()
        return sum(isinstance(o, _BatchNormFunction) for o in gc.get_objects())

    x = mx.nd.array(np.random.default_rng(0).standard_normal((4, 8, 64, 65)).astype("float32"))
    x.attach_grad()
    before = live()
    for _ in range(3):
        with mx.autograd.record():
            y, _ = multibn.batch_norm(x, state=None, convention="gluon")
        y.backward()
        del y
    # MXNet frees a recorded graph's nodes from its engine threads: give a loaded machine a moment to get there
    deadline = time.monotonic() + 10
    while live() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live() == before


# ---- parity with gluon.nn.BatchNorm over SGD steps (update="backward"), update timing, parameter files --------
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
    trainers = [mx.gluon.Trainer(layer.collect_params(), "sgd", {"learning_rate": PARITY_LR})
                for layer in (native, ours)]
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
    assert int(ours.num_batches_tracked().asscalar()) == PARITY_STEPS
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


# ---- the textbook LeNet with BN: one training step ---------------------------------------------------------------
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
