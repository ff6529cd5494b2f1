"""multibn.layers.torch.BatchNorm as a drop-in for nn.BatchNorm1d/2d/3d inside PyTorch's machinery, always
against the native layer doing the same thing:

* the constructor: PyTorch's own ModuleInfo samples for nn.BatchNorm1d/2d/3d replayed on the layer (train and
  eval: outputs, gradients, running statistics); ``momentum=None`` given is the cumulative average;
* live attributes: eps, momentum (incl. None), track_running_stats and None buffers set after construction;
* ``convert_batchnorm`` / ``revert_batchnorm``: a converted small conv net trains step for step as the original;
* ``torch.compile(fullgraph=True)`` in training and eval, running statistics included;
* TorchScript (trace, script, the legacy ONNX exporter) refused with a clear error;
* ``torch.export`` and ``torch.onnx.export`` (dynamo) of eval models, run by onnxruntime;
* gradients for the running statistics in eval mode, which the native layer refuses.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.helpers import LENET_X, LENET_Y, PARITY_LR, PARITY_STEPS, batches, need

pytestmark = pytest.mark.torch  # run in the full environment only (see conftest.same_in_current)

torch = need("torch")
nn = torch.nn

from multibn.layers.torch import BatchNorm, convert_batchnorm, revert_batchnorm  # noqa: E402

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 throughout unless said


def assert_same_state(ours: nn.Module, native: nn.Module, **tol: float) -> None:
    want, got = native.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **(tol or TOL), msg=lambda m, k=key: f"{k}: {m}")


def randomize(native: nn.Module, seed: int = 0) -> None:
    """Weights and running statistics away from their initial 1/0 (so that eval mode and affine matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in native.named_parameters():
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5 if "weight" in name
                    else torch.randn(t.shape, generator=g, dtype=t.dtype))
        for name, t in native.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)


def step_both(native: nn.Module, ours: nn.Module, x: Any, *, backward: bool = True) -> None:
    """One forward (and backward) of each on the same input: same output, same input and parameter gradients."""
    xs = [x.detach().clone().requires_grad_(backward) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((native, ours), xs, strict=True)]
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    if not backward:
        return
    g = torch.randn(outs[0].shape, dtype=outs[0].dtype, generator=torch.Generator().manual_seed(1))
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL)
    for (name, p_native), (_, p_ours) in zip(native.named_parameters(), ours.named_parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_native.grad, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


# ---- the constructor: ModuleInfo samples, momentum=None ------------------------------------------------------------
def _bn_module_infos() -> list[Any]:
    need("expecttest", "torch's ModuleInfo database (common_modules imports it)")
    from torch.testing._internal.common_modules import module_db

    return [m for m in module_db if m.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]


def _samples() -> list[Any]:
    out = []
    for info in _bn_module_infos():
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                             training=training)
            for i, sample in enumerate(inputs):
                name = f"{info.module_cls.__name__}-{sample.desc or i}-{'train' if training else 'eval'}"
                out.append(pytest.param(info.module_cls, sample, training, id=name))
    return out


SAMPLES = _samples()


@pytest.mark.parametrize(("cls", "sample", "training"), SAMPLES)
def test_moduleinfo_samples_match_native(cls: type, sample: Any, training: bool) -> None:
    """Each sample's constructor arguments, bound as nn.BatchNorm*d binds them, given to multibn's layer (num_dims
    from the sample's input rank); two steps (the cumulative average's 1/t moves) then the other mode."""
    bound = inspect.signature(cls).bind(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    kwargs = dict(bound.arguments)
    x = sample.forward_input.args[0]
    native = cls(**kwargs).double()
    randomize(native)
    ours = BatchNorm(num_dims=x.dim(), **kwargs).double()
    ours.load_state_dict(native.state_dict())
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (
        native.eps, native.momentum, native.affine, native.track_running_stats)
    assert (ours.bias is None) == (native.bias is None)
    for mode in (training, training, not training):
        native.train(mode)
        ours.train(mode)
        native.zero_grad()
        ours.zero_grad()
        step_both(native, ours, x.detach() * 2 + 1)
        assert_same_state(ours, native)


def test_moduleinfo_error_sample_negative_eps_refused() -> None:
    """The ModuleInfo error sample eps=-1.0: both refuse with ValueError (multibn already at construction)."""
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm2d(10, eps=-1.0)(torch.randn(2, 10, 5, 5))
    with pytest.raises(ValueError, match="eps"):
        BatchNorm(10, 4, eps=-1.0)


def test_momentum_none_given_is_cumulative_and_not_given_is_the_conventions() -> None:
    x = [torch.randn(6, 3, dtype=torch.float64) * 2 + i for i in range(3)]
    for kwargs in ({"momentum": None}, {}, {"momentum": 0.25, "eps": 1e-3}):
        native, ours = nn.BatchNorm1d(3, **kwargs).double(), BatchNorm(3, 2, **kwargs).double()
        for xi in x:
            step_both(native, ours, xi, backward=False)
        assert_same_state(ours, native)
        assert ours.momentum == native.momentum
    assert BatchNorm(3, convention="mxnet").momentum == 0.9  # not given: the convention's own
    with pytest.raises(TypeError, match="positional argument is eps"):
        BatchNorm(3, 1e-3)  # nn.BatchNorm1d(3, 1e-3) means eps; here the second positional is num_dims
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNorm(3, convention="mxnet", momentum=None)


# ---- live attributes -------------------------------------------------------------------------------------------
def _set(**attrs: Any) -> Callable[[nn.Module], None]:
    def change(m: nn.Module) -> None:
        for k, v in attrs.items():
            setattr(m, k, v)
    return change


FIXED = torch.randn(5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
LIVE_CHANGES = {
    "eps": _set(eps=1e-1),
    "momentum": _set(momentum=0.7),
    "momentum-None": _set(momentum=None),
    "momentum-None-then-float": lambda m: (_set(momentum=None)(m), m(FIXED), _set(momentum=0.5)(m)),
    "track_running_stats-off": _set(track_running_stats=False),
    "buffers-None": _set(running_mean=None, running_var=None, num_batches_tracked=None),
    "counter-None-momentum-None": _set(num_batches_tracked=None, momentum=None),
    "counter-None": _set(num_batches_tracked=None),
    "affine-None": _set(weight=None, bias=None),
    "bias-None": _set(bias=None),
}


@pytest.mark.parametrize("change", list(LIVE_CHANGES), ids=list(LIVE_CHANGES))
def test_live_attributes_act_on_the_next_call_as_native(change: str) -> None:
    """An attribute set after construction (YOLO-style initialisers, momentum schedulers, buffers removed) acts on
    the next call exactly as on nn.BatchNorm1d: two training steps, then eval, states equal throughout."""
    native = nn.BatchNorm1d(3).double()
    randomize(native)
    ours = BatchNorm(3).double()
    ours.load_state_dict(native.state_dict())
    step_both(native, ours, torch.randn(5, 3, 2, dtype=torch.float64))
    for m in (native, ours):
        LIVE_CHANGES[change](m)
    for mode in (True, True, False):
        native.train(mode)
        ours.train(mode)
        native.zero_grad()
        ours.zero_grad()
        step_both(native, ours, torch.randn(5, 3, 2, dtype=torch.float64) * 3 - 1)
        assert_same_state(ours, native)


def test_track_running_stats_switched_on_without_buffers_as_native() -> None:
    """Built without running statistics, then track_running_stats=True: the native layer still has no buffers,
    normalises with the batch in eval mode too and counts nothing."""
    native = nn.BatchNorm2d(3, track_running_stats=False).double()
    ours = BatchNorm(3, 4, track_running_stats=False).double()
    for m in (native, ours):
        m.track_running_stats = True
    for mode in (True, False):
        native.train(mode)
        ours.train(mode)
        step_both(native, ours, torch.randn(2, 3, 2, 2, dtype=torch.float64))
        assert_same_state(ours, native)


def test_repr_shows_the_values_in_use() -> None:
    bn = BatchNorm(3, 4)
    bn.eps, bn.momentum, bn.track_running_stats = 1e-3, None, False
    text = repr(bn)
    assert "eps=0.001" in text and "momentum=None" in text and "track_running_stats=False" in text
    native = nn.BatchNorm2d(3)
    native.eps, native.momentum = 1e-3, None
    assert "eps=0.001, momentum=None" in repr(native)  # the native repr shows them the same way


def test_convert_sync_batchnorm_carries_live_settings() -> None:
    from multibn.layers.torch import convert_sync_batchnorm

    bn = BatchNorm(3, 4, bias=False)
    bn.eps, bn.momentum = 1e-2, None
    new = convert_sync_batchnorm(nn.Sequential(bn))[0]
    assert (new.eps, new.momentum, new.sync, new.num_dims, new.bias) == (1e-2, None, True, 4, None)
    assert new.weight is bn.weight and new.running_mean is bn.running_mean
    native = nn.BatchNorm2d(3, eps=1e-2)
    native.momentum = 0.3
    new = convert_sync_batchnorm(native)
    assert (new.eps, new.momentum, new.num_dims) == (1e-2, 0.3, 4)


# ---- convert / revert --------------------------------------------------------------------------------------------
def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=None, eps=1e-3), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 8, bias=False), nn.BatchNorm1d(8, momentum=0.3), nn.ReLU(),
        nn.Linear(8, 3),
    )


def train_steps(model: nn.Module, steps: int = 4, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5
        t = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convert_batchnorm_trains_step_for_step_as_the_original() -> None:
    native = small_convnet().double()
    randomize(native)
    native[3].weight.requires_grad_(False)
    keys = list(native.state_dict())
    ours = convert_batchnorm(copy.deepcopy(native))
    layers = [m for m in ours.modules() if isinstance(m, BatchNorm)]
    assert [(m.num_dims, m.eps, m.momentum) for m in layers] == [(4, 1e-5, 0.1), (4, 1e-3, None), (None, 1e-5, 0.3)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    assert list(ours.state_dict()) == keys
    assert not ours[3].weight.requires_grad and ours[1].running_mean.dtype == torch.float64
    torch.testing.assert_close(train_steps(ours), train_steps(native), **TOL)
    assert_same_state(ours, native)
    native.eval()
    ours.eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), native(x), **TOL)

    back = revert_batchnorm(ours)
    assert [type(m) for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert back[4].momentum is None and back[4].eps == 1e-3 and not back.training
    back.train()
    native.train()
    torch.testing.assert_close(train_steps(back, seed=1), train_steps(native, seed=1), **TOL)
    assert_same_state(back, native)


def test_convert_carries_mode_sync_and_root() -> None:
    native = nn.SyncBatchNorm(3, eps=1e-4).eval()  # no process group: plain BN on CPU, as the native one
    ours = convert_batchnorm(native)
    assert isinstance(ours, BatchNorm) and ours.num_dims is None and not ours.training and ours.eps == 1e-4
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(ours(x), native(x))
    conv = convert_batchnorm(nn.BatchNorm3d(2), convention="mxnet")  # momentum 0.1 on the new batch: 0.9 on the old
    assert conv.convention.name == "mxnet" and conv.momentum == pytest.approx(0.9) and conv.num_dims == 5


def test_revert_needs_a_known_rank_and_the_torch_convention() -> None:
    with pytest.raises(ValueError, match="num_dims=None and has seen no input"):
        revert_batchnorm(nn.Sequential(BatchNorm(3)))
    seen = BatchNorm(3)
    seen(torch.randn(4, 3, 2, 2, 2))
    assert type(revert_batchnorm(seen)) is nn.BatchNorm3d
    with pytest.raises(ValueError, match="convention 'mxnet'"):
        revert_batchnorm(nn.Sequential(BatchNorm(3, 4, convention="mxnet")))
    with pytest.raises(ValueError, match="axis"):
        revert_batchnorm(BatchNorm(3, 4, axis=-1))


# ---- torch.compile ---------------------------------------------------------------------------------------------
def compile_case(backend: str, batch_sizes: tuple[int, ...]) -> None:
    """torch.compile(fullgraph=True) of a conv net holding the layer: no graph break (fullgraph raises on one), and
    SGD steps then eval equal the eager model, running statistics included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNorm(4, 4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 6, bias=False), BatchNorm(6, momentum=None), nn.Linear(6, 3))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    g = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        x, t = torch.randn(bs, 3, 5, 5, generator=g) + 1, torch.randint(0, 3, (bs,), generator=g)
        for m, opt in zip((eager, compiled), opts, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), t).backward()
            opt.step()
    assert_same_state(compiled_model, eager, rtol=1e-5, atol=1e-6)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(5, 3, 5, 5, generator=g)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert_same_state(compiled_model, eager, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_equals_eager_train_and_eval() -> None:
    """Dynamo (which decides graph breaks) with AOTAutograd, two batch sizes (a recompile for each), then eval."""
    compile_case("aot_eager", (8, 8, 6))


@pytest.mark.slow
def test_compile_fullgraph_inductor_equals_eager() -> None:
    """The default backend, inductor: generated kernels for the forward and the backward (about 30 s of compiling)."""
    compile_case("inductor", (8, 8))


def test_compile_follows_live_attributes() -> None:
    """A compiled model whose layer's momentum, eps and track_running_stats change between calls: each call as the
    native layer's (the changed values recompile; none is baked in)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ours = convert_batchnorm(copy.deepcopy(native))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 3, 3)
    for name, value in [("eps", 1e-5), ("momentum", 0.5), ("momentum", None), ("eps", 1e-2),
                        ("track_running_stats", False), ("momentum", 0.3), ("track_running_stats", True)]:
        setattr(ours[1], name, value)
        setattr(native[1], name, value)
        torch.testing.assert_close(compiled(x), native(x), rtol=1e-5, atol=1e-5)
        assert_same_state(ours, native, rtol=1e-5, atol=1e-6)


def test_compile_explain_counts_no_graph_break() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm(4, 4))
    x = torch.randn(2, 3, 3, 3)
    for mode in (True, False):
        model.train(mode)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons


# ---- TorchScript -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["trace", "script", "onnx-legacy"])
def test_torchscript_refused_with_the_supported_route(route: str, tmp_path: Any) -> None:
    """The native layer works under TorchScript; multibn's refuses clearly (never an internal crash)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 4, 4)
    run = {
        "trace": lambda m: torch.jit.trace(m, x),
        "script": torch.jit.script,
        "onnx-legacy": lambda m: torch.onnx.export(m, (x,), str(tmp_path / "m.onnx"), dynamo=False),
    }[route]
    if route != "onnx-legacy" or importlib.util.find_spec("onnx") is not None:
        run(model)  # native: works
    with pytest.raises(RuntimeError, match=r"multibn's BatchNorm.*torch\.export"):
        run(convert_batchnorm(model))


# ---- torch.export and ONNX ---------------------------------------------------------------------------------------
def test_torch_export_eval_and_train_equal_native() -> None:
    native = small_convnet()
    randomize(native)
    ours = convert_batchnorm(copy.deepcopy(native))
    x = torch.randn(4, 3, 5, 5)
    for mode in (False, True):
        native.train(mode)
        ours.train(mode)
        want = native(x)
        got = torch.export.export(ours, (x,)).module()(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_dynamo_export_runs_in_onnxruntime(tmp_path: Any) -> None:
    for name in ("onnx", "onnxruntime", "onnxscript"):
        need(name, why=f"{name} is not installed (requirements/full.txt has it)")
    import onnxruntime

    native = small_convnet()
    randomize(native)
    native.eval()
    ours = convert_batchnorm(copy.deepcopy(native))
    x = torch.randn(4, 3, 5, 5)
    path = tmp_path / "model.onnx"
    torch.onnx.export(ours, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), native(x).detach(), rtol=1e-5, atol=1e-5)


# ---- gradients for the running statistics ------------------------------------------------------------------------
@pytest.mark.xfail(not hasattr(importlib.import_module("multibn.algorithm"), "eval_rule"), strict=True,
                   reason="before the autograd core of issue 11 (algorithm.eval_rule) multibn gave a None gradient "
                          "for the running statistics in eval mode, without an error")
def test_eval_running_stats_gradient_refused_or_right() -> None:
    """The native layer refuses to differentiate with respect to the running statistics (RuntimeError); multibn
    must refuse too, or give the gradient of the eval formula; never None in silence."""
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    native = nn.BatchNorm1d(3).double().eval()
    native.running_mean = native.running_mean.clone().requires_grad_()
    with pytest.raises(RuntimeError):
        native(x).sum().backward()
    ours = BatchNorm(3).double().eval()
    rmean = ours.running_mean.clone().requires_grad_()
    rvar = ours.running_var.clone().requires_grad_()
    ours.running_mean, ours.running_var = rmean, rvar
    try:
        ours(x).sum().backward()
    except RuntimeError:
        return
    want_mean, want_var = torch.autograd.grad(
        (((x - rmean[:, None]) / torch.sqrt(rvar[:, None] + ours.eps)).sum()), (rmean, rvar))
    assert rmean.grad is not None and rvar.grad is not None, "a running-statistics gradient was None in silence"
    torch.testing.assert_close(rmean.grad, want_mean, **TOL)
    torch.testing.assert_close(rvar.grad, want_var, **TOL)


@pytest.mark.parametrize("functional", [False, True], ids=["layer", "batch_norm"])
def test_inplace_relu_after_bn_as_native(functional: bool) -> None:
    """BN -> ReLU(inplace=True) (torchvision's ResNets): the backward reads no output of BN but its statistics, so an
    in-place op on y is allowed, as after nn.BatchNorm2d, and the gradients are the native ones."""
    import multibn

    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    native, ours = nn.BatchNorm2d(3).double(), BatchNorm(3, 4).double()

    def bn(m: nn.Module, xi: Any) -> Any:
        if functional and m is ours:
            return multibn.batch_norm(xi, m.weight, m.bias, None)[0]
        return m(xi)

    grads = []
    for m in (native, ours):
        xi = x.clone().requires_grad_()
        y = nn.functional.relu(bn(m, xi), inplace=True)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, **TOL)


# ---- parity with nn.BatchNorm1d/2d over SGD steps, state dicts, rank checks ---------------------------------------
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
    opts = [torch.optim.SGD(m.parameters(), lr=PARITY_LR) for m in (native, ours)]
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
    assert int(ours.num_batches_tracked) == PARITY_STEPS
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


# ---- the textbook LeNet with BN: one training step ---------------------------------------------------------------
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
