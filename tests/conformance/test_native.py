"""multibn against the frameworks' own batch norms, under the matching convention.

PyTorch ``F.batch_norm`` and ``nn.BatchNorm1d/2d/3d`` (``torch``, ``torch_cma`` for ``momentum=None``,
``affine=False``, ``track_running_stats=False``); MXNet ``nd.BatchNorm`` (``mxnet`` with ``fix_gamma``,
``gluon``-like without, ``use_global_stats=True`` for eval, ``axis=-1``) and ``gluon.nn.BatchNorm`` against
``multibn.layers.gluon.BatchNorm(update="backward")``; ``flax.linen.BatchNorm`` (``flax``, ``use_fast_variance``
both ways); Keras 3 ``BatchNormalization`` (``keras``) on its jax and torch backends, each in a subprocess since
Keras picks its backend at import.

Outputs, gradients (each framework's autodiff) and running statistics are compared after every step, within the
sum of the two sides' error bounds from :mod:`multibn.conformance.reference` (a native one-pass variance or MXNet's
variance recovered as ``1/invstd^2 - eps`` gets the extra error it causes; no other allowance).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from multibn import conformance as C
from multibn.conformance import reference as R
from multibn.conventions import CONVENTIONS
from tests.helpers import installed, need, need_installed, require


def _need(backend: str, *modules: str) -> None:
    require(backend)
    for m in modules:
        need(m, "a test dependency of the native comparisons")


def _assert_native(nat: C.Native, native_run: C.Run | None = None) -> None:
    rows = C.compare_native(nat, native_run)
    assert rows, "nothing compared"
    bad = [r for r in rows if not r.ok]
    assert not bad, nat.label + " " + nat.case.describe() + "\n" + "\n".join(
        f"  {r.quantity}: {r.detail} (err/bound {r.err_to_tol:.3g})" for r in bad)


MXNET = C.MXNET_NATIVE  # what MXNet's own kernel is allowed beyond multibn's bound (stated in conformance.native)


# ---- PyTorch --------------------------------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("momentum,eps", [(None, None), (0.0, 1e-3), (1.0, 1e-9), (0.37, 0.1)])
def test_torch_functional(rank: int, dtype: str, momentum: float | None, eps: float | None) -> None:
    """(torch 2.13 refuses eps = 0 in training, "eps must be positive"; multibn's torch convention takes an eps=0
    override with ATen's zero-variance guard, checked against the reference in test_conformance.)"""
    _need("torch")
    shape = (4, 3, 3, 2, 2)[:rank]
    case = C.make_case(f"F rank{rank}", "torch", dtype, [shape, shape, (2, *shape[1:])],
                       training=[True, True, False], seed=rank, offsets=[0.0, 4.0, 40.0], momentum=momentum,
                       eps=eps, constant=[0] if eps == 1e-9 else ())
    _assert_native(C.Native("F.batch_norm", "torch", case, lambda c: C.native_torch(c, functional=True)))


@pytest.mark.torch
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("variant", ["default", "momentum=None", "affine=False", "track_running_stats=False"])
def test_torch_modules(rank: int, variant: str) -> None:
    """nn.BatchNorm1d (rank 2, 3), 2d (4), 3d (5): momentum=None is the torch_cma convention; affine=False is
    gamma 1, beta 0; track_running_stats=False is state=None, batch statistics in eval mode too."""
    _need("torch")
    shape = (5, 3, 2, 3, 2)[:rank]
    conv = "torch_cma" if variant == "momentum=None" else "torch"
    affine = variant != "affine=False"
    track = variant != "track_running_stats=False"
    case = C.make_case(variant, conv, "float32", [shape, (3, *shape[1:]), shape, (1, *shape[1:])],
                       training=[True, True, True, False] if track else [True] * 4, seed=10 + rank,
                       offsets=[0.0, 2.0, 20.0], gamma=None if affine else [1.0] * 3,
                       beta=None if affine else [0.0] * 3)
    nat = C.Native(f"nn.BatchNorm{ {2: 1, 3: 1, 4: 2, 5: 3}[rank]}d({variant})", "torch", case,
                   lambda c: C.native_torch(c, functional=False, affine=affine, track=track,
                                             eval_mode_last=not track),
                   multibn_case=None if track else dataclasses.replace(case, stateful=False))
    _assert_native(nat)


@pytest.mark.torch
def test_torch_module_empty_batch_counts() -> None:
    """PyTorch's module counts an empty batch in num_batches_tracked and leaves the statistics alone."""
    _need("torch")
    for conv in ("torch", "torch_cma"):
        case = C.make_case("empty", conv, "float32", [(3, 2, 4), (0, 2, 4), (3, 2, 4)], seed=5)
        _assert_native(C.Native("nn.BatchNorm1d", "torch", case, lambda c: C.native_torch(c, functional=False)))


@pytest.mark.torch
def test_torch_one_value_per_channel_raises_like_torch() -> None:
    _need("torch")
    case = C.make_case("n=1", "torch", "float32", [(1, 3)], seed=6)
    native = C.native_torch(case, functional=True)
    ours = C.backend_run(case, "torch")
    assert isinstance(native.error[1], ValueError) and isinstance(ours.error[1], ValueError)
    assert "more than 1 value per channel" in str(native.error[1]) and "more than 1 value per channel" in str(
        ours.error[1])


@pytest.mark.torch
@given(rank=st.integers(2, 5), seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 1.0, 1e2, 1e4]),
       momentum=st.sampled_from([None, 0.0, 0.5, 1.0]), steps=st.integers(1, 3), cma=st.booleans())
def test_torch_module_property(rank: int, seed: int, offset: float, momentum: float | None, steps: int,
                               cma: bool) -> None:
    _need("torch")
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 4, rank))
    shape = (max(shape[0], 2), *shape[1:])
    conv = "torch_cma" if cma else "torch"
    case = C.make_case("prop", conv, "float32", [shape] * steps + [shape], training=[True] * steps + [False],
                       seed=seed, offsets=offset, momentum=None if cma else momentum)
    note(case.describe())
    _assert_native(C.Native("nn.BatchNorm", "torch", case, lambda c: C.native_torch(c, functional=False)))


# ---- MXNet -----------------------------------------------------------------------------------------------------------
@pytest.mark.mxnet
@pytest.mark.parametrize("fix_gamma", [True, False])
@pytest.mark.parametrize("axis,rank", [(1, 2), (1, 4), (-1, 3), (-1, 4), (2, 5)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_mxnet_nd_batchnorm(fix_gamma: bool, axis: int, rank: int, dtype: str) -> None:
    """``nd.BatchNorm`` under ``autograd.record()`` with a backward per training step (its CPU kernel moves the
    moving statistics in the backward), eval with ``use_global_stats=True``; fix_gamma=True is the ``mxnet``
    convention, fix_gamma=False the same with gamma used."""
    _need("mxnet")
    conv = CONVENTIONS["mxnet"] if fix_gamma else dataclasses.replace(CONVENTIONS["mxnet"], fix_gamma=False,
                                                                       name="mxnet(fix_gamma=False)")
    shape = (4, 3, 3, 2, 2)[:rank]
    shape = tuple(3 if i == axis % rank else s for i, s in enumerate(shape))
    small = tuple(1 if i == 0 and axis % rank != 0 else s for i, s in enumerate(shape))
    case = C.make_case(f"rank{rank} axis{axis}", conv, dtype, [shape, shape, small], training=[True, True, False],
                       axis=axis, seed=rank, offsets=[0.0, 3.0, 30.0])
    _assert_native(C.Native(f"nd.BatchNorm(fix_gamma={fix_gamma})", "mxnet", case,
                            lambda c: C.native_mxnet(c, fix_gamma=fix_gamma), **MXNET))


@pytest.mark.mxnet
@pytest.mark.parametrize("eps,momentum", [(1e-5, 0.9), (1e-3, 0.0), (0.1, 1.0), (1e-5, 0.25)])
def test_mxnet_gluon_convention_against_nd(eps: float, momentum: float) -> None:
    _need("mxnet")
    case = C.make_case("gluon", "gluon", "float32", [(6, 4), (3, 4), (2, 4)], training=[True, True, False],
                       seed=7, offsets=[0.0, 1.0, 10.0, 1e3], eps=eps, momentum=momentum)
    _assert_native(C.Native("nd.BatchNorm(fix_gamma=False)", "mxnet", case,
                            lambda c: C.native_mxnet(c, fix_gamma=False), **MXNET))


@pytest.mark.mxnet
@pytest.mark.slow
def test_mxnet_large_reduction() -> None:
    """``docs/semantics.md`` §6: MXNet's kernel is ~1e-4 off float64 on large reductions (float32 accumulation);
    the n u terms of the bound are what allow it."""
    _need("mxnet")
    case = C.make_case("large", "mxnet", "float32", [(16, 8, 56, 56)] * 2, training=[True, False], seed=14,
                       offsets=[0.0, 1.0, 10.0, 100.0])
    _assert_native(C.Native("nd.BatchNorm", "mxnet", case, lambda c: C.native_mxnet(c, fix_gamma=True), **MXNET))


@pytest.mark.mxnet
def test_mxnet_moving_stats_move_only_in_backward() -> None:
    """Why the native runner runs a backward per step: on CPU a forward alone leaves the moving statistics."""
    _need("mxnet")
    from multibn.backends import get_backend

    get_backend("mxnet")
    from mxnet import autograd, nd

    x = nd.array(np.arange(12.0).reshape(4, 3))
    g, b, mm, mv = nd.ones(3), nd.zeros(3), nd.zeros(3), nd.ones(3)
    x.attach_grad()
    with autograd.record():
        y = nd.BatchNorm(x, g, b, mm, mv, fix_gamma=False)
    np.testing.assert_array_equal(mm.asnumpy(), 0)
    y.backward()
    assert np.all(mm.asnumpy() != 0)


def _gluon_steps(block: object, case: C.Case, plan: list[str]) -> list[dict[str, np.ndarray]]:
    """Run a Gluon BN block: plan entries "train" (record + backward), "forward" (record, no backward),
    "eval" (outside record: predict mode, then a backward with train_mode=False)."""
    from mxnet import autograd, nd

    out = []
    for step, what in zip(case.steps, plan, strict=True):
        x = nd.array(step.x.astype(np.float32))
        x.attach_grad()
        dy = nd.array(step.dy.astype(np.float32))
        if what == "eval":
            with autograd.record(train_mode=False):
                y = block(x)
            y.backward(dy, train_mode=False)
        else:
            with autograd.record():
                y = block(x)
            if what == "train":
                y.backward(dy)
        rec = {"y": y.asnumpy().astype(np.float64), "running_mean": block.running_mean.data().asnumpy().astype(
            np.float64), "running_var": block.running_var.data().asnumpy().astype(np.float64)}
        if what != "forward":
            rec.update(dx=x.grad.asnumpy().astype(np.float64),
                       dgamma=block.gamma.grad().asnumpy().astype(np.float64),
                       dbeta=block.beta.grad().asnumpy().astype(np.float64))
        out.append(rec)
    return out


@pytest.mark.mxnet
def test_gluon_block_against_multibn_layer_backward_timing() -> None:
    """``gluon.nn.BatchNorm`` against ``multibn.layers.gluon.BatchNorm(update="backward")``, step for step,
    including a training forward with no backward (no update on either side) and a predict-mode step."""
    _need("mxnet")
    from multibn.backends import get_backend

    get_backend("mxnet")
    from mxnet import gluon, initializer

    from multibn.layers.gluon import BatchNorm

    plan = ["train", "forward", "train", "train", "eval"]
    shape = (4, 3, 2, 2)
    case = C.make_case("gluon", "gluon", "float32", [shape] * 4 + [(2, *shape[1:])], seed=8,
                       offsets=[0.0, 2.0, 20.0], training=[p != "eval" for p in plan])
    native = gluon.nn.BatchNorm(in_channels=3)
    ours = BatchNorm(3, 4, update="backward")
    for blk in (native, ours):
        blk.initialize(initializer.Zero())
        blk.gamma.set_data(case.gamma.astype(np.float32))
        blk.beta.set_data(case.beta.astype(np.float32))
        blk.running_mean.set_data(np.zeros(3, np.float32))
        blk.running_var.set_data(np.ones(3, np.float32))
    got_n, got_o = _gluon_steps(native, case, plan), _gluon_steps(ours, case, plan)
    # reference: a "forward" step normalises with batch statistics and moves nothing
    conv = case.conv
    state, err, steps, bounds = R.init_ref_state(3), None, [], []
    for step, what in zip(case.steps, plan, strict=True):
        rs = R.reference_step(step.x, case.gamma, case.beta, None if what == "forward" else state, step.dy,
                              training=what != "eval", convention=conv, axis=1)
        b, err = R.step_bounds(rs, step.x, step.dy, case.beta, axis=1, eps=conv.eps, dtype="float32", err_in=err,
                               extra_var_rel=MXNET["extra_var_rel"])
        state = rs.state if what == "train" else state
        rec = {"y": rs.y, "running_mean": state.running_mean, "running_var": state.running_var}
        b.setdefault("running_mean", err.mean)
        b.setdefault("running_var", err.var)
        if what != "forward":
            rec.update(dx=rs.dx, dgamma=rs.dgamma, dbeta=rs.dbeta)
        steps.append(rec)
        bounds.append({q: 2 * v for q, v in b.items()})
    ref = C.Run(steps)
    for name, got in (("gluon.nn.BatchNorm", got_n), ("multibn.layers.gluon.BatchNorm", got_o)):
        comps = C.compare_runs(C.Run(got), ref, bounds, common_only=True)
        bad = {q: c.detail for q, c in comps.items() if not c.ok}
        assert not bad, f"{name} vs reference: {bad}"
    comps = C.compare_runs(C.Run(got_o), C.Run(got_n), [{q: 2 * v for q, v in b.items()} for b in bounds])
    bad = {q: c.detail for q, c in comps.items() if not c.ok}
    assert not bad, f"multibn layer vs gluon.nn.BatchNorm: {bad}"


# ---- Flax ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_variance", [False, True])
@pytest.mark.parametrize("momentum,eps,axis", [(None, None, None), (0.9, 1e-3, 1), (0.0, 0.1, -2)])
def test_flax_linen(fast_variance: bool, momentum: float | None, eps: float | None, axis: int | None) -> None:
    """``flax.linen.BatchNorm``: the one-pass fast variance gets the error it causes (n u max|x|^2), so its data
    keep |mean|/std small; the two-pass one also runs on |mean|/std = 300."""
    _need("jax", "flax")
    shape = (3, 2, 4, 3) if axis != 1 else (3, 3, 4, 2)
    channels = shape[-1 if axis is None else axis]
    offsets = ([0.0, 1.0, 2.0, 0.5] if fast_variance else [0.0, 3.0, 300.0, 30.0])[:channels]
    case = C.make_case("linen", "flax", "float32", [shape, shape, (1, *shape[1:])], training=[True, True, False],
                       axis=axis, seed=9, offsets=offsets, momentum=momentum, eps=eps)
    _assert_native(C.Native(f"linen.BatchNorm(use_fast_variance={fast_variance})", "jax", case,
                            lambda c: C.native_flax(c, fast_variance=fast_variance),
                            extra_var=1.0 if fast_variance else 0.0))


def test_flax_fast_variance_is_one_pass() -> None:
    """The allowance above is needed: on |mean|/std = 300 the fast variance leaves the two-pass bound."""
    _need("jax", "flax")
    case = C.make_case("offset", "flax", "float32", [(16, 3)] * 2, seed=3, offsets=300.0)
    rows = C.compare_native(C.Native("fast", "jax", case, lambda c: C.native_flax(c, fast_variance=True)))
    assert not all(r.ok for r in rows if r.quantity == "running_var")


# ---- Keras 3 ---------------------------------------------------------------------------------------------------------
KERAS_CASES = {
    "jax": C.make_case("keras", "keras", "float32", [(4, 3, 5), (6, 3, 5), (2, 3, 5)], training=[True, True, False],
                       seed=12, offsets=[0.0, 1.0, 2.0, 0.5, 30.0]),
    "torch": C.make_case("keras", "keras", "float32", [(4, 2, 3, 4), (4, 2, 3, 4), (1, 2, 3, 4)],
                         training=[True, True, False], seed=13, offsets=[0.0, 1.0, 2.0, 0.5], momentum=0.9),
}


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, C.Run]:
    """Both Keras backends at once, each in its own subprocess (KERAS_BACKEND is read at import)."""
    need_installed("keras", "a test dependency of the native comparisons")
    workdir = str(tmp_path_factory.mktemp("keras"))
    here = installed(tuple(KERAS_CASES))
    jobs = {kb: C.start_keras(case, kb, workdir) for kb, case in KERAS_CASES.items() if kb in here}
    return {kb: C.finish_keras(*job, len(KERAS_CASES[kb].steps)) for kb, job in jobs.items()}


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_keras_batch_normalization(keras_backend: str, keras_runs: dict[str, C.Run]) -> None:
    """Keras 3 ``BatchNormalization`` on its jax backend (two-pass ``jnp.var``) and its torch backend (one-pass
    E[x^2] - E[x]^2, allowed the error it causes) against multibn's keras convention on the same framework."""
    require(keras_backend)
    need_installed("keras", "a test dependency of the native comparisons")
    run = keras_runs[keras_backend]
    assert run.error is None, run.error
    _assert_native(C.Native(f"keras[{keras_backend}]", keras_backend, KERAS_CASES[keras_backend], lambda c: run,
                            extra_var=1.0 if keras_backend == "torch" else 0.0), run)


@pytest.mark.mxnet
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), fix_gamma=st.booleans(), rank=st.integers(2, 4), last=st.booleans())
def test_mxnet_property(seed: int, fix_gamma: bool, rank: int, last: bool) -> None:
    _need("mxnet")
    conv = CONVENTIONS["mxnet"] if fix_gamma else dataclasses.replace(CONVENTIONS["gluon"], name="gluon")
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(2, 4, rank))
    case = C.make_case("prop", conv, "float32", [shape] * 3, training=[True, True, False], seed=seed,
                       axis=-1 if last else 1, offsets=float(rng.choice([0.0, 10.0, 1e3])))
    _assert_native(C.Native("nd.BatchNorm", "mxnet", case, lambda c: C.native_mxnet(c, fix_gamma=fix_gamma),
                            **MXNET))
