"""Properties of multibn.batch_norm that hold for any input (hypothesis; the conftest loads a derandomized profile
with a bounded number of examples, ``--slow`` runs many more).

Inputs are drawn as float32-representable numbers, so float32 and float64 runs see the same values; expected
results are computed in float64 from those values. float32 tolerances follow the fused ``y = x * scale + shift``:
the absolute error of an element scales like ``(|x| + |mean|) * scale * ulp``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import multibn
from multibn import CONVENTIONS, BNState
from multibn.backends import get_backend
from tests.helpers import arr, jax_float64, require, to_numpy

ULP = {"float32": 2.0**-23, "float64": 2.0**-52}
EPSILONS = st.sampled_from([1e-5, 1e-3, 0.1, 1.0])
CONVENTION_NAMES = st.sampled_from(sorted(CONVENTIONS))


# ---- helpers -----------------------------------------------------------------------------------------------
def run_examples(backend: str, body: Callable[[st.DataObject], None], fraction: int = 1, jax_fraction: int = 3) -> None:
    """Run ``body(data)`` for ``1/fraction`` of the profile's number of examples, and ``1/jax_fraction`` of that
    on JAX, where every new shape compiles afresh (at least 3)."""
    n = settings.default.max_examples // fraction
    if backend == "jax":
        n //= jax_fraction
    run = settings(max_examples=max(n, 3), suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])(given(st.data())(body))
    run()


def f64(a: object) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


def tracked(state: BNState) -> int:
    return int(to_numpy(state.num_batches_tracked).reshape(-1)[0])


def values(shape, lo=-10.0, hi=10.0):
    """float32-representable numbers in [lo, hi]."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    lo32 = lo32 if lo32 >= lo else np.nextafter(lo32, np.float32(np.inf))
    hi32 = hi32 if hi32 <= hi else np.nextafter(hi32, np.float32(-np.inf))
    return arrays(np.float64, shape, elements=st.floats(float(lo32), float(hi32), width=32, allow_subnormal=False))


# JAX compiles its eager operations afresh for every new shape (~0.3 s a call): on JAX, shapes come from this pool
JAX_SHAPES = (((3, 2), 1), ((2, 3), -1), ((2, 3, 2), 1), ((2, 2, 1, 3), -1), ((2, 1, 2, 2, 2), 2), ((3, 2, 2), 0),
              ((2, 2, 3, 1), -2))


@st.composite
def shapes(draw, min_rank=2, max_rank=5, max_side=3, min_count=2, backend=None):
    """A shape and a channel axis (possibly negative) with at least ``min_count`` elements per channel."""
    if backend == "jax":
        return draw(st.sampled_from([(s, a) for s, a in JAX_SHAPES if min_rank <= len(s) <= max_rank]))
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    count = int(np.prod(shape)) // shape[axis]
    assume(count >= min_count)
    return shape, axis


def bshape(ndim: int, axis: int, c: int) -> tuple[int, ...]:
    return tuple(c if i == axis % ndim else 1 for i in range(ndim))


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def dtypes_for(backend: str) -> st.SearchStrategy[str]:
    """float32 and float64; float32 only on JAX (float64 there needs x64 and recompiles: test_vectors covers it)."""
    return st.just("float32") if backend == "jax" else st.sampled_from(["float32", "float64"])


# ---- normalisation -----------------------------------------------------------------------------------------
def test_training_output_is_standardised(backend: str) -> None:
    """gamma=1, beta=0: per channel, y has mean 0 and (biased) variance var / (var + eps)."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(backend=backend))
        dtype = data.draw(dtypes_for(backend))
        eps = data.draw(EPSILONS)
        convention = data.draw(CONVENTION_NAMES)
        x = data.draw(values(shape))
        red = reduce_axes(len(shape), axis)
        mean = x.mean(axis=red, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
        s = 1 / np.sqrt(var + eps)
        with jax_float64(backend, dtype):
            y, new = multibn.batch_norm(arr(backend, x, dtype), convention=convention, eps=eps, axis=axis)
            y = f64(y)
        assert new is None
        # error of one element: a few ulp of the fused terms |x| * s and |mean| * s, plus the rounding of the mean
        # (up to n ulp of it) times s
        n = x.size // shape[axis]
        err = (16 + n) * ULP[dtype] * ((np.abs(x) + np.abs(mean)) * s).max(axis=red, keepdims=True) + 1e-12
        ym = y.mean(axis=red, keepdims=True)
        yv = ((y - ym) ** 2).mean(axis=red, keepdims=True)
        assert np.all(np.abs(ym) <= err), (ym, err)
        ymax = np.abs(y).max(axis=red, keepdims=True)
        expected = var / (var + eps)
        rtol = 1e-5 if dtype == "float32" else 1e-12  # s = 1/sqrt(var + eps) is itself rounded
        assert np.all(np.abs(yv - expected) <= rtol * expected + 4 * ymax * err), (yv, expected)

    run_examples(backend, body, jax_fraction=4)


def test_eval_output_is_affine_map_of_running_stats(backend: str) -> None:
    """Eval: y = gamma (x - RM) / sqrt(RV + eps) + beta (gamma = 1 under fix_gamma); the state is returned as is."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(min_count=0, backend=backend))
        dtype = data.draw(dtypes_for(backend))
        eps = data.draw(EPSILONS)
        convention = data.draw(CONVENTION_NAMES)
        c = shape[axis]
        x = data.draw(values(shape))
        gamma, beta, rm = (data.draw(values((c,), -3, 3)) for _ in range(3))
        rv = data.draw(values((c,), 0.01, 10))
        if CONVENTIONS[convention].fix_gamma:
            g_eff = np.ones(c)
        else:
            g_eff = gamma
        b = lambda v: v.reshape(bshape(len(shape), axis, c))  # noqa: E731
        scale = g_eff / np.sqrt(rv + eps)
        expected = b(scale) * (x - b(rm)) + b(beta)
        mag = np.abs(x * b(scale)) + np.abs(b(rm * scale)) + np.abs(b(beta))
        with jax_float64(backend, dtype):
            state = BNState(arr(backend, rm, dtype), arr(backend, rv, dtype), get_backend(backend).counter(3))
            y, new = multibn.batch_norm(arr(backend, x, dtype), arr(backend, gamma, dtype), arr(backend, beta, dtype),
                                        state, training=False, convention=convention, eps=eps, axis=axis)
            got = f64(y)
        tiny = 1e-30  # products of tiny inputs are subnormal in float32
        assert np.all(np.abs(got - expected) <= 8 * ULP[dtype] * mag + tiny), np.max(np.abs(got - expected) / mag)
        assert all(a is b for a, b in zip(new, state, strict=True))
        assert tracked(new) == 3

    run_examples(backend, body)


def _low_precision(backend: str, a: np.ndarray, dtype: str) -> object:
    be = get_backend(backend)
    if dtype != "bfloat16":
        return arr(backend, a, dtype)
    return be.xp.astype(arr(backend, a, "float32"), be.dtype("bfloat16"))


X_DTYPES = {"numpy": ("float16", "float32", "float64"), "torch": ("float16", "bfloat16", "float32", "float64"),
            "jax": ("float16", "bfloat16", "float32"), "mxnet": ("float16", "float32", "float64")}


def test_dtypes_are_kept(backend: str) -> None:
    """y and dx have x's dtype, the running statistics keep their own dtype, dgamma/dbeta gamma's (mixed
    precision, E20); float16/bfloat16 results match the float64 reference to 1e-2/4e-2 (stats in float32)."""
    be = get_backend(backend)
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [1.0, -2.0]])
    dy = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 2.0], [0.5, 0.5]])
    gamma, beta = np.array([1.5, 0.5]), np.array([0.1, -0.2])
    red = (0,)
    mean, var = x.mean(axis=red), x.var(axis=red)
    s = 1 / np.sqrt(var + 1e-5)
    y_ref = gamma * (x - mean) * s + beta
    for xd in X_DTYPES[backend]:
        for sd in ("float32", "float64") if backend != "jax" else ("float32",):
            pd = "float64" if xd == "float64" else "float32"
            state = BNState(arr(backend, [0.0, 0.0], sd), arr(backend, [1.0, 1.0], sd), be.counter(0))
            xs, dys = _low_precision(backend, x, xd), _low_precision(backend, dy, xd)
            g, b = arr(backend, gamma, pd), arr(backend, beta, pd)
            y, new = multibn.batch_norm(xs, g, b, state)
            dx, dg, db = multibn.batch_norm_vjp(xs, g, b, state, dys)
            what = f"x {xd}, state {sd}"
            assert [be.dtype_name(a) for a in (y, dx)] == [xd, xd], what
            assert [be.dtype_name(a) for a in (new.running_mean, new.running_var)] == [sd, sd], what
            assert [be.dtype_name(a) for a in (dg, db)] == [pd, pd], what
            tol = {"float16": 1e-2, "bfloat16": 4e-2, "float32": 1e-5, "float64": 1e-12}[xd]
            np.testing.assert_allclose(f64(y), y_ref, rtol=tol, atol=tol, err_msg=what)
            np.testing.assert_allclose(f64(new.running_mean), 0.1 * mean, rtol=max(tol, 1e-6), err_msg=what)


# ---- layouts -----------------------------------------------------------------------------------------------
def test_channel_axis_equals_transposed_channel_first(backend: str) -> None:
    """Any axis (negative too), ranks 2-5: the result is the transpose of BN on the channel-first layout, and
    of BN on the channel-last layout; running statistics and gradients agree."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(backend=backend))
        dtype = data.draw(dtypes_for(backend))
        convention = data.draw(CONVENTION_NAMES)
        c = shape[axis]
        x = data.draw(values(shape))
        dy = data.draw(values(shape, -2, 2))
        gamma, beta, rm = (data.draw(values((c,), -3, 3)) for _ in range(3))
        rv = data.draw(values((c,), 0.01, 10))
        red = reduce_axes(len(shape), axis)
        mean = x.mean(axis=red, keepdims=True)
        s = 1 / np.sqrt(((x - mean) ** 2).mean(axis=red, keepdims=True) + CONVENTIONS[convention].eps)
        # the layouts reduce in different orders: allow a few ulp of the terms involved
        tol_y = 32 * ULP[dtype] * (np.abs(x) + np.abs(mean)) * s * (np.abs(gamma).max() + 1) + 16 * ULP[dtype] * 3
        results = {}
        with jax_float64(backend, dtype):
            for name, perm_to, ax in (("given", None, axis), ("first", 1, 1), ("last", -1, -1)):
                xs, dys = (a if perm_to is None else np.moveaxis(a, axis, perm_to) for a in (x, dy))
                state = BNState(arr(backend, rm, dtype), arr(backend, rv, dtype), get_backend(backend).counter(0))
                args = (arr(backend, xs, dtype), arr(backend, gamma, dtype), arr(backend, beta, dtype), state)
                y, new = multibn.batch_norm(*args, convention=convention, axis=ax)
                dx, dg, db = multibn.batch_norm_vjp(*args, arr(backend, dys, dtype), convention=convention, axis=ax)
                y, dx = (f64(a) if perm_to is None else np.moveaxis(f64(a), perm_to, axis) for a in (y, dx))
                results[name] = (y, dx, f64(dg), f64(db), f64(new.running_mean), f64(new.running_var), tracked(new))
        ref = results["given"]
        for name in ("first", "last"):
            got = results[name]
            assert np.all(np.abs(got[0] - ref[0]) <= tol_y), name
            scale_dx = np.abs(dy).max() * s.max() * (np.abs(gamma).max() + 1) * 64 * ULP[dtype] + 1e-300
            np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=scale_dx * 4, err_msg=f"dx {name}")
            # the mean's rounding (n ulp of |x|) is amplified by s in dgamma = sum dy (x - mean) s
            n = x.size // c
            dgamma_tol = 4 * n * ULP[dtype] * np.abs(x).max() * s.max() * np.abs(dy).sum(axis=red).max()
            for i, what in ((2, "dgamma"), (3, "dbeta"), (4, "running_mean"), (5, "running_var")):
                tol = 1e-5 if dtype == "float32" else 1e-12
                atol = tol * 10 * max(1.0, np.abs(ref[i]).max()) + (dgamma_tol if i == 2 else 0.0)
                np.testing.assert_allclose(got[i], ref[i], rtol=tol, atol=atol, err_msg=f"{what} {name}")
            assert got[6] == ref[6] == 1

    run_examples(backend, body, jax_fraction=4)


# ---- purity ------------------------------------------------------------------------------------------------
def _snapshot(arrays_: dict[str, object]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v).copy() for k, v in arrays_.items()}


def test_inputs_are_never_mutated(backend: str) -> None:
    """x, gamma, beta, dy and the state arrays are unchanged by a training call, an eval call and the vjp (and
    mxnet's fix_gamma does not write ones into gamma, unlike MXNet's operator)."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(max_rank=4, backend=backend))
        convention = data.draw(CONVENTION_NAMES)
        c = shape[axis]
        x, dy = data.draw(values(shape)), data.draw(values(shape))
        gamma, beta, rm = (data.draw(values((c,), -3, 3)) for _ in range(3))
        rv = data.draw(values((c,), 0.01, 10))
        tracked0 = data.draw(st.integers(0, 5))
        a = {"x": arr(backend, x, "float32"), "gamma": arr(backend, gamma, "float32"),
             "beta": arr(backend, beta, "float32"), "dy": arr(backend, dy, "float32"),
             "running_mean": arr(backend, rm, "float32"), "running_var": arr(backend, rv, "float32"),
             "num_batches_tracked": get_backend(backend).counter(tracked0)}
        before = _snapshot(a)
        state = BNState(a["running_mean"], a["running_var"], a["num_batches_tracked"])
        kw = {"convention": convention, "axis": axis}
        for training in (True, False):
            y, new = multibn.batch_norm(a["x"], a["gamma"], a["beta"], state, training=training, **kw)
            assert y is not a["x"]
            multibn.batch_norm_vjp(a["x"], a["gamma"], a["beta"], state, a["dy"], training=training, **kw)
            if training:
                assert new.running_mean is not a["running_mean"] and new.running_var is not a["running_var"]
        after = _snapshot(a)
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{k} was modified")

    run_examples(backend, body, jax_fraction=4)  # JAX arrays are immutable anyway


def test_inputs_not_mutated_through_autodiff(backend: str) -> None:
    """The same under each framework's autodiff (a backward pass must not touch the state either)."""
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 7.0]], np.float32)
    gamma, beta = np.array([1.5, 0.5], np.float32), np.array([0.1, -0.2], np.float32)
    state = multibn.init_state(2, backend=backend)
    rm0, rv0, t0 = (to_numpy(v).copy() for v in state)
    if backend == "torch":
        import torch

        xt, gt, bt = (torch.tensor(v, requires_grad=True) for v in (x, gamma, beta))
        y, _ = multibn.batch_norm(xt, gt, bt, state, convention="mxnet")
        y.sum().backward()
        got = (xt, gt, bt)
    elif backend == "jax":
        import jax

        xs = tuple(arr("jax", v, "float32") for v in (x, gamma, beta))
        jax.grad(lambda *a: multibn.batch_norm(*a, state, convention="mxnet")[0].sum(), argnums=(0, 1, 2))(*xs)
        got = xs
    elif backend == "mxnet":
        import mxnet as mx

        got = tuple(mx.nd.array(v) for v in (x, gamma, beta))
        for v in got:
            v.attach_grad()
        with mx.autograd.record():
            y, _ = multibn.batch_norm(*got, state, convention="mxnet")
        y.backward()
    else:
        got = (x.copy(), gamma.copy(), beta.copy())
        multibn.batch_norm(*got, state, convention="mxnet")
    for v, w in zip(got, (x, gamma, beta), strict=True):
        np.testing.assert_array_equal(to_numpy(v), w)
    for v, w in zip(state, (rm0, rv0, t0), strict=True):
        np.testing.assert_array_equal(to_numpy(v), w)


# ---- backend choice ----------------------------------------------------------------------------------------
def test_backend_inferred_from_array_type(backend: str) -> None:
    """With backend=None the arrays' framework is used: y and the new state are arrays of that framework;
    gamma/beta may be Python sequences."""
    be = get_backend(backend)
    x = arr(backend, [[1.0, 2.0], [3.0, 5.0]], "float32")
    state = multibn.init_state(2, backend=backend)
    y, new = multibn.batch_norm(x, [1.0, 2.0], (0.0, 1.0), state)
    assert be.is_array(y)
    assert all(be.is_array(v) for v in new)
    dx, dg, db = multibn.batch_norm_vjp(x, None, None, state, x)
    assert all(be.is_array(v) for v in (dx, dg, db))
    assert be.dtype_name(y) == "float32"


def test_numpy_arrays_are_converted_for_a_named_backend(backend: str) -> None:
    """With backend named, NumPy arrays and Python sequences become that backend's arrays (the state here is
    an explicit NumPy state whose counter is a plain int)."""
    be = get_backend(backend)
    state = BNState(np.zeros(2, np.float32), np.ones(2, np.float32), 0)
    y, new = multibn.batch_norm(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), np.ones(2, np.float32), [0.0, 0.0],
                                state, backend=backend)
    assert be.is_array(y)
    assert all(be.is_array(v) for v in new)
    assert tracked(new) == 1


def test_numpy_init_state_converts_to_any_backend(backend: str) -> None:
    """``multibn.init_state(C)`` (NumPy, the default) works as the state of every named backend, silently."""
    be = get_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, new = multibn.batch_norm(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), None, None,
                                    multibn.init_state(2), backend=backend)
    assert all(be.is_array(v) for v in new)
    assert tracked(new) == 1


@pytest.mark.parametrize(("fx", "fg"), [("torch", "jax"), ("jax", "torch"), ("torch", "mxnet"), ("mxnet", "jax"),
                                        ("jax", "mxnet"), ("mxnet", "torch")])
def test_two_frameworks_cannot_be_mixed(fx: str, fg: str) -> None:
    require(fx, fg)
    x = arr(fx, [[1.0, 2.0], [3.0, 5.0]], "float32")
    gamma = arr(fg, [1.0, 1.0], "float32")
    with pytest.raises(TypeError, match=rf"x is a {fx} array but gamma is a {fg} array"):
        multibn.batch_norm(x, gamma)
    with pytest.raises(TypeError, match=rf"x is a {fx} array but state.running_mean is a {fg} array"):
        multibn.batch_norm(x, None, None, multibn.init_state(2, backend=fg))


# ---- running statistics ------------------------------------------------------------------------------------
def test_eval_returns_the_state_arrays_unchanged() -> None:
    state = multibn.init_state(2)
    _, new = multibn.batch_norm(np.ones((3, 2), np.float32), None, None, state, training=False)
    assert all(a is b for a, b in zip(new, state, strict=True))


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_no_state_in_training_returns_none(backend: str, convention: str) -> None:
    y, new = multibn.batch_norm(arr(backend, [[1.0, 2.0], [3.0, 5.0]], "float32"), convention=convention)
    assert new is None
    assert tuple(to_numpy(y).shape) == (2, 2)


def test_running_update_follows_the_convention(backend: str) -> None:
    """R <- keep R + take stat with (keep, take) = (1 - m, m) for new-weight, (m, 1 - m) for old-weight conventions,
    take = 1/t (t = num_batches_tracked + 1) for torch_cma; the variance is M2/(n-1) under torch conventions
    and M2/n otherwise; num_batches_tracked goes up by one."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(max_rank=4, backend=backend))
        dtype = data.draw(dtypes_for(backend))
        name = data.draw(CONVENTION_NAMES)
        conv = CONVENTIONS[name]
        momentum = None if name == "torch_cma" else data.draw(st.one_of(st.none(), st.floats(0, 1, width=32)))
        c = shape[axis]
        x = data.draw(values(shape))
        rm = data.draw(values((c,), -3, 3))
        rv = data.draw(values((c,), 0.0, 10))
        t0 = data.draw(st.integers(0, 10))
        red = reduce_axes(len(shape), axis)
        n = x.size // c
        mean = x.mean(axis=red)
        m2 = ((x - mean.reshape(bshape(len(shape), axis, c))) ** 2).sum(axis=red)
        stat_var = m2 / (n - 1) if name.startswith("torch") else m2 / n
        assert conv.unbiased_running_var == name.startswith("torch")
        m = conv.momentum if momentum is None else momentum
        if m is None:
            take = 1 / (t0 + 1)
            keep = 1 - take
        elif conv.momentum_weighs == "new":
            keep, take = 1 - m, m
        else:
            keep, take = m, 1 - m
        with jax_float64(backend, dtype):
            state = BNState(arr(backend, rm, dtype), arr(backend, rv, dtype), get_backend(backend).counter(t0))
            _, new = multibn.batch_norm(arr(backend, x, dtype), None, None, state, convention=name, momentum=momentum,
                                        axis=axis)
        rtol, atol = (2e-6, 2e-6) if dtype == "float32" else (1e-12, 1e-12)
        np.testing.assert_allclose(f64(new.running_mean), keep * rm + take * mean, rtol=rtol,
                                   atol=atol * (np.abs(x).max() + np.abs(rm).max()) + 1e-30)
        np.testing.assert_allclose(f64(new.running_var), keep * rv + take * stat_var, rtol=rtol * 10,
                                   atol=atol * 10 * (np.abs(x).max() ** 2 + np.abs(rv).max()) + 1e-30)
        assert tracked(new) == t0 + 1
        assert to_numpy(new.running_mean).dtype == np.dtype(dtype)

    run_examples(backend, body)


def test_momentum_zero_and_one(backend: str) -> None:
    """E1's extremes: new-weight m=0 never moves the statistics, m=1 replaces them; old-weight the reverse."""
    x = arr(backend, [[1.0, 10.0], [3.0, 14.0]], "float32")
    s0 = multibn.init_state(2, backend=backend)
    for conv, m, rm, rv in (("torch", 0.0, [0, 0], [1, 1]), ("torch", 1.0, [2, 12], [2, 8]),
                            ("gluon", 1.0, [0, 0], [1, 1]), ("gluon", 0.0, [2, 12], [1, 4]),
                            ("flax", 0.0, [2, 12], [1, 4]), ("keras", 1.0, [0, 0], [1, 1])):
        _, new = multibn.batch_norm(x, None, None, s0, convention=conv, momentum=m)
        np.testing.assert_allclose(to_numpy(new.running_mean), rm, rtol=1e-6, err_msg=f"{conv} {m}")
        np.testing.assert_allclose(to_numpy(new.running_var), rv, rtol=1e-6, err_msg=f"{conv} {m}")


EMPTY_BACKENDS = ("numpy", "torch", "jax")


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2), (2, 3, 0), (0, 3, 1, 2)])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
@pytest.mark.parametrize("backend", EMPTY_BACKENDS)  # MXNet 1.x cannot hold zero-size arrays: see core/test_inputs
def test_empty_batch(backend: str, convention: str, shape: tuple[int, ...]) -> None:
    """An empty batch gives an empty y, leaves the running mean/var alone, and counts in num_batches_tracked
    only under torch/torch_cma (PyTorch's module); later CMA weights are 1/(t+1) after it."""
    require(backend)
    axis = 1
    x = arr(backend, np.zeros(shape), "float32")
    state = BNState(arr(backend, [0.5, -1.0, 2.0], "float32"), arr(backend, [2.0, 3.0, 0.5], "float32"),
                    get_backend(backend).counter(4))
    y, new = multibn.batch_norm(x, None, None, state, convention=convention, axis=axis)
    assert tuple(to_numpy(y).shape) == shape
    np.testing.assert_array_equal(to_numpy(new.running_mean), [0.5, -1.0, 2.0])
    np.testing.assert_array_equal(to_numpy(new.running_var), [2.0, 3.0, 0.5])
    counts = CONVENTIONS[convention].count_empty_batches
    assert counts == convention.startswith("torch")
    assert tracked(new) == (5 if counts else 4)
    y, _ = multibn.batch_norm(x, None, None, state, training=False, convention=convention, axis=axis)
    assert tuple(to_numpy(y).shape) == shape
    dx, _, db = multibn.batch_norm_vjp(x, None, None, state, x, convention=convention, axis=axis)
    assert tuple(to_numpy(dx).shape) == shape
    np.testing.assert_array_equal(to_numpy(db), [0, 0, 0])
    if convention == "torch_cma":  # the empty batch took t = 5, so the next batch weighs 1/6
        _, after = multibn.batch_norm(arr(backend, [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], "float32"), None, None,
                                      new, convention="torch_cma")
        np.testing.assert_allclose(to_numpy(after.running_mean), np.array([0.5, -1.0, 2.0]) * 5 / 6
                                   + np.array([2.0, 3.0, 4.0]) / 6, rtol=1e-6)
        assert tracked(after) == 6


# ---- gradients ---------------------------------------------------------------------------------------------
def test_vjp_matches_finite_differences() -> None:
    """numpy float64: batch_norm_vjp is the derivative of batch_norm (central differences), in training and
    eval. In training sum_R dx = 0 and sum_R (x - mean) dx = gamma s sum_R((x - mean) dy) eps / (var + eps)
    (which is 0 only for eps = 0)."""

    def body(data: st.DataObject) -> None:
        shape, axis = data.draw(shapes(max_rank=4, max_side=2))
        convention = data.draw(CONVENTION_NAMES)
        training = data.draw(st.booleans())
        c = shape[axis]
        x = data.draw(values(shape, -3, 3))
        red = reduce_axes(len(shape), axis)
        xc = x - x.mean(axis=red, keepdims=True)
        var = (xc**2).mean(axis=red)
        assume(var.min() > 0.1)  # away from the eps regime, where differences are ill-conditioned
        dy = data.draw(values(shape, -2, 2))
        gamma, beta = data.draw(values((c,), 0.5, 2)), data.draw(values((c,), -1, 1))
        state = BNState(data.draw(values((c,), -1, 1)), data.draw(values((c,), 0.5, 2)), np.asarray(0))
        kw = {"convention": convention, "axis": axis, "training": training}

        def loss(*args: np.ndarray) -> float:
            return float(np.sum(multibn.batch_norm(*args, state, **kw)[0] * dy))

        grads = multibn.batch_norm_vjp(x, gamma, beta, state, dy, **kw)
        h = 1e-6
        for arg, got in enumerate(grads):
            base = [x, gamma, beta]
            num = np.zeros_like(base[arg])
            for i in np.ndindex(num.shape):
                plus, minus = [a.copy() for a in base], [a.copy() for a in base]
                plus[arg][i] += h
                minus[arg][i] -= h
                num[i] = (loss(*plus) - loss(*minus)) / (2 * h)
            np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-6, err_msg=f"argument {arg}")
        if training:
            dx = grads[0]
            conv = CONVENTIONS[convention]
            g = np.ones(c) if conv.fix_gamma else gamma
            s = 1 / np.sqrt(var + conv.eps)
            np.testing.assert_allclose(dx.sum(axis=red), 0, atol=1e-10)
            np.testing.assert_allclose((xc * dx).sum(axis=red), g * s * (xc * dy).sum(axis=red) * conv.eps
                                       / (var + conv.eps), atol=1e-10)

    run_examples("numpy", body, fraction=3)
