"""multibn.layers.torch by PyTorch's own names (issue 21, items 6-8): ``BatchNorm1d/2d/3d`` and
``LazyBatchNorm1d/2d/3d`` with ``nn.BatchNorm*d``'s signature, rank checks and error texts; the textbook's concise
LeNet with BN run with one import changed; and the errors and settings where the native layer was not followed
(wrong channel count, ``vmap`` of a training layer, ``eps=0`` in training, a momentum outside [0, 1]). Always
against the native layer doing the same thing."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tests.helpers import LENET_X, LENET_Y, need

pytestmark = pytest.mark.torch  # run in the full environment only (see conftest.same_in_current)

torch = need("torch")
nn = torch.nn

import multibn.layers.torch as mnn  # noqa: E402
from multibn.layers.torch import BatchNorm  # noqa: E402

NAMES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
SHAPES = {"BatchNorm1d": (6, 4, 3), "BatchNorm2d": (3, 4, 2, 3), "BatchNorm3d": (2, 4, 2, 2, 2)}
TOL = {"rtol": 1e-10, "atol": 1e-12}


def outcome(f: Any) -> tuple[str, str] | None:
    """None, or (the exception's type name as the native layer would see it, its text)."""
    try:
        f()
    except Exception as e:  # compared with the native layer's
        return ("RuntimeError" if isinstance(e, RuntimeError) else type(e).__name__, str(e))
    return None


# ---- names, signatures, rank checks, repr, state ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES + [f"Lazy{n}" for n in NAMES])
def test_signature_and_repr_are_natives(name: str) -> None:
    ours, native = getattr(mnn, name), getattr(nn, name)
    def params(cls: type) -> list[tuple[str, Any, Any]]:  # names, kinds and defaults (annotations differ in form)
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert params(ours) == params(native)
    args = () if name.startswith("Lazy") else (3,)
    for kw in ({}, {"eps": 1e-3, "momentum": None, "affine": False}, {"track_running_stats": False, "bias": False}):
        assert repr(ours(*args, **kw)) == repr(native(*args, **kw))


@pytest.mark.parametrize("name", NAMES + [f"Lazy{n}" for n in NAMES])
def test_rank_check_texts_are_natives(name: str) -> None:
    args = () if "Lazy" in name else (3,)
    for rank in range(1, 7):
        x = torch.randn((2, 3, 2, 2, 2, 2)[:rank])
        got = outcome(lambda x=x: getattr(mnn, name)(*args)(x))
        want = outcome(lambda x=x: getattr(nn, name)(*args)(x))
        assert got == want, (rank, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_interchanges_both_ways(name: str) -> None:
    x = torch.randn(SHAPES[name], dtype=torch.float64) * 2 + 1
    native = getattr(nn, name)(4).double()
    native(x)
    ours = getattr(mnn, name)(4).double()
    ours.load_state_dict(native.state_dict())
    for m in (native, ours):
        m(x)
    back = getattr(nn, name)(4).double()
    back.load_state_dict(ours.state_dict())
    for key, value in native.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, **TOL, msg=key)
    assert isinstance(ours, BatchNorm) and type(mnn.revert_batchnorm(ours)) is getattr(nn, name)


@pytest.mark.parametrize("name", NAMES)
def test_lazy_becomes_the_named_class_as_native(name: str) -> None:
    x = torch.randn(SHAPES[name], dtype=torch.float64) * 3 - 1
    ours = getattr(mnn, f"Lazy{name}")(momentum=None, dtype=torch.float64)
    native = getattr(nn, f"Lazy{name}")(momentum=None, dtype=torch.float64)
    for _ in range(2):
        y_native, y_ours = native(x), ours(x)
        torch.testing.assert_close(y_ours, y_native, **TOL)
    assert type(ours) is getattr(mnn, name) and ours.num_features == 4
    for key, value in native.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **TOL, msg=key)
    # a lazy layer loads a native state dict (its shapes come from the file), as nn.LazyBatchNorm*d does
    fresh = getattr(mnn, f"Lazy{name}")(dtype=torch.float64)
    fresh.load_state_dict(native.state_dict())
    fresh.eval()
    native.eval()
    torch.testing.assert_close(fresh(x), native(x), **TOL)


# ---- the textbook's concise LeNet with BN, one import changed --------------------------------------------------------
def concise_bn_lenet(nn: Any) -> Any:
    """d2l's concise PyTorch LeNet with batch norm, as the book writes it against ``from torch import nn``."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
        nn.Sigmoid(), nn.Linear(84, 10))


def test_concise_lenet_runs_with_one_import_changed() -> None:
    """``from multibn.layers import torch as nn`` in place of ``from torch import nn``: the same net, whose BN
    layers are multibn's; from the same weights, three SGD steps give the same losses, gradients and state."""
    torch.manual_seed(0)
    native = concise_bn_lenet(torch.nn).double()
    ours = concise_bn_lenet(mnn).double()
    assert [type(m).__module__ for m in ours if "BatchNorm" in type(m).__name__] == ["multibn.layers.torch"] * 4
    ours.load_state_dict(native.state_dict())
    x, y = torch.from_numpy(LENET_X).double(), torch.from_numpy(LENET_Y)
    opts = [torch.optim.SGD(m.parameters(), lr=0.9) for m in (native, ours)]
    for _ in range(3):
        losses = []
        for net, opt in zip((native, ours), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], **TOL)
        for (key, p), (_, q) in zip(native.named_parameters(), ours.named_parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=key)
        for opt in opts:
            opt.step()
    for key, value in native.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-9, atol=1e-11, msg=key)
    assert int(ours.state_dict()["1.num_batches_tracked"]) == 3
    native.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), native(x), rtol=1e-9, atol=1e-11)


# ---- errors as the native layer's (item 7) ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False},
                                {"affine": False, "track_running_stats": False}], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_says_what_native_says(kw: dict, training: bool) -> None:
    """5 channels into a 4-feature layer: the native text naming the buffer (or weight), and nothing changes."""
    x = torch.randn(3, 5)
    native = nn.BatchNorm1d(4, **kw).train(training)
    for ours in (mnn.BatchNorm1d(4, **kw), BatchNorm(4, 2, **kw)):
        ours.train(training)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        assert outcome(lambda m=ours: m(x)) == outcome(lambda: native(x))
        assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 4"):
        mnn.BatchNorm1d(4)(x)  # code written for the native layer catches it as it did
    with pytest.raises(ValueError, match="running_mean should contain 5 elements not 4"):
        BatchNorm(4)(x)  # multibn's rule: a ValueError naming what is wrong


def test_vmap_of_a_training_layer_raises_natives_message() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    native, ours = nn.BatchNorm1d(4).double(), mnn.BatchNorm1d(4).double()
    want = outcome(lambda: torch.func.vmap(native)(x))
    assert want is not None and "Batch norm got a batched tensor" in want[1]
    assert outcome(lambda: torch.func.vmap(ours)(x)) == want
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_mean, torch.zeros(4, dtype=torch.float64))
    # what native allows under vmap runs and agrees: eval mode, and training without running statistics
    for make in (lambda m: m.eval(), lambda m: m.train()):
        pair = [make(m) for m in (nn.BatchNorm1d(4, track_running_stats=False), BatchNorm(4, 2,
                                                                                        track_running_stats=False))]
        pair = [m.double() for m in pair]
        torch.testing.assert_close(torch.func.vmap(pair[1])(x), torch.func.vmap(pair[0])(x), **TOL)
    native.eval()
    ours.eval()
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(native)(x), **TOL)


# ---- settings as the native layer's (item 8) -------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["constructor", "later"])
def test_eps_zero_in_training_refused_as_native(when: str) -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    pair = [nn.BatchNorm1d(3, eps=0.0), mnn.BatchNorm1d(3, eps=0.0), BatchNorm(3, eps=0.0)] if when == "constructor" \
        else [nn.BatchNorm1d(3), mnn.BatchNorm1d(3), BatchNorm(3)]
    for m in pair:
        m.double()
        if when == "later":
            m.eps = 0.0
    want = outcome(lambda: pair[0](x))
    assert want == ("ValueError", "batch_norm eps must be positive during training, but got 0.0")
    for m in pair[1:]:
        assert outcome(lambda m=m: m(x)) == want
        assert int(m.num_batches_tracked) == 0
        m.eval()
    pair[0].eval()
    for m in pair[1:]:  # eval with eps=0 runs, as native
        torch.testing.assert_close(m(x), pair[0](x), **TOL)


@pytest.mark.parametrize("momentum", [1.5, -0.5, 2.0])
def test_momentum_outside_the_unit_interval_extrapolates_as_native(momentum: float) -> None:
    """R <- (1 - m) R + m stat for any m, as nn.BatchNorm*d (which checks none), set at construction or later."""
    x = [torch.randn(5, 3, dtype=torch.float64) * 2 + i for i in range(3)]
    native = nn.BatchNorm1d(3, momentum=momentum).double()
    built = mnn.BatchNorm1d(3, momentum=momentum).double()
    later = BatchNorm(3).double()
    later.momentum = momentum
    for xi in x:
        ys = [m(xi) for m in (native, built, later)]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], **TOL)
    for m in (built, later):
        for key, value in native.state_dict().items():
            torch.testing.assert_close(m.state_dict()[key], value, **TOL, msg=key)
