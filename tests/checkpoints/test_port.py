"""Porting BN parameters and running statistics: ``multibn.convert_state``, the checkpoint files, ``multibn port``.

The maths is checked on NumPy against ``multibn.batch_norm`` (inference output of every pair of conventions,
the ``docs/semantics.md`` §2.6 identity on a constant-count sequence); the files with native layers of PyTorch,
MXNet Gluon and Flax (skipped, with the reason, where a framework is not installed: MXNet and Flax are only in the full
environment).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import multibn
from multibn import CONVENTIONS, BNState, Convention, batch_norm, convert_state
from multibn.checkpoints import (
    CheckpointError,
    default_target_name,
    from_canonical,
    read_checkpoint,
    to_canonical,
)
from multibn.cli import main
from tests.helpers import mxnet_module, need

C = 3
SRC_KINDS = ("torch", "gluon", "flax", "nnx", "torch_eps1e-3", "mxnet_op_fix_gamma", "gluon_scale_false")
FORMATS = ("torch", "gluon", "flax", "nnx")


# ---- convert_state: inference output --------------------------------------------------------------------------
def _eval(x, gamma, beta, state, conv):
    y, _ = batch_norm(x, gamma, beta, state, training=False, convention=conv, axis=1)
    return y


def _random_layer(rng, c=4, var_low=1e-2):
    state = BNState(rng.normal(size=c), rng.uniform(var_low, 3.0, size=c), 5)
    gamma = rng.uniform(0.2, 2.5, size=c)
    beta = rng.normal(size=c)
    return state, gamma, beta


@pytest.mark.parametrize("dst", tuple(CONVENTIONS))
@pytest.mark.parametrize("src", tuple(CONVENTIONS))
def test_inference_output_preserved_for_every_pair_of_conventions(src, dst):
    rng = np.random.default_rng(hash((src, dst)) % 2**32)
    for _ in range(3):
        state, gamma, beta = _random_layer(rng)
        x = rng.normal(size=(5, 4, 2)) * 2
        new_state, g, b, eps = convert_state(state, gamma, beta, src=src, dst=dst)
        assert eps == CONVENTIONS[dst].eps
        np.testing.assert_allclose(_eval(x, g, b, new_state, dst), _eval(x, gamma, beta, state, src),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(new_state.running_mean, state.running_mean)
        assert new_state.num_batches_tracked == state.num_batches_tracked


def test_fix_gamma_source_and_eps_1e3_to_1e5_change_the_numbers():
    state = BNState(np.array([0.5, -1.0]), np.array([0.01, 2.0]), 7)
    gamma, beta = np.array([1.7, 0.6]), np.array([0.1, 0.2])  # drifted gamma, ignored by MXNet (fix_gamma)
    new, g, b, eps = convert_state(state, gamma, beta, src="mxnet", dst="torch")
    np.testing.assert_array_equal(g, [1.0, 1.0])
    np.testing.assert_allclose(new.running_var, [0.01 + 1e-3 - 1e-5, 2.0 + 1e-3 - 1e-5], rtol=1e-15)
    assert eps == 1e-5 and b is beta
    x = np.linspace(-2, 2, 12).reshape(6, 2)
    naive = _eval(x, gamma, beta, state, "torch")  # what loading the numbers unchanged would give
    assert np.max(np.abs(naive - _eval(x, gamma, beta, state, "mxnet"))) > 0.1
    np.testing.assert_allclose(_eval(x, g, b, new, "torch"), _eval(x, gamma, beta, state, "mxnet"), rtol=1e-12)


@given(
    eps_src=st.sampled_from([0.0, 1e-5, 1e-3, 1e-2]), eps_dst=st.sampled_from([0.0, 1e-5, 1e-3, 1e-2]),
    fix_src=st.booleans(), fix_dst=st.booleans(), unbiased_src=st.booleans(), unbiased_dst=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_inference_output_preserved_for_custom_conventions(eps_src, eps_dst, fix_src, fix_dst, unbiased_src,
                                                           unbiased_dst, seed):
    rng = np.random.default_rng(seed)
    src = Convention("a", 0.1, "new", unbiased_src, eps_src, fix_gamma=fix_src)
    dst = Convention("b", 0.99, "old", unbiased_dst, eps_dst, fix_gamma=fix_dst)
    state, gamma, beta = _random_layer(rng, var_low=0.02)
    x = rng.normal(size=(4, 4, 3))
    new, g, b, _ = convert_state(state, gamma, beta, src=src, dst=dst)
    np.testing.assert_allclose(_eval(x, g, b, new, dst), _eval(x, gamma, beta, state, src), rtol=1e-9, atol=1e-12)
    if fix_src or fix_dst:
        np.testing.assert_array_equal(g, np.ones(4))


def test_convert_state_is_pure_and_accepts_sequences():
    state = BNState(np.array([0.0, 1.0]), np.array([1.0, 2.0]), np.array(3))
    gamma = np.array([2.0, 3.0])
    copies = [a.copy() for a in (*state, gamma)]
    new, g, _, _ = convert_state(state, gamma, None, src="mxnet", dst="gluon")
    for before, after in zip(copies, (*state, gamma), strict=True):
        np.testing.assert_array_equal(before, after)
    assert g is not gamma and new.running_var is not state.running_var
    new2, g2, b2, _ = convert_state(BNState([0.0, 1.0], [1.0, 2.0], 3), [2.0, 3.0], None, src="mxnet", dst="gluon")
    assert isinstance(g2, np.ndarray) and b2 is None
    np.testing.assert_array_equal(new2.running_var, new.running_var)


def test_convert_state_on_every_backend(backend):
    from multibn.backends import get_backend
    from tests.helpers import to_numpy

    be = get_backend(backend)
    ref_state = BNState(np.array([0.0, 1.0, -2.0], np.float32), np.array([0.5, 1.0, 2.0], np.float32), 4)
    ref_gamma = np.array([1.5, 0.5, 2.0], np.float32)
    want = convert_state(ref_state, ref_gamma, None, src="mxnet", dst="torch")
    state = BNState(be.asarray(ref_state.running_mean), be.asarray(ref_state.running_var), be.counter(4))
    got = convert_state(state, be.asarray(ref_gamma), None, src="mxnet", dst="torch")
    assert be.is_array(got[0].running_var) and be.is_array(got[1])
    assert be.dtype_name(got[0].running_var) == "float32"
    np.testing.assert_allclose(to_numpy(got[0].running_var), want[0].running_var, rtol=1e-7)
    np.testing.assert_array_equal(to_numpy(got[1]), [1, 1, 1])
    stat = convert_state(state, None, None, src="torch", dst="flax", count=8, preserve="statistics")
    np.testing.assert_allclose(
        to_numpy(stat[0].running_var),
        convert_state(ref_state, None, None, src="torch", dst="flax", count=8, preserve="statistics")[0].running_var,
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(src="torch", dst="keras"), ValueError, r"negative at channels \[0\].*eps must be <="),
        (dict(src="torch", dst="gluon", preserve="statistics"), ValueError, "needs count"),
        (dict(src="torch", dst="gluon", preserve="statistics", count=1), ValueError, "count must be an int >= 2"),
        (dict(src="torch", dst="gluon", preserve="statistics", count=True), ValueError, "count must be an int"),
        (dict(src="torch", dst="gluon", count=8), ValueError, "only with preserve='statistics'"),
        (dict(src="torch", dst="gluon", preserve="outputs"), ValueError, "preserve must be"),
        (dict(src="pytorch", dst="gluon"), ValueError, "convention 'pytorch' is unknown"),
        (dict(src="torch", dst="mxnet", gamma=[-1.0, 2.0]), ValueError, r"not positive at channels \[0\]"),
        (dict(src="torch", dst="mxnet", preserve="statistics", count=4), ValueError, "fixes gamma to 1"),
        (dict(src="torch", dst="gluon", gamma=[1.0, 2.0, 3.0]), ValueError, "gamma has shape"),
        (dict(src="torch", dst="gluon", state=(1, 2)), TypeError, "state must be a multibn.BNState"),
    ],
)
def test_convert_state_refuses(kwargs, error, match):
    state = kwargs.pop("state", BNState(np.array([0.0, 0.0]), np.array([1e-4, 1.0]), 3))
    gamma = np.array(kwargs.pop("gamma", [1.5, 2.0]))
    with pytest.raises(error, match=match):
        convert_state(state, gamma, None, **kwargs)


def test_convert_state_refuses_mixed_frameworks():
    torch = need("torch", why="needs torch")
    with pytest.raises(TypeError, match="one framework"):
        convert_state(BNState(torch.zeros(2), np.ones(2), 0), None, None, src="torch", dst="gluon")


# ---- convert_state: statistics (§2.6) ---------------------------------------------------------------------------
def _run(conv, batches):
    state = multibn.init_state(batches[0].shape[1], dtype="float64")
    for x in batches:
        _, state = batch_norm(x, state=state, convention=conv, axis=1)
    return state


_torch01 = CONVENTIONS["torch"]
_biased_new01 = dataclasses.replace(CONVENTIONS["gluon"], name="biased", momentum=0.1, momentum_weighs="new")
_biased_cma = Convention("biased_cma", None, "new", unbiased_running_var=False, eps=1e-5)
_flax_a01 = CONVENTIONS["flax"].with_overrides(momentum=0.9)  # a = 0.1, as torch's 0.1


@pytest.mark.parametrize(
    ("unbiased", "biased"),
    [(_torch01, CONVENTIONS["gluon"]), (_torch01, _biased_new01), (_torch01, _flax_a01),
     (CONVENTIONS["torch_cma"], _biased_cma),
     (_torch01.with_overrides(momentum=0.5), CONVENTIONS["keras"].with_overrides(momentum=0.5, eps=1e-5))],
    ids=["torch-gluon", "torch-biased", "torch-flax(a=0.1)", "cma", "a=0.5"],
)
@pytest.mark.parametrize("t", [1, 3, 12])
def test_statistics_mode_follows_the_section_2_6_identity(unbiased, biased, t):
    """Same batches, count n = 2*1*2 = 4 each: U_t = k B_t + P_t (1 - k) with k = 4/3, both ways."""
    rng = np.random.default_rng(t)
    batches = [rng.normal(size=(2, 3, 1, 2)) * rng.uniform(0.1, 3, size=(1, 3, 1, 1)) + 1 for _ in range(t)]
    u, b = _run(unbiased, batches), _run(biased, batches)
    assert int(u.num_batches_tracked) == int(b.num_batches_tracked) == t
    to_b, _, _, _ = convert_state(u, None, None, src=unbiased, dst=biased, count=4, preserve="statistics")
    to_u, _, _, _ = convert_state(b, None, None, src=biased, dst=unbiased, count=4, preserve="statistics")
    np.testing.assert_allclose(to_b.running_var, b.running_var, rtol=1e-12)
    np.testing.assert_allclose(to_u.running_var, u.running_var, rtol=1e-12)
    np.testing.assert_array_equal(to_b.running_mean, u.running_mean)
    if t < 12 and unbiased.momentum is not None:  # the (1-a)^t term matters: dropping it is wrong
        steady, _, _, _ = convert_state(BNState(u.running_mean, u.running_var, None), None, None, src=unbiased,
                                        dst=biased, count=4, preserve="statistics")
        assert np.max(np.abs(steady.running_var - b.running_var)) > 1e-3


def test_statistics_mode_steady_state_when_t_is_unknown():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 2, 2)) for _ in range(300)]
    u, b = _run("torch", batches), _run("gluon", batches)
    unknown = BNState(u.running_mean, u.running_var, None)
    to_b, _, _, _ = convert_state(unknown, None, None, src="torch", dst="gluon", count=8, preserve="statistics")
    np.testing.assert_allclose(to_b.running_var, b.running_var, rtol=1e-10)


def test_statistics_mode_same_estimator_changes_nothing_and_does_not_fold_eps():
    state = BNState(np.zeros(2), np.array([0.5, 1.0]), 3)
    new, g, _, eps = convert_state(state, np.ones(2), None, src="mxnet", dst="flax", preserve="statistics")
    assert new.running_var is state.running_var and eps == 1e-5
    np.testing.assert_array_equal(g, [1, 1])


# ---- layer names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "dst", "name", "want"),
    [
        ("torch", "flax", "features.1", "features_1"),
        ("torch", "flax", "layer1.0.bn1", "layer1_0/bn1"),
        ("torch", "flax", "", ""),
        ("torch", "flax", "1", "1"),
        ("flax", "torch", "BatchNorm_0", "BatchNorm.0"),
        ("flax", "torch", "block_2_1/bn", "block.2.1.bn"),
        ("torch", "gluon", "features.1", "features.1."),
        ("torch", "gluon", "", ""),
        ("gluon", "torch", "features.1.", "features.1"),
        ("gluon", "torch", "batchnorm0_", "batchnorm0"),
        ("gluon", "flax", "features.1.", "features_1"),
        ("flax", "gluon", "features_1", "features.1."),
        ("gluon", "gluon", "bn0_", "bn0_"),
        ("flax", "flax", "a_1", "a_1"),
    ],
)
def test_default_layer_name_rule(src, dst, name, want):
    assert default_target_name(src, dst, name) == want


def test_default_rule_towards_symbol_style_gluon():
    assert default_target_name("torch", "gluon", "features.1", "symbol") == "features_1_"


_component = st.from_regex(r"[a-z][a-z0-9]{0,4}(_[a-z][a-z0-9]{0,3})?", fullmatch=True)


@given(st.lists(st.one_of(_component, st.integers(0, 12).map(str)), max_size=5).filter(
    lambda parts: not parts or not parts[0].isdigit() or len(parts) == 1))
def test_default_rule_round_trips(parts):
    name = ".".join(parts)
    for fmt in ("gluon", "flax"):
        assert to_canonical(fmt, from_canonical(fmt, name)) == name


# ---- native layers, trained in the source framework ---------------------------------------------------------------
def _need(fmt):
    if fmt in ("gluon", "mxnet"):
        return mxnet_module()
    if fmt in ("flax", "nnx"):
        need("flax", why="the flax format needs flax (installed in the full environment only)")
        import flax

        return flax
    return need("torch", why="the torch format needs torch")


def _data(seed, n=8):
    rng = np.random.default_rng(seed)
    scale = np.array([0.05, 0.5, 2.0])[None, :, None, None]
    shift = np.array([1.0, -2.0, 0.5])[None, :, None, None]
    x = (rng.normal(size=(n, C, 4, 4)) * scale + shift).astype(np.float32)
    return x, rng.normal(size=(n, C, 4, 4)).astype(np.float32)


TRAIN = [_data(s) for s in range(4)]  # four training batches of count 8*4*4 = 128 per channel
FRESH = _data(99, n=5)[0]
MOMENTUM_NEW = 0.5  # torch's momentum; 1 - 0.5 for the old-weighted ones: the same a


def _torch_source(path, eps=1e-5):
    torch = _need("torch")
    bn = torch.nn.BatchNorm2d(C, eps=eps, momentum=MOMENTUM_NEW)
    opt = torch.optim.SGD(bn.parameters(), lr=0.05)
    for x, w in TRAIN:
        opt.zero_grad()
        (bn(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
        opt.step()
    torch.save(bn.state_dict(), path)
    bn.eval()
    with torch.no_grad():
        return bn(torch.from_numpy(FRESH)).numpy()


def _gluon_source(path, eps=1e-5, scale=True):
    mx = _need("gluon")
    from mxnet import autograd, gluon

    bn = gluon.nn.BatchNorm(in_channels=C, epsilon=eps, momentum=1 - MOMENTUM_NEW, scale=scale)
    bn.initialize(ctx=mx.cpu())
    trainer = gluon.Trainer(bn.collect_params(), "sgd", {"learning_rate": 0.05})
    for x, w in TRAIN:
        with autograd.record():
            loss = (bn(mx.nd.array(x)) * mx.nd.array(w)).sum()
        loss.backward()
        trainer.step(1)
    if not scale:  # fix_gamma: the stored gamma is ignored; make it drift as weight decay would
        bn.gamma.set_data(mx.nd.array([1.7, 0.6, 1.2]))
    bn.save_parameters(str(path))
    return bn(mx.nd.array(FRESH)).asnumpy()


def _mxnet_op_source(path):
    """``mx.nd.BatchNorm`` with its defaults: fix_gamma=True, eps 1e-3; symbol-API names in the file."""
    mx = _need("mxnet")
    from mxnet import autograd

    gamma, beta = mx.nd.ones(C), mx.nd.array([0.1, -0.2, 0.3])
    mean, var = mx.nd.zeros(C), mx.nd.ones(C)
    for x, w in TRAIN:
        xx = mx.nd.array(x)
        xx.attach_grad()
        with autograd.record():
            y = mx.nd.BatchNorm(xx, gamma, beta, mean, var, momentum=1 - MOMENTUM_NEW)
        y.backward(mx.nd.array(w))  # MXNet's CPU kernel updates the moving statistics here
    gamma[:] = mx.nd.array([1.7, 0.6, 1.2])  # drifted, as weight decay does (apache/mxnet#9624)
    mx.nd.save(str(path), {"arg:bn0_gamma": gamma, "arg:bn0_beta": beta, "aux:bn0_moving_mean": mean,
                           "aux:bn0_moving_var": var})
    return mx.nd.BatchNorm(mx.nd.array(FRESH), gamma, beta, mean, var).asnumpy()


def _flax_source(path, eps=1e-5):
    _need("flax")
    import flax.linen as nn
    import jax
    from flax import serialization

    model = nn.BatchNorm(use_running_average=False, momentum=1 - MOMENTUM_NEW, epsilon=eps)
    variables = model.init(jax.random.key(0), TRAIN[0][0].transpose(0, 2, 3, 1))
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, stats, x, w):
        y, upd = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return (y * w).sum(), upd["batch_stats"]

    for x, w in TRAIN:
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x.transpose(0, 2, 3, 1),
                                                               w.transpose(0, 2, 3, 1))
        params = jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, params, g)
    variables = {"params": params, "batch_stats": stats}
    path.write_bytes(serialization.to_bytes(variables))
    y = nn.BatchNorm(use_running_average=True, epsilon=eps).apply(variables, FRESH.transpose(0, 2, 3, 1))
    return np.asarray(y).transpose(0, 3, 1, 2)


def _nnx_source(path, eps=1e-5):
    """``flax.nnx.BatchNorm`` after four training calls, with scale and bias set away from 1 and 0."""
    _need("nnx")
    from flax import nnx, serialization

    bn = nnx.BatchNorm(C, momentum=1 - MOMENTUM_NEW, epsilon=eps, rngs=nnx.Rngs(0))
    for x, _ in TRAIN:
        bn(x.transpose(0, 2, 3, 1))  # nnx updates the batch statistics on every train-mode call
    bn.scale[...] = np.array([1.5, 0.7, 1.2], np.float32)
    bn.bias[...] = np.array([0.1, -0.3, 0.2], np.float32)
    path.write_bytes(serialization.to_bytes(nnx.to_pure_dict(nnx.state(bn))))
    bn.eval()
    return np.asarray(bn(FRESH.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


def _load_nnx(path, eps=1e-5):
    _need("nnx")
    from flax import nnx, serialization

    bn = nnx.BatchNorm(C, epsilon=eps, use_running_average=True, rngs=nnx.Rngs(0))
    state = nnx.state(bn)
    raw = serialization.msgpack_restore(path.read_bytes())
    assert set(raw) == set(nnx.to_pure_dict(state))  # exactly nnx.BatchNorm's variables
    nnx.replace_by_pure_dict(state, raw)
    nnx.update(bn, state)
    return np.asarray(bn(FRESH.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


def _load_torch(path, eps=1e-5):
    torch = _need("torch")
    bn = torch.nn.BatchNorm2d(C, eps=eps)
    bn.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, nothing more
    bn.eval()
    with torch.no_grad():
        return bn(torch.from_numpy(FRESH)).numpy()


def _load_gluon(path, eps=1e-5):
    mx = _need("gluon")
    from mxnet import gluon

    bn = gluon.nn.BatchNorm(in_channels=C, epsilon=eps)
    bn.load_parameters(str(path))  # strict: allow_missing=False, ignore_extra=False
    return bn(mx.nd.array(FRESH)).asnumpy()


def _load_flax(path, eps=1e-5):
    _need("flax")
    import flax.linen as nn
    import jax
    from flax import serialization

    model = nn.BatchNorm(use_running_average=True, epsilon=eps)
    template = model.init(jax.random.key(0), FRESH.transpose(0, 2, 3, 1))
    raw = serialization.msgpack_restore(path.read_bytes())
    assert jax.tree_util.tree_structure(raw) == jax.tree_util.tree_structure(template)  # from_bytes allows extras
    variables = serialization.from_bytes(template, path.read_bytes())
    return np.asarray(model.apply(variables, FRESH.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


SOURCES = {
    # kind: (format, maker, port arguments, expected words in the table, the arguments of a naive port)
    "torch": ("torch", _torch_source, [], "unchanged", None),
    "gluon": ("gluon", _gluon_source, [], "unchanged", None),
    "flax": ("flax", _flax_source, [], "unchanged", None),
    "nnx": ("nnx", _nnx_source, [], "unchanged", None),
    "torch_eps1e-3": ("torch", lambda p: _torch_source(p, eps=1e-3), ["--src-eps", "1e-3"],
                      "eps 0.001 -> 1e-05 folded", []),
    "mxnet_op_fix_gamma": ("gluon", _mxnet_op_source, ["--src-convention", "mxnet", "--layer", "bn0_:to=(root)",
                                                   "--gluon-style", "structural"],
                           "gamma reset to 1", ["--layer", "bn0_:to=(root)", "--gluon-style", "structural"]),
    "gluon_scale_false": ("gluon", lambda p: _gluon_source(p, scale=False), ["--layer", ":fix_gamma=true"],
                          "gamma reset to 1", []),
}
LOADERS = {"torch": _load_torch, "gluon": _load_gluon, "flax": _load_flax, "nnx": _load_nnx}
SUFFIX = {"torch": ".pt", "gluon": ".params", "flax": ".msgpack", "nnx": ".nnx.msgpack"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each source kind trained once (lazily): kind -> (path, the source layer's eval output on FRESH)."""
    made: dict[str, tuple[object, np.ndarray]] = {}

    def get(kind):
        if kind not in made:
            fmt, maker = SOURCES[kind][:2]
            path = tmp_path_factory.mktemp("src") / f"{kind}{SUFFIX[fmt]}"
            made[kind] = (path, maker(path))
        return made[kind]

    return get


def port(*argv):
    return main(["port", *map(str, argv)])


@pytest.mark.parametrize("dst", FORMATS)
@pytest.mark.parametrize("kind", SRC_KINDS)
def test_native_layer_ported_gives_the_same_inference_output(kind, dst, sources, tmp_path, capsys):
    fmt, _, extra, expected, naive_extra = SOURCES[kind]
    _need(dst)
    path, y_src = sources(kind)
    out = tmp_path / f"out{SUFFIX[dst]}"
    assert port(path, "-o", out, "--from", fmt, "--to", dst, *extra) == 0
    assert expected in capsys.readouterr().out
    y_dst = LOADERS[dst](out)
    # eval-mode BN is elementwise: float32 rounding of the folded variance and of each kernel's formula
    np.testing.assert_allclose(y_dst, y_src, rtol=2e-5, atol=2e-5)
    if naive_extra is not None:  # the conversion mattered: loading the numbers unchanged is far off
        naive = tmp_path / f"naive{SUFFIX[dst]}"
        assert port(path, "-o", naive, "--from", fmt, "--to", dst, *naive_extra) == 0
        assert np.max(np.abs(LOADERS[dst](naive) - y_src)) > 1e-3


def test_statistics_mode_between_native_torch_and_gluon(sources, tmp_path):
    """Same batches, same weight a = 0.5: torch's unbiased running var ported to gluon's biased one (§2.6)."""
    _need("gluon")
    torch = _need("torch")
    from mxnet import nd

    torch_path, _ = sources("torch")
    gluon_path, _ = sources("gluon")
    count = 8 * 4 * 4
    out = tmp_path / "stats.params"
    assert port(torch_path, "-o", out, "--from", "torch", "--to", "gluon", "--preserve", "statistics",
                "--count", count, "--src-momentum", MOMENTUM_NEW) == 0
    np.testing.assert_allclose(nd.load(str(out))["running_var"].asnumpy(),
                               nd.load(str(gluon_path))["running_var"].asnumpy(), rtol=2e-6)
    back = tmp_path / "stats.pt"
    assert port(gluon_path, "-o", back, "--from", "gluon", "--to", "torch", "--preserve", "statistics",
                "--count", count, "--batches", len(TRAIN), "--src-momentum", 1 - MOMENTUM_NEW) == 0
    got, want = torch.load(back, weights_only=True), torch.load(torch_path, weights_only=True)
    np.testing.assert_allclose(got["running_var"].numpy(), want["running_var"].numpy(), rtol=2e-6)
    assert int(got["num_batches_tracked"]) == len(TRAIN)


# ---- whole models: names, maps, non-BN entries ------------------------------------------------------------------
def _torch_model_file(path):
    torch = _need("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
            self.head = torch.nn.BatchNorm2d(4, affine=False)
            self.register_buffer("steps", torch.arange(5, dtype=torch.int64))
            self.register_buffer("table", torch.randn(2, 3, dtype=torch.float64))

        def forward(self, x):
            return self.head(self.features(x))

    net = Net()
    net(torch.randn(6, 3, 4, 4) * 3 + 1)
    net.features[1].weight.data.uniform_(0.5, 2)
    torch.save(net.state_dict(), path)
    return net


def test_torch_model_to_gluon_model_loads_whole(tmp_path, capsys):
    """torch and gluon share module paths and the conv layout: the whole net loads and agrees."""
    torch = _need("torch")
    mx = _need("gluon")
    from mxnet import gluon

    net = _torch_model_file(tmp_path / "net.pt")
    del net.steps, net.table
    sd = torch.load(tmp_path / "net.pt", weights_only=True)
    del sd["steps"], sd["table"]
    torch.save(sd, tmp_path / "net2.pt")
    assert port(tmp_path / "net2.pt", "-o", tmp_path / "net.params", "--from", "torch", "--to", "gluon") == 0
    table = capsys.readouterr().out
    assert "features.1  " in table and "features.1." in table and "head." in table

    class GNet(gluon.nn.HybridBlock):
        def __init__(self):
            super().__init__()
            self.features = gluon.nn.HybridSequential()
            self.features.add(gluon.nn.Conv2D(4, 1, in_channels=3), gluon.nn.BatchNorm(in_channels=4))
            self.head = gluon.nn.BatchNorm(in_channels=4)

        def hybrid_forward(self, F, x):
            return self.head(self.features(x))

    gnet = GNet()
    gnet.load_parameters(str(tmp_path / "net.params"))  # strict
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32) * 3 + 1
    net.eval()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gnet(mx.nd.array(x)).asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_map_and_layer_settings_rename_and_configure(tmp_path, capsys):
    _need("torch")
    _need("flax")
    from flax import serialization

    _torch_model_file(tmp_path / "net.pt")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"features.1": {"to": "backbone/bn", "eps": 1e-3}, "head": "head_bn"}))
    assert port(tmp_path / "net.pt", "-o", tmp_path / "net.msgpack", "--from", "torch", "--to", "flax",
                "--map", mapping, "--layer", "head:to=top/bn") == 0
    table = capsys.readouterr().out
    assert "backbone/bn" in table and "top/bn" in table and "eps 0.001 -> 1e-05 folded" in table
    tree = serialization.msgpack_restore((tmp_path / "net.msgpack").read_bytes())
    assert set(tree["batch_stats"]) == {"backbone", "top"}
    assert set(tree["params"]) == {"backbone", "features_0"}  # head has affine=False: no scale/bias to write
    assert set(tree) == {"params", "batch_stats"}  # the buffers steps and table have no place in Flax: left out
    assert tree["params"]["features_0"]["kernel"].shape == (1, 1, 3, 4)  # OIHW -> HWIO
    assert "left out: 2 entries" in table and "steps:" in table and "table:" in table


def test_map_renames_other_entries_unchanged(torch_file, tmp_path, capsys):
    torch = _need("torch")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"features.0.weight": "stem.weight", "table": {"to": "lookup"}}))
    out = tmp_path / "o.pt"
    assert port(torch_file, "-o", out, "--from", "torch", "--to", "torch", "--map", mapping) == 0
    assert "2 renamed by the map" in capsys.readouterr().out
    a, b = torch.load(torch_file, weights_only=True), torch.load(out, weights_only=True)
    assert list(b) == [{"features.0.weight": "stem.weight", "table": "lookup"}.get(k, k) for k in a]  # same order
    assert torch.equal(a["features.0.weight"], b["stem.weight"]) and torch.equal(a["table"], b["lookup"])
    mapping.write_text(json.dumps({"features.0.weight": {"eps": 1e-3}}))
    assert port(torch_file, "-o", out, "--from", "torch", "--to", "torch", "--map", mapping) == 2
    assert "only 'to'" in capsys.readouterr().err
    mapping.write_text(json.dumps({"features.0.weight": "table"}))
    out.unlink()
    assert port(torch_file, "-o", out, "--from", "torch", "--to", "torch", "--map", mapping) == 1
    assert "would both be written as 'table'" in capsys.readouterr().err and not out.exists()


def test_mxnet_module_checkpoint_to_torch_model(tmp_path, capsys):
    """The README's example: a symbol-API checkpoint (fix_gamma, eps 1e-3, gamma drifted by weight decay) of an
    ``mx.mod.Module``, ported to a ``torch.nn.Sequential`` that loads it strictly and agrees."""
    mx = _need("mxnet")
    torch = _need("torch")
    data = mx.sym.var("data")
    net = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    net = mx.sym.BatchNorm(net, name="bn0")
    net = mx.sym.Convolution(mx.sym.Activation(net, act_type="relu"), num_filter=4, kernel=(1, 1), name="conv1")
    net = mx.sym.BatchNorm(net, name="bn1", fix_gamma=False)
    loss = mx.sym.LinearRegressionOutput(mx.sym.mean(net, axis=(1, 2, 3)), name="out")
    rng = np.random.default_rng(0)
    it = mx.io.NDArrayIter(rng.normal(size=(32, 3, 5, 5)).astype("float32"), rng.normal(size=(32,)).astype("float32"),
                           batch_size=8, label_name="out_label")
    mod = mx.mod.Module(loss, label_names=["out_label"])
    mod.fit(it, num_epoch=2, optimizer="sgd", optimizer_params={"learning_rate": 0.1, "wd": 0.05})
    mod.save_checkpoint(str(tmp_path / "stem"), 2)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"arg:conv0_weight": "0.weight", "arg:conv0_bias": "0.bias", "bn0_": "1",
                                   "arg:conv1_weight": "3.weight", "arg:conv1_bias": "3.bias",
                                   "bn1_": {"to": "4", "fix_gamma": False}}))
    out = tmp_path / "stem.pt"
    assert port(tmp_path / "stem-0002.params", "-o", out, "--from", "gluon", "--to", "torch",
                "--src-convention", "mxnet", "--map", mapping) == 0
    table = capsys.readouterr().out
    assert "gamma reset to 1" in table and table.count("eps 0.001 -> 1e-05 folded") == 2
    tnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
    tnet.load_state_dict(torch.load(out, weights_only=True))  # strict
    tnet.eval()
    x = rng.normal(size=(3, 3, 5, 5)).astype(np.float32)
    sym, args, aux = mx.model.load_checkpoint(str(tmp_path / "stem"), 2)
    assert not np.all(args["bn0_gamma"].asnumpy() == 1)  # weight decay moved the ignored gamma
    exe = sym.get_internals()["bn1_output"].bind(mx.cpu(), {**args, "data": mx.nd.array(x)}, aux_states=aux)
    with torch.no_grad():
        np.testing.assert_allclose(tnet(torch.from_numpy(x)).numpy(), exe.forward(is_train=False)[0].asnumpy(),
                                   rtol=1e-4, atol=1e-5)


def _all_entries(path, fmt):
    """Every entry of a file as NumPy arrays (or plain values), by key."""
    if fmt == "torch":
        torch = _need("torch")
        return {k: v.numpy() if isinstance(v, torch.Tensor) else v
                for k, v in torch.load(path, weights_only=True).items()}
    if fmt == "gluon":
        mx = _need("gluon")
        return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}
    from flax import serialization

    out = {}

    def walk(node, pre):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{pre}{k}/")
            else:
                out[pre + k] = v

    walk(serialization.msgpack_restore(path.read_bytes()), "")
    return out


def _flax_model_file(path):
    _need("flax")
    import flax.linen as nn
    import jax
    from flax import serialization

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (1, 1))(x)
            return nn.BatchNorm(use_running_average=False, momentum=0.5)(x)

    x = np.random.default_rng(2).normal(size=(4, 3, 3, 3)).astype(np.float32) * 2 + 1
    variables = Net().init(jax.random.key(1), x)
    _, upd = Net().apply(variables, x, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    path.write_bytes(serialization.to_bytes(variables))


def _gluon_model_file(path):
    mx = _need("gluon")
    from mxnet import autograd, gluon

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 1, in_channels=3), gluon.nn.BatchNorm(in_channels=4))
    net.initialize(mx.init.Normal(1.0))
    with autograd.record():
        y = net(mx.nd.random.normal(1, 2, shape=(4, 3, 3, 3)))
    y.backward()
    net.save_parameters(str(path))


def _nnx_model_file(path):
    _need("nnx")
    from flax import nnx, serialization

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (1, 1), rngs=rngs)
            self.blocks = nnx.List([nnx.BatchNorm(4, momentum=0.5, rngs=rngs)])

        def __call__(self, x):
            return self.blocks[0](self.conv(x))

    net = Net(nnx.Rngs(1))
    net(np.random.default_rng(2).normal(size=(4, 3, 3, 3)).astype(np.float32) * 2 + 1)
    path.write_bytes(serialization.to_bytes(nnx.to_pure_dict(nnx.state(net))))


MODEL_FILES = {"torch": _torch_model_file, "gluon": _gluon_model_file, "flax": _flax_model_file,
               "nnx": _nnx_model_file}


@pytest.mark.parametrize(("start", "via"), list(itertools.permutations(FORMATS, 2)))
def test_round_trip_keeps_every_non_bn_entry_bit_identical(start, via, tmp_path):
    for fmt in (start, via):
        _need(fmt)
    first = tmp_path / f"a{SUFFIX[start]}"
    MODEL_FILES[start](first)
    mid, back = tmp_path / f"b{SUFFIX[via]}", tmp_path / f"c{SUFFIX[start]}"
    assert port(first, "-o", mid, "--from", start, "--to", via) == 0
    assert port(mid, "-o", back, "--from", via, "--to", start) == 0
    a, c = _all_entries(first, start), _all_entries(back, start)
    src = read_checkpoint(first, start)
    assert src.layers and src.other
    kept = set(src.other)
    if start == "torch" and via in ("flax", "nnx"):  # torch buffers have no place in a Flax model: left out
        kept -= {"steps", "table"}
        assert set(a) - set(c) == {"steps", "table"}
        a = {k: v for k, v in a.items() if k in c}
    for key in kept:
        assert c[key].dtype == a[key].dtype and c[key].shape == a[key].shape
        assert c[key].tobytes() == a[key].tobytes(), key
    for key in set(a) - set(src.other):  # BN entries: the same values too (no setting changed)
        if key.endswith("num_batches_tracked") and via != "torch":
            assert int(c[key]) == 0  # the counter does not survive a format that has none
            continue
        np.testing.assert_array_equal(c[key], a[key])
    added = set(c) - set(a)
    if start == "torch" and via == "gluon":  # gluon always stores gamma/beta: the affine=False head gains 1 and 0
        assert added == {"head.weight", "head.bias"}
        np.testing.assert_array_equal(c["head.weight"], np.ones(4))
        np.testing.assert_array_equal(c["head.bias"], np.zeros(4))
    else:
        assert not added
    assert set(a) <= set(c)


def _torch_conv_bn_dense(sequential):
    """A trained torch Conv+BN+ReLU+pool+Dense model in eval mode: named modules, or an ``nn.Sequential``."""
    torch = _need("torch")
    torch.manual_seed(3)
    conv, bn, fc = torch.nn.Conv2d(3, 4, (3, 2), padding=1), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    if sequential:
        net = torch.nn.Sequential(conv, bn, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc)
    else:
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn, self.fc = conv, bn, fc

            def forward(self, x):
                return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

        net = Net()
    for _ in range(3):
        net(torch.randn(8, 3, 6, 5) * 2 + 1)  # moves the running statistics
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return net.eval()


def _flax_conv_bn_dense(names):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 2), padding=1, name=names[0])(x)
            x = nn.BatchNorm(use_running_average=True, name=names[1])(x)
            return nn.Dense(2, name=names[2])(nn.relu(x).mean((1, 2)))

    return Net()


@pytest.mark.parametrize("sequential", [False, True])
def test_torch_conv_bn_dense_model_to_the_same_flax_model(sequential, tmp_path, capsys):
    """``--to flax`` writes a tree the matching flax.linen model loads (kernels in Flax's layouts) and that gives
    the torch model's eval output; an ``nn.Sequential`` gets linen's default names through module renames."""
    torch = _need("torch")
    _need("flax")
    import jax
    from flax import serialization

    net = _torch_conv_bn_dense(sequential)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    args = []
    if sequential:
        (tmp_path / "map.json").write_text(json.dumps({"0": "Conv_0", "1": "BatchNorm_0", "5": "Dense_0"}))
        args = ["--map", tmp_path / "map.json"]
    out = tmp_path / "net.msgpack"
    assert port(tmp_path / "net.pt", "-o", out, "--from", "torch", "--to", "flax", *args) == 0
    summary = capsys.readouterr().out
    assert "4 other entries placed by the flax layout under params (2 kernels transposed" in summary
    model = _flax_conv_bn_dense(("Conv_0", "BatchNorm_0", "Dense_0") if sequential else ("conv", "bn", "fc"))
    x = np.random.default_rng(4).normal(size=(5, 3, 6, 5)).astype(np.float32) * 2 + 1
    template = model.init(jax.random.key(0), x.transpose(0, 2, 3, 1))
    raw = serialization.msgpack_restore(out.read_bytes())
    assert jax.tree_util.tree_structure(raw) == jax.tree_util.tree_structure(template)  # nothing extra, nothing less
    assert jax.tree_util.tree_map(np.shape, raw) == jax.tree_util.tree_map(np.shape, template)
    variables = serialization.from_bytes(template, out.read_bytes())
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and back: the torch model loads the Flax file's conversion strictly and agrees
    back = tmp_path / "back.pt"
    inverse = {"Conv_0": "0", "BatchNorm_0": "1", "Dense_0": "5"} if sequential else {}
    (tmp_path / "inv.json").write_text(json.dumps(inverse))
    assert port(out, "-o", back, "--from", "flax", "--to", "torch", "--map", tmp_path / "inv.json") == 0
    again = _torch_conv_bn_dense(sequential)
    again.load_state_dict(torch.load(back, weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(torch.from_numpy(x)).numpy(), want, rtol=1e-6, atol=1e-6)


def test_torch_conv_bn_dense_model_to_the_same_nnx_model(tmp_path, capsys):
    """``--to nnx``: the state of the matching ``flax.nnx`` model (attribute paths, a list index as a path
    component) loads with ``nnx.replace_by_pure_dict`` and gives the torch model's eval output; and back."""
    torch = _need("torch")
    _need("nnx")
    from flax import nnx, serialization

    net = _torch_conv_bn_dense(sequential=False)
    sd = {k.replace("fc.", "fc.0."): v for k, v in net.state_dict().items()}  # torch ModuleList([Linear]) names
    torch.save(sd, tmp_path / "net.pt")
    out = tmp_path / "net.msgpack"
    assert port(tmp_path / "net.pt", "-o", out, "--from", "torch", "--to", "nnx") == 0
    assert "(2 kernels transposed OIHW -> HWIO" in capsys.readouterr().out

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 2), padding=1, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.fc = nnx.List([nnx.Linear(4, 2, rngs=rngs)])

        def __call__(self, x):
            return self.fc[0](nnx.relu(self.bn(self.conv(x))).mean((1, 2)))

    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    raw = serialization.msgpack_restore(out.read_bytes())
    pure = nnx.to_pure_dict(state)
    assert {k: set(map(str, v)) for k, v in raw.items()} == {k: set(map(str, v)) for k, v in pure.items()}
    nnx.replace_by_pure_dict(state, raw)
    nnx.update(model, state)
    x = np.random.default_rng(5).normal(size=(3, 3, 6, 5)).astype(np.float32) * 2 + 1
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(x.transpose(0, 2, 3, 1))), want, rtol=1e-5, atol=1e-5)
    assert port(out, "-o", tmp_path / "back.pt", "--from", "nnx", "--to", "torch") == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]) or k.endswith("num_batches_tracked"), k


def test_gluon_model_to_flax_places_kernels(tmp_path, capsys):
    _need("gluon")
    _need("flax")
    from flax import serialization

    _gluon_model_file(tmp_path / "g.params")
    assert port(tmp_path / "g.params", "-o", tmp_path / "g.msgpack", "--from", "gluon", "--to", "flax") == 0
    tree = serialization.msgpack_restore((tmp_path / "g.msgpack").read_bytes())
    assert set(tree) == {"params", "batch_stats"}
    assert tree["params"]["0"]["kernel"].shape == (1, 1, 3, 4) and tree["params"]["0"]["bias"].shape == (4,)


def test_pickled_module_file_is_named_as_such(tmp_path, capsys):
    torch = _need("torch")
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), tmp_path / "model.pt")
    assert port(tmp_path / "model.pt", "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch") == 1
    err = capsys.readouterr().err
    assert "holds a pickled Python object (torch.nn.modules.container.Sequential)" in err
    assert "torch.save(model.state_dict(), PATH)" in err and "corrupt" not in err
    assert not (tmp_path / "o.pt").exists()


def test_bfloat16_fold_reports_only_what_was_stored(tmp_path, capsys):
    """A change below a bfloat16 ulp is not reported as folded; one that fits is folded once, from float32."""
    torch = _need("torch")
    var = torch.tensor([1.0, 1.5, 0.01, 0.02], dtype=torch.bfloat16)  # ulp 2^-7 at 1; 2^-14 near 0.01
    sd = {"bn.weight": torch.ones(4, dtype=torch.bfloat16), "bn.bias": torch.zeros(4, dtype=torch.bfloat16),
          "bn.running_mean": torch.zeros(4, dtype=torch.bfloat16), "bn.running_var": var,
          "bn.num_batches_tracked": torch.tensor(3)}
    torch.save(sd, tmp_path / "bf16.pt")
    out = tmp_path / "o.pt"
    assert port(tmp_path / "bf16.pt", "-o", out, "--from", "torch", "--to", "torch", "--dst-eps", "1e-3") == 0
    captured = capsys.readouterr()
    assert "bfloat16 cannot hold the change at channels [0, 1]" in captured.out
    assert "warning" in captured.err
    got = torch.load(out, weights_only=True)["bn.running_var"]
    want = (var.float() + (1e-5 - 1e-3)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(got[:2], var[:2]) and not torch.equal(got[2:], var[2:])
    # every channel below an ulp: nothing folded, and the table says so
    sd["bn.running_var"] = var[:2].clone()
    for k in ("bn.weight", "bn.bias", "bn.running_mean"):
        sd[k] = sd[k][:2].clone()
    torch.save(sd, tmp_path / "bf16b.pt")
    assert port(tmp_path / "bf16b.pt", "-o", out, "--from", "torch", "--to", "torch", "--dst-eps", "1e-3") == 0
    table = capsys.readouterr().out
    assert "NOT folded: the change is below a bfloat16 ulp" in table and "folded into running_var" not in table


# ---- refusals: bad files, bad maps, unconvertible layers; nothing partial is ever written -------------------------
def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def torch_file(tmp_path):
    _need("torch")
    path = tmp_path / "in.pt"
    _torch_model_file(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_bad_input_files_are_refused_without_output(fmt, damage, tmp_path, capsys):
    _need(fmt)
    good = tmp_path / f"good{SUFFIX[fmt]}"
    MODEL_FILES[fmt](good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{SUFFIX[fmt]}"
    rng = np.random.default_rng(0)
    if damage == "corrupt":  # keep the header, scramble the rest
        bad.write_bytes(data[:16] + rng.integers(0, 256, size=len(data) - 16, dtype=np.uint8).tobytes())
    else:
        bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    before = _listing(tmp_path)
    out = tmp_path / "out.pt"
    assert port(bad, "-o", out, "--from", fmt, "--to", "torch") == 1
    err = capsys.readouterr().err
    assert str(bad) in err
    assert any(word in err for word in ("corrupt", "truncated", "empty", "not a")), err
    assert _listing(tmp_path) == before  # no output, no temporary file


def test_wrong_format_and_missing_file(torch_file, tmp_path, capsys):
    _need("torch")
    assert port(torch_file, "-o", tmp_path / "o.params", "--from", "gluon", "--to", "torch") == 1
    assert "not an MXNet parameter file" in capsys.readouterr().err
    assert port(tmp_path / "nope.pt", "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch") == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.params").exists()


def test_torch_file_that_is_not_a_state_dict(tmp_path, capsys):
    torch = _need("torch")
    torch.save({"epoch": 3, "model": {"bn.running_mean": torch.zeros(2)}}, tmp_path / "ckpt.pt")
    assert port(tmp_path / "ckpt.pt", "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch") == 1
    assert "save the model's state_dict itself" in capsys.readouterr().err
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        read_checkpoint(tmp_path / "list.pt", "torch")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"features.9": "x", "head": "h"}', "'features.9' is not a BN layer"),
        ('{"features.1": {"to": "a", "gamma": 1}}', "unknown setting 'gamma'"),
        ('{"features.1": {"eps": -1}}', "eps must be >= 0"),
        ('{"features.1": {"fix_gamma": "maybe"}}', "expected true or false"),
        ('{"features.1": 3}', "expected a destination name or an object"),
    ],
)
def test_bad_maps_are_refused(content, match, torch_file, tmp_path, capsys):
    mapping = tmp_path / "map.json"
    mapping.write_text(content)
    before = _listing(tmp_path)
    assert port(torch_file, "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch", "--map", mapping) == 2
    assert any(m in capsys.readouterr().err for m in match.split("|"))
    assert _listing(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["--layer", "features.1"], 2, "expected NAME:KEY=VALUE"),
        (["--layer", "features.1:eps"], 2, "is not KEY=VALUE"),
        (["--layer", "features.1:eps=abc"], 2, "could not convert"),
        (["--map", "missing.json"], 2, "cannot read it"),
        (["--count", "8"], 2, "only with --preserve statistics"),
        (["--src-eps", "-1"], 2, "eps must be >= 0"),
        (["--layer", "head:to=x", "--layer", "features.1:to=x"], 1, "is also mapped to this name"),
        (["--layer", "features.1:to=features.0"], 1, "would both be written as 'features.0.weight'"),
        (["--dst-eps", "50"], 1, "would make it negative"),
        (["--preserve", "statistics", "--dst-convention", "gluon"], 2, "needs --count N"),
        (["--preserve", "statistics", "--count", "0"], 2, "--count must be an integer >= 2"),
        (["--dst-eps", "inf"], 2, "--dst-eps must be finite"),
        (["--src-eps", "nan"], 2, "--src-eps must be finite"),
        (["--layer", "features.1:dst_eps=inf"], 2, "dst_eps must be finite"),
        (["--dst-convention", "mxnet"], 0, "folded into running_var (destination fix_gamma)"),
    ],
)
def test_bad_arguments_and_unconvertible_layers(args, code, match, torch_file, tmp_path, capsys):
    out = tmp_path / "o.pt"
    out.write_bytes(b"previous")  # an existing output is left as it was on failure
    before = _listing(tmp_path)
    assert port(torch_file, "-o", out, "--from", "torch", "--to", "torch", *args) == code
    captured = capsys.readouterr()
    assert any(m in captured.out + captured.err for m in match.split("|")), captured
    assert _listing(tmp_path) == before
    if code:
        assert out.read_bytes() == b"previous"


def test_incomplete_bn_entries_are_reported_not_dropped(tmp_path, capsys):
    torch = _need("torch")
    torch.save({"a.running_mean": torch.zeros(2), "a.weight": torch.ones(2), "b.running_var": torch.ones(3),
                "b.running_mean": torch.zeros(3)}, tmp_path / "in.pt")
    assert port(tmp_path / "in.pt", "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch") == 1
    captured = capsys.readouterr()
    assert "'a.running_mean' has no matching running variance" in captured.out
    assert "not written" in captured.err and not (tmp_path / "o.pt").exists()


def test_no_bn_layers_is_an_error(tmp_path, capsys):
    torch = _need("torch")
    torch.save({"w": torch.zeros(2)}, tmp_path / "in.pt")
    assert port(tmp_path / "in.pt", "-o", tmp_path / "o.pt", "--from", "torch", "--to", "torch") == 1
    assert "no BN layers found" in capsys.readouterr().err


def test_entries_a_format_cannot_hold_are_refused(tmp_path, capsys):
    torch = _need("torch")
    _need("gluon")
    bn = torch.nn.BatchNorm2d(2).state_dict()
    for extra in ({"w": torch.ones(2, dtype=torch.bfloat16)}, {"scalar": torch.tensor(3.0)}):
        torch.save({**bn, **extra}, tmp_path / "in.pt")
        assert port(tmp_path / "in.pt", "-o", tmp_path / "o.params", "--from", "torch", "--to", "gluon") == 1
        assert "not written" in capsys.readouterr().err
        assert not (tmp_path / "o.params").exists()


def test_a_failing_write_leaves_nothing_behind(torch_file, tmp_path, monkeypatch, capsys):
    torch = _need("torch")
    real_save = torch.save

    def half_save(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    out = tmp_path / "o.pt"
    out.write_bytes(b"previous")
    before = _listing(tmp_path)
    assert port(torch_file, "-o", out, "--from", "torch", "--to", "torch") == 1
    assert "No space left" in capsys.readouterr().err
    assert _listing(tmp_path) == before and out.read_bytes() == b"previous"


def test_convert_state_is_exported():
    """(That importing multibn and its commands imports no framework is tests/test_imports.py.)"""
    assert multibn.convert_state is convert_state and "convert_state" in multibn.__all__
