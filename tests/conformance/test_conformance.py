"""Cross-backend conformance: every installed backend against the float64 reference, and against each other.

The reference is :mod:`multibn.conformance.reference` (pure NumPy, textbook formulas, independent of
multibn.algorithm); the tolerance is its one table of unit roundoffs per dtype and the error model of
``step_bounds`` (stated and justified there). Cases, runners and comparisons come from :mod:`multibn.conformance`,
which ``multibn check`` runs with fixed seeds; here hypothesis draws them (bounded examples by default, many more
with ``--slow``).

For each drawn case and each installed backend, after every step: ``y``, ``dx``, ``dgamma``, ``dbeta``,
``running_mean``, ``running_var`` within the bound, ``num_batches_tracked`` exactly, NaN/+inf/-inf at exactly
the reference's positions; a refusal (one value per channel under PyTorch's rules) at the same step. Backend
pairs are compared with twice the bound. What a backend cannot do is listed once, in
``multibn.conformance.UNSUPPORTED``, and ``test_unsupported_raises`` asserts that each raises a clear error.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import multibn
from multibn import algorithm as alg
from multibn import conformance as C
from multibn.backends.base import Backend
from multibn.conventions import CONVENTIONS
from tests.helpers import ALL_BACKENDS, installed, jax_float64, left_to_full, need, require

INSTALLED = installed(ALL_BACKENDS)
CHECKED = tuple(b for b in INSTALLED if not left_to_full(b))  # compared with the reference in this environment
DTYPES = ("float16", "bfloat16", "float32", "float64")
def fewer(fraction: float) -> settings:
    """The loaded profile with ``fraction`` of its examples (at least 5): for the costlier properties."""
    return settings(max_examples=max(5, int(settings().max_examples * fraction)))




# ---- strategies -----------------------------------------------------------------------------------------------------
SPREADS = {"float16": (0.5, 1.0, 4.0), "bfloat16": (1e-3, 1.0, 1e3), "float32": (1e-3, 1.0, 1e3),
           "float64": (1e-3, 1.0, 1e3)}  # float16: |x| stays far below 65504 with |mean|/std up to 1e4
OFFSETS = (0.0, 0.0, 1.0, 100.0, 1e4)  # |mean| / std per channel


@st.composite
def bn_cases(draw: st.DrawFn, dtypes: tuple[str, ...] = DTYPES, conventions: tuple[str, ...] = tuple(CONVENTIONS),
             nonfinite: bool = True) -> C.Case:
    """A training sequence then eval steps: rank 2-5, any channel axis (first, last, negative or the convention's
    default), tiny sizes down to one value per channel, empty batches, |mean|/std up to 1e4, constant channels,
    NaN/inf entries, momentum and eps overrides (0 and 1 included), state or none."""
    conv = draw(st.sampled_from(conventions), label="convention")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    rank = draw(st.integers(2, 5), label="rank")
    axis = draw(st.one_of(st.none(), st.integers(-rank, rank - 1)), label="axis")
    ax = (CONVENTIONS[conv].axis if axis is None else axis) % rank
    channels = draw(st.integers(1, 4), label="channels")
    reduced = draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1), label="reduced sizes")
    stateful = draw(st.integers(0, 4), label="stateful") > 0
    n_train = draw(st.integers(1, 3), label="training steps")
    n_eval = draw(st.integers(0, 2), label="eval steps") if stateful else 0
    nonfinite = nonfinite and draw(st.integers(0, 4), label="nonfinite") == 0
    eps = draw(st.one_of(st.none(), st.sampled_from((0.0, 1e-5, 1e-3, 0.25))), label="eps")
    shapes = []
    for _ in range(n_train + n_eval):
        dims = list(reduced)
        dims[0] = draw(st.sampled_from((dims[0], dims[0], dims[0], 1, 5, 0)), label="batch size")  # 0: empty
        dims.insert(ax, channels)
        shapes.append(tuple(dims))
    # (a momentum below float32's smallest normal number is out of scope: it flushes to 0 in float32 arithmetic)
    momentum = draw(st.one_of(st.none(), st.sampled_from((0.0, 0.1, 0.5, 0.9, 0.99, 1.0)), st.floats(1e-6, 1)),
                    label="momentum")
    offsets = draw(st.lists(st.sampled_from(OFFSETS), min_size=channels, max_size=channels), label="offsets")
    constant = [c for c in range(channels) if draw(st.integers(0, 5), label="constant channel") == 0]
    specials = []
    if nonfinite:
        for _ in range(draw(st.integers(1, 2))):
            specials.append((draw(st.integers(0, n_train + n_eval - 1)), draw(st.integers(0, 10**6)),
                             draw(st.sampled_from((float("nan"), float("inf"), float("-inf"))))))
    gamma = draw(st.lists(st.sampled_from((1.0, -1.5, 0.0, 0.3, 2.0)), min_size=channels, max_size=channels),
                 label="gamma")
    return C.make_case(
        "drawn", conv, dtype, shapes, training=[True] * n_train + [False] * n_eval, axis=axis,
        seed=draw(st.integers(0, 2**32 - 1), label="seed"), offsets=offsets,
        spread=draw(st.sampled_from(SPREADS[dtype]), label="spread"), constant=constant, specials=specials,
        momentum=momentum, eps=eps, stateful=stateful, gamma=gamma,
    )


def _assert_rows(case: C.Case, rows: list[C.Row]) -> None:
    bad = [r for r in rows if not r.ok]
    assert not bad, case.describe() + "\n" + "\n".join(
        f"  {r.backend} {r.quantity}: {r.detail} (max abs err {r.max_abs_err:.3g}, err/bound {r.err_to_tol:.3g})"
        for r in bad)


# ---- the property -------------------------------------------------------------------------------------------------
@given(case=bn_cases())
def test_every_backend_matches_the_reference(case: C.Case) -> None:
    note(case.describe())
    rows, skipped = C.check_case(case, CHECKED)
    note(f"not run (listed in UNSUPPORTED): {skipped}")
    _assert_rows(case, rows)


@given(case=bn_cases(dtypes=("float64",), nonfinite=False))
def test_the_bound_tells_conventions_apart(case: C.Case) -> None:
    """The comparison is not vacuous: the reference of another convention (other momentum side or value, eps,
    variance store or fix_gamma) fails against this one's bound whenever a training step moves the state."""
    case = dataclasses.replace(case, momentum=None, eps=None, stateful=True)
    ref = C.reference_run(case)
    assume(ref.error is None and any(s.training and s.x.size for s in case.steps))
    other = {"torch": "keras", "torch_cma": "torch", "mxnet": "keras", "gluon": "keras", "d2l": "keras",
             "flax": "d2l", "keras": "d2l"}[case.conv_name]
    alt = C.reference_run(dataclasses.replace(case, convention=other, axis=case.channel_axis))
    comps = C.compare_runs(C.Run(alt.steps, alt.error), ref, ref.bounds)
    assert not all(c.ok for c in comps.values()), f"{case.describe()}: indistinguishable from {other}"


# ---- fixed cases: the check battery ----------------------------------------------------------------------------------
def _battery_params() -> list:
    """The full battery's cases; where the commands' tests run, less the quick battery's, which
    ``tests/cli/test_check.py`` runs through ``multibn check --quick`` on every backend (against the reference,
    pairwise and natively)."""
    quick = set() if left_to_full("commands") else {
        (c.conv_name, c.name) for c in C.battery(tuple(CONVENTIONS), quick=True)}
    return [pytest.param(case, id=f"{case.conv_name}-{case.name}")
            for case in C.battery(tuple(CONVENTIONS), quick=False) if (case.conv_name, case.name) not in quick]


@pytest.mark.parametrize("case", _battery_params())
def test_battery_case(case: C.Case) -> None:
    rows, _ = C.check_case(case, CHECKED)
    _assert_rows(case, rows)


def test_quick_battery_is_part_of_the_full_one() -> None:
    """What ``_battery_params`` leaves to ``multibn check --quick`` is run here in the full battery's form."""
    full = {(c.conv_name, c.name): c.describe() for c in C.battery(tuple(CONVENTIONS), quick=False)}
    quick = {(c.conv_name, c.name): c.describe() for c in C.battery(tuple(CONVENTIONS), quick=True)}
    assert quick and all(full.get(k) == v for k, v in quick.items())


# ---- edge cases with known answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", tuple(CONVENTIONS))
def test_constant_channel_eps0(conv: str) -> None:
    """E8: with eps = 0 a constant channel is guarded (y = beta, dx = 0) under torch/mxnet/gluon, NaN elsewhere."""
    case = C.make_case("const", conv, "float32", [(5, 2, 3)], axis=1, seed=1, constant=[0], eps=0.0,
                       offsets=[20.0, 1.0])  # the constant is +-20, n = 15
    ref = C.reference_run(case).steps[0]
    guarded = CONVENTIONS[conv].zero_var_guard
    assert np.isnan(ref["y"][:, 0]).all() != guarded
    if guarded:
        assert np.all(ref["y"][:, 0] == case.beta[0]) and np.all(ref["dx"][:, 0] == 0)
    rows, _ = C.check_case(case, CHECKED)
    _assert_rows(case, rows)


@pytest.mark.parametrize("conv", tuple(CONVENTIONS))
def test_one_value_per_channel(conv: str) -> None:
    """E4: n = 1 in training raises under PyTorch's rules (every backend, the same ValueError), else y = beta."""
    case = C.make_case("n=1", conv, "float32", [(1, 3), (1, 3)], training=[True, False], axis=1, seed=2)
    ref = C.reference_run(case)
    assert (ref.error is not None) == CONVENTIONS[conv].single_value_raises
    for name in CHECKED:
        got = C.backend_run(case, name)
        if ref.error is not None:
            assert got.error is not None and got.error[0] == 0 and isinstance(got.error[1], ValueError)
            assert "more than 1 value per channel" in str(got.error[1])
    rows, _ = C.check_case(case, CHECKED)
    _assert_rows(case, rows)


@pytest.mark.parametrize("conv", ("torch", "torch_cma", "gluon", "flax"))
def test_empty_batch_counts_per_convention(conv: str) -> None:
    """E2/E6: an empty batch moves no statistic; num_batches_tracked counts it under torch and torch_cma only."""
    case = C.make_case("empty", conv, "float32", [(3, 2, 2), (0, 2, 2), (3, 2, 2)], axis=1, seed=3)
    ref = C.reference_run(case)
    counts = [s["num_batches_tracked"] for s in ref.steps]
    assert counts == ([1, 2, 3] if CONVENTIONS[conv].count_empty_batches else [1, 1, 2])
    np.testing.assert_array_equal(ref.steps[1]["running_var"], ref.steps[0]["running_var"])
    rows, skipped = C.check_case(case, CHECKED)
    assert ("mxnet" in skipped) == ("mxnet" in CHECKED)
    _assert_rows(case, rows)


def test_momentum_mapping_torch_vs_old_weight() -> None:
    """E1: torch(m) and gluon(1 - m) see the same mean trajectory; the variances differ by the n/(n-1) store."""
    kw = dict(shapes=[(4, 3)] * 3, axis=1, seed=4)
    a = C.reference_run(C.make_case("t", "torch", "float64", momentum=0.3, **kw))
    b = C.reference_run(C.make_case("g", "gluon", "float64", momentum=0.7, **kw))
    for sa, sb in zip(a.steps, b.steps, strict=True):
        np.testing.assert_allclose(sa["running_mean"], sb["running_mean"], rtol=1e-14)
        assert not np.allclose(sa["running_var"], sb["running_var"], rtol=1e-6)


# ---- what a backend cannot do ----------------------------------------------------------------------------------------
def _unsupported_calls(backend: str, what: str) -> list:
    """The public calls that must refuse ``what`` on ``backend``."""
    calls = []
    if what in ("bfloat16", "float64"):
        calls.append(lambda: multibn.init_state(3, backend=backend, dtype=what))
        if what == "float64":
            calls.append(lambda: multibn.batch_norm(np.ones((4, 3)), backend=backend))
        else:
            ml_dtypes = need("ml_dtypes", why="a bfloat16 NumPy array needs ml_dtypes")
            calls.append(lambda: multibn.batch_norm(np.ones((4, 3), ml_dtypes.bfloat16), backend=backend))
    if what == "empty":
        calls.append(lambda: multibn.batch_norm(np.ones((0, 3), np.float32), backend=backend))
        calls.append(lambda: multibn.batch_norm(np.ones((0, 3), np.float32), training=False, backend=backend,
                                                state=multibn.init_state(3, backend=backend)))
    return calls


@pytest.mark.parametrize("key", sorted(C.UNSUPPORTED), ids="-".join)
def test_unsupported_raises(key: tuple[str, str]) -> None:
    """Every combination skipped by the suite is listed in UNSUPPORTED and raises the listed, clear error."""
    backend, what = key
    require(backend)
    if key == ("jax", "float64") and C.jax_x64():
        pytest.skip("jax_enable_x64 is on in this process: float64 is supported")
    exc, text, _ = C.UNSUPPORTED[key]
    for call in _unsupported_calls(backend, what):
        with pytest.raises(exc, match=text):
            call()
    # the runner skips exactly these: a case needing it is reported unsupported
    shapes = [(0, 3), (2, 3)] if what == "empty" else [(2, 3)]
    case = C.make_case("u", "gluon", "float32" if what == "empty" else what, shapes, axis=1)
    assert C.unsupported(case, backend) == what


# ---- disagreements found and fixed --------------------------------------------------------------------------------
def test_eval_dx_at_nonfinite_x() -> None:
    x = np.array([[np.inf], [1.0], [np.nan]], np.float32)
    dx, _, _ = multibn.batch_norm_vjp(x, None, None, multibn.init_state(1), np.ones((3, 1), np.float32),
                                      training=False)
    np.testing.assert_allclose(dx, np.full((3, 1), 1 / np.sqrt(1 + 1e-5)), rtol=1e-6)  # PyTorch's answer


def test_empty_eval_dgamma() -> None:
    state = multibn.BNState(np.zeros(1, np.float32), np.full(1, np.nan, np.float32), 1)
    x = np.zeros((0, 1), np.float32)
    _, dgamma, _ = multibn.batch_norm_vjp(x, None, None, state, x, training=False, backend="numpy")
    np.testing.assert_array_equal(dgamma, [0.0])


@pytest.mark.mxnet
def test_mxnet_eval_backward_after_recorded_training() -> None:
    """An eval-mode backward right after a recorded training step (once a hang) gives the eval gradient:
    dx = gamma / sqrt(running_var + eps) for dy = 1, from the running variance the training step stored."""
    require("mxnet")
    from mxnet import autograd, nd

    x, g, b = nd.array(np.arange(12.0).reshape(4, 3)), nd.ones(3), nd.zeros(3)
    state = multibn.init_state(3, backend="mxnet")
    x.attach_grad()
    with autograd.record():
        y, state = multibn.batch_norm(x, g, b, state)
    y.backward()
    # training, dy = 1: dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * gamma / sigma = 0
    np.testing.assert_allclose(x.grad.asnumpy(), 0.0, atol=1e-5)
    # each channel: 4 values 3 apart, unbiased variance 15; torch momentum 0.1 from 1: 0.9 + 1.5
    np.testing.assert_allclose(state.running_var.asnumpy(), [2.4] * 3, rtol=1e-6)
    with autograd.record():
        y, _ = multibn.batch_norm(x, g, b, state, training=False)
    y.backward()
    np.testing.assert_allclose(x.grad.asnumpy(), np.full((4, 3), 1 / np.sqrt(2.4 + 1e-5)), rtol=1e-6)


@pytest.mark.parametrize("what", ["inf-input", "eps0-constant-flax"])
def test_numpy_backend_no_runtime_warnings(what: str) -> None:
    """NaN/inf arithmetic is IEEE's business: the numpy backend emits no RuntimeWarning (found by this suite, fixed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if what == "inf-input":
            x = np.array([[np.inf, 1.0], [2.0, 3.0]], np.float32)
            dx, dgamma, dbeta = multibn.batch_norm_vjp(x, None, None, None, np.ones_like(x), backend="numpy")
            nan_channels = [True, False]  # the channel holding inf is NaN, the other exact
        else:
            x = np.ones((3, 2), np.float32)
            dx, dgamma, dbeta = multibn.batch_norm_vjp(x, None, None, None, np.ones_like(x), convention="flax",
                                                       eps=0.0, backend="numpy")
            nan_channels = [True, True]  # 0/0 without a zero-variance guard under flax's rules
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    np.testing.assert_array_equal(np.isnan(dx).all(axis=0), nan_channels)
    np.testing.assert_array_equal(np.isnan(dgamma), nan_channels)
    np.testing.assert_array_equal(dx[:, ~np.array(nan_channels)], 0.0)  # dy = 1: dx = 0 where finite
    np.testing.assert_array_equal(dbeta, np.full(2, float(len(x))))


# ---- array-api-strict: the algorithm uses only the standard ----------------------------------------------------------
array_api_strict = need("array_api_strict", why="array-api-strict is a test dependency")


class StrictBackend(Backend):
    """A test-only adapter: the generic kernels of Backend over the strict namespace, no autodiff."""

    name = "array_api_strict"
    extra = "test"
    xp = array_api_strict

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, type(array_api_strict.asarray(0.0)))  # its Array class (no public name in 2.x)

    def asarray(self, obj: object, dtype: str | None = None, device: object = None) -> object:
        a = np.asarray(obj)
        return array_api_strict.asarray(a, dtype=self.dtype(dtype or a.dtype.name))

    def to_numpy(self, a: object) -> np.ndarray:
        return np.from_dlpack(a)

    def dtype(self, name: str) -> object:
        if name not in ("float32", "float64", "int64"):
            raise TypeError(f"array_api_strict has no {name} dtype")
        return getattr(array_api_strict, name)


def _strict_run(case: C.Case) -> C.Run:
    """``case`` through multibn.algorithm directly on array_api_strict arrays (forward, backward, update)."""
    be = StrictBackend()
    conv = case.conv
    g, b = be.asarray(case.gamma, case.pdtype), be.asarray(case.beta, case.pdtype)
    state = multibn.BNState(be.full(case.channels, 0.0, case.pdtype), be.full(case.channels, 1.0, case.pdtype),
                            be.counter(0)) if case.stateful else None
    steps = []
    for step in case.steps:
        x, dy = be.asarray(step.x, case.dtype), be.asarray(step.dy, case.dtype)
        lay = alg.Layout.of(tuple(x.shape), case.channel_axis)
        norm = alg.Norm.of(conv)
        if step.training:
            rule, inputs = alg.train_rule(be, norm, case.channel_axis), (x, g, b)
        else:
            rule, inputs = alg.eval_rule(be, norm, case.channel_axis), (x, g, b, state.running_mean,
                                                                         state.running_var)
        outputs = rule.forward(None, *inputs)
        y = outputs[0]
        dx, dg, db = rule.backward(rule.residuals(None, inputs, outputs), (dy, None, None))[:3]
        if step.training and state is not None:
            state = alg.update_state(be, conv, state, alg.Stats(lay.count, outputs[1], outputs[2]))
        out = {k: be.to_numpy(v).astype(np.float64) for k, v in dict(y=y, dx=dx, dgamma=dg, dbeta=db).items()}
        if state is not None:
            out.update(running_mean=be.to_numpy(state.running_mean).astype(np.float64),
                       running_var=be.to_numpy(state.running_var).astype(np.float64),
                       num_batches_tracked=int(be.to_numpy(state.num_batches_tracked)))
        steps.append(out)
    return C.Run(steps)


@fewer(0.6)
@given(case=bn_cases(dtypes=("float32", "float64")))
def test_algorithm_on_array_api_strict(case: C.Case) -> None:
    note(case.describe())
    ref = C.reference_run(case)
    if ref.error is not None:  # the refusal is the API's (tested above); the algorithm has no such check
        assume(ref.error[0] > 0)  # refused at the first step: nothing left to run
        case = dataclasses.replace(case, steps=case.steps[:ref.error[0]])
        ref = C.reference_run(case)
    with warnings.catch_warnings():  # NumPy (under array_api_strict) warns on NaN/inf arithmetic
        warnings.simplefilter("ignore", RuntimeWarning)
        got = _strict_run(case)
    comps = C.compare_runs(got, ref, ref.bounds)
    _assert_rows(case, C.rows_of("array_api_strict", case, comps))


# ---- JAX float64: with x64 on for the duration of each example (thread-local, restored on exit) ---------------------
@fewer(0.6)
@given(case=bn_cases(dtypes=("float64",)))
def test_jax_float64(case: C.Case) -> None:
    require("jax")
    note(case.describe())
    with jax_float64():
        assert C.jax_x64()
        rows, skipped = C.check_case(case, [b for b in ("numpy", "jax") if b in INSTALLED])
    assert "jax" not in skipped
    _assert_rows(case, rows)
