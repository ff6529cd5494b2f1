"""The hand-checkable test vectors TV1-TV3 and the measured values of ``docs/semantics.md`` (§4, §6).

Every vector runs on every backend and under every convention it names, in float32 (all backends) and float64
(all backends; JAX inside its x64 context). Expected numbers are the document's literals; a small float64
reference below (centred form, two passes, independent of multibn) only sizes the float32 tolerances: multibn
computes ``y = x * scale + shift`` in the fused form, so the float32 absolute error scales like
``(|x| + |mean|) * scale * ulp``, not like ``|y| * ulp``.

multibn updates the running statistics in the forward under every convention, so the "MXNet after backward"
numbers of §4/§6 are what the ``mxnet``/``gluon`` conventions give right after ``batch_norm``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest

import multibn
from multibn import CONVENTIONS, BNState, Convention
from multibn.backends import get_backend
from tests.helpers import ALL_BACKENDS, arr, jax_float64, require, to_numpy

DTYPES = ("float32", "float64")
ULP = {"float32": 2.0**-23, "float64": 2.0**-52}
ALL_CONVENTIONS = tuple(CONVENTIONS)
AUTODIFF_BACKENDS = ("torch", "jax", "mxnet")
# float64 on JAX (x64 switched on for the test) is checked by TV1, TV3 and §6; the tests named here run JAX in
# float32 only, since every new dtype and shape recompiles JAX's eager operations
NO_JAX_FLOAT64 = {"test_tv1_eps0_exact", "test_tv1_mxnet_op_fix_gamma_false", "test_tv1_mxnet_cudnn_row_is_torch",
                  "test_tv1_unbiased_biased_identity", "test_tv2_training", "test_tv2_eval",
                  "test_tv2_eval_eps0_doc_values", "test_tv3_mxnet_forward_only_row", "test_measured_fix_gamma",
                  "test_measured_eval"}
AUTODIFF_ONLY = {"test_measured_autodiff"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise this module's ``backend`` (and ``dtype``) fixtures: every backend (and both dtypes), less the
    pairs that NO_JAX_FLOAT64 and AUTODIFF_ONLY leave out."""
    if "backend" not in metafunc.fixturenames:
        return
    name = metafunc.function.__name__
    if "dtype" not in metafunc.fixturenames:
        metafunc.parametrize("backend", ALL_BACKENDS, indirect=True)
        return
    pairs = [(b, d) for b in ALL_BACKENDS for d in DTYPES
             if not (name in NO_JAX_FLOAT64 and (b, d) == ("jax", "float64"))
             and not (name in AUTODIFF_ONLY and b not in AUTODIFF_BACKENDS)]
    metafunc.parametrize(("backend", "dtype"), pairs, indirect=True, ids=[f"{b}-{d}" for b, d in pairs])


# ---- helpers -----------------------------------------------------------------------------------------------


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend name (parametrised by pytest_generate_tests); skipped with the reason where it is missing."""
    require(request.param)
    return request.param


@pytest.fixture
def dtype(request: pytest.FixtureRequest, backend: str) -> Iterator[str]:
    if request.param == "float64":
        with jax_float64(backend):
            yield request.param
    else:
        yield request.param


def make_state(backend: str, rm: object, rv: object, tracked: int, dtype: str) -> BNState:
    return BNState(arr(backend, rm, dtype), arr(backend, rv, dtype), get_backend(backend).counter(tracked))


def tracked(state: BNState, backend: str) -> int:
    a = to_numpy(state.num_batches_tracked)
    assert a.shape == ((1,) if backend == "mxnet" else ()), f"num_batches_tracked has shape {a.shape}"
    assert a.dtype.kind == "i"
    return int(a.reshape(-1)[0])


def check(actual: object, expected: object, dtype: str, mag: object = 1.0, what: str = "") -> None:
    """``actual`` within the dtype's tolerance: ~1e-10 relative in float64; in float32 1e-6 relative plus
    8 ulp of ``mag``, the size of the terms that were summed to make each element. NaN must match NaN."""
    got = to_numpy(actual).astype(np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    assert got.shape == exp.shape, f"{what}: shape {got.shape}, expected {exp.shape}"
    mag = np.nan_to_num(np.asarray(mag, dtype=np.float64), nan=0.0, posinf=0.0)
    if dtype == "float64":
        rtol, atol = 1e-10, np.maximum(1e-11, 16 * ULP["float64"] * mag)
    else:
        rtol, atol = 1e-6, np.maximum(1e-7, 8 * ULP["float32"] * mag)
    err = np.abs(got - exp)
    bad = ~((err <= atol + rtol * np.abs(exp)) | (np.isnan(got) & np.isnan(exp)) | (got == exp))
    excess = np.max(err - atol - rtol * np.abs(exp))
    assert not bad.any(), f"{what} ({dtype}): got\n{got}\nexpected\n{exp}\nmax excess {excess}"


@dataclasses.dataclass
class Ref:
    """A float64 reference BN step (centred form), used for tolerances and for the §6 exact values."""

    y: np.ndarray
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    mag_y: np.ndarray
    mag_dx: np.ndarray
    mag_dgamma: np.ndarray
    mag_dbeta: np.ndarray


def reference(x, gamma, beta, dy, *, eps, axis, guard=False, fix_gamma=False, rm=None, rv=None) -> Ref:
    """Training BN (``rm``/``rv`` None) or eval BN with ``rm``/``rv``, its gradient, and error magnitudes."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    bshape = tuple(x.shape[ax] if i == ax else 1 for i in range(x.ndim))
    g = np.ones(x.shape[ax]) if fix_gamma else np.asarray(gamma, np.float64)
    b = np.asarray(beta, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rm is None:
            mean = x.mean(axis=red)
            var = ((x - mean.reshape(bshape)) ** 2).mean(axis=red)
            s = 1 / np.sqrt(var + eps)
            if guard and eps == 0:
                s = np.where(var == 0, 0.0, s)
        else:
            mean, var = np.asarray(rm, np.float64), np.asarray(rv, np.float64)
            s = 1 / np.sqrt(var + eps)
        B = lambda v: np.reshape(v, bshape)  # noqa: E731
        xc = x - B(mean)
        xhat = xc * B(s)
        y = B(g) * xhat + B(b)
        scale = g * s
        mag_y = np.abs(x * B(scale)) + np.abs(B(b - mean * scale)) + np.abs(y)
        if rm is None:
            mdy = dy.mean(axis=red)
            mdyx = (dy * xhat).mean(axis=red)
            dx = B(scale) * (dy - B(mdy) - xhat * B(mdyx))
            mag_dx = np.abs(B(scale)) * (np.abs(dy) + np.abs(B(mdy)) + np.abs(xhat * B(mdyx)))
        else:
            dx = B(scale) * dy
            mag_dx = np.abs(dx)
        dgamma = np.zeros_like(g) if fix_gamma else (dy * xhat).sum(axis=red)
        mag_dgamma = (np.abs(dy * xc) * B(s)).sum(axis=red) * 4
        dbeta = dy.sum(axis=red)
        mag_dbeta = np.abs(dy).sum(axis=red) * 4
    return Ref(y, dx, dgamma, dbeta, mean, var, mag_y, mag_dx, mag_dgamma, mag_dbeta)


def autodiff(backend: str, x, gamma, beta, state, dy, **kw):
    """``(y, new_state, dx, dgamma, dbeta)`` from the framework's own autodiff through ``multibn.batch_norm``."""
    if backend == "torch":
        x, gamma, beta = (t.detach().clone().requires_grad_(True) for t in (x, gamma, beta))
        y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
        y.backward(dy)
        return y, new, x.grad, gamma.grad, beta.grad
    if backend == "jax":
        import jax

        def f(x, gamma, beta):
            return multibn.batch_norm(x, gamma, beta, state, **kw)

        y, vjp, new = jax.vjp(f, x, gamma, beta, has_aux=True)
        return (y, new, *vjp(dy))
    if backend == "mxnet":
        import mxnet as mx

        for a in (x, gamma, beta):
            a.attach_grad()
        with mx.autograd.record():
            y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
        y.backward(dy)
        return y, new, x.grad, gamma.grad, beta.grad
    raise AssertionError(backend)


# ---- TV1: 2-D input, one training step, gamma != 1 ----------------------------------------------------------
TV1_X = [[1.0, 10.0], [3.0, 14.0]]
TV1_GAMMA = [2.0, 0.5]
TV1_BETA = [0.0, 1.0]
Y_EPS5 = [[-1.99999000007, 0.500000624999], [1.99999000007, 1.499999375001]]  # eps = 1e-5
Y_EPS3 = [[-1.99900074938, 0.500062488284], [1.99900074938, 1.499937511716]]  # eps = 1e-3
Y_MXNET = [[-0.999500374688, 0.000124976567], [0.999500374688, 1.999875023433]]  # eps 1e-3, gamma ignored
Y_EPS0 = [[-2.0, 0.5], [2.0, 1.5]]
# convention -> (y, running mean, running var) after one step from (0, 1)
TV1 = {
    "torch": (Y_EPS5, [0.2, 1.2], [1.1, 1.7]),
    "torch_cma": (Y_EPS5, [2.0, 12.0], [2.0, 8.0]),  # t = 1: the batch statistics replace the init values
    "mxnet": (Y_MXNET, [0.2, 1.2], [1.0, 1.3]),
    "gluon": (Y_EPS5, [0.2, 1.2], [1.0, 1.3]),
    "d2l": (Y_EPS5, [0.2, 1.2], [1.0, 1.3]),
    "flax": (Y_EPS5, [0.02, 0.12], [1.0, 1.03]),
    "keras": (Y_EPS3, [0.02, 0.12], [1.0, 1.03]),
}


def test_tv1_covers_every_convention() -> None:
    assert set(TV1) == set(CONVENTIONS)


def _tv1(backend: str, dtype: str, convention: str | Convention, eps: float | None = None, **kw):
    conv = CONVENTIONS[convention] if isinstance(convention, str) else convention
    e = conv.eps if eps is None else eps
    ref = reference(TV1_X, TV1_GAMMA, TV1_BETA, np.zeros((2, 2)), eps=e, axis=1, fix_gamma=conv.fix_gamma)
    state = make_state(backend, [0, 0], [1, 1], 0, dtype)
    y, new = multibn.batch_norm(
        arr(backend, TV1_X, dtype), arr(backend, TV1_GAMMA, dtype), arr(backend, TV1_BETA, dtype), state,
        convention=convention, eps=eps, **kw,
    )
    return y, new, ref


@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_tv1(backend: str, dtype: str, convention: str) -> None:
    y_exp, rm_exp, rv_exp = TV1[convention]
    y, new, ref = _tv1(backend, dtype, convention)
    check(y, y_exp, dtype, ref.mag_y, "y")
    check(new.running_mean, rm_exp, dtype, 2 * np.abs(rm_exp), "running_mean")
    check(new.running_var, rv_exp, dtype, 2 * np.abs(rv_exp), "running_var")
    assert tracked(new, backend) == 1
    assert to_numpy(y).dtype == np.dtype(dtype)
    assert to_numpy(new.running_mean).dtype == np.dtype(dtype)


def test_tv1_from_lists_and_init_state(backend: str) -> None:
    """TV1 (torch) through the plain-input path: NumPy x, Python lists for gamma and beta, ``init_state``."""
    x = np.array([[1, 10], [3, 14]], np.float32)
    state = multibn.init_state(2, backend=backend)
    y, new = multibn.batch_norm(x, [2.0, 0.5], [0.0, 1.0], state, backend=backend)
    np.testing.assert_allclose(to_numpy(y), [[-1.99999000007, 0.500000624999], [1.99999000007, 1.499999375001]],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_mean), [0.2, 1.2], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_var), [1.1, 1.7], rtol=1e-6)
    assert int(to_numpy(new.num_batches_tracked).reshape(-1)[0]) == 1


def test_tv1_eps0_exact(backend: str, dtype: str) -> None:
    y, _, ref = _tv1(backend, dtype, "torch", eps=0.0)
    check(y, Y_EPS0, dtype, ref.mag_y, "y")


def test_tv1_mxnet_op_fix_gamma_false(backend: str, dtype: str) -> None:
    """``nd.BatchNorm(fix_gamma=False)`` (eps 1e-3) is the gluon convention with eps=1e-3: Keras's y."""
    y, new, ref = _tv1(backend, dtype, "gluon", eps=1e-3)
    check(y, Y_EPS3, dtype, ref.mag_y, "y")
    check(new.running_var, [1.0, 1.3], dtype, 2.0, "running_var")


def test_tv1_mxnet_cudnn_row_is_torch(backend: str, dtype: str) -> None:
    """MXNet cuDNN (old-weight 0.9, unbiased) as a custom Convention equals PyTorch's 0.1 row."""
    cudnn = Convention("mxnet_cudnn", 0.9, "old", unbiased_running_var=True, eps=1e-3, fix_gamma=True,
                       zero_var_guard=True)
    y, new, ref = _tv1(backend, dtype, cudnn)
    check(y, Y_MXNET, dtype, ref.mag_y, "y")
    check(new.running_mean, [0.2, 1.2], dtype, 2.4, "running_mean")
    check(new.running_var, [1.1, 1.7], dtype, 3.4, "running_var")


def test_tv1_unbiased_biased_identity(backend: str, dtype: str) -> None:
    """§2.6: U_1 = k B_1 + (1 - a)(1 - k) with k = n/(n-1) = 2, a = 0.1 (torch vs d2l running var)."""
    _, u, _ = _tv1(backend, dtype, "torch")
    _, b, _ = _tv1(backend, dtype, "d2l")
    check(u.running_var, 2 * to_numpy(b.running_var).astype(np.float64) + 0.9 * (1 - 2), dtype, 4.0, "identity")


# ---- TV2: 4-D NCHW and its NHWC twin, constant channel, gradients --------------------------------------------
def tv2_x() -> np.ndarray:
    x = np.zeros((2, 2, 1, 2))
    x[0, 0, 0] = [1, 3]
    x[1, 0, 0] = [3, 1]
    x[:, 1] = 5
    return x


def tv2_g() -> np.ndarray:
    g = np.zeros((2, 2, 1, 2))
    g[0, :, 0, 0] = 1
    return g


TV2_GAMMA = [1.0, 1.0]
TV2_BETA = [0.0, 0.5]
# per eps: s0 = 1/sqrt(1 + eps) (channel 0), dx of channel 0 in (n, w) order, dx of channel 1 (eps > 0)
TV2_S0 = {0.0: 1.0, 1e-5: 0.999995000037, 1e-3: 0.999500374688}
TV2_DX0 = {
    0.0: [0.5, 0.0, 0.0, -0.5],
    1e-5: [0.499999999981, -0.000002499963, -0.000002499963, -0.499995000056],
    1e-3: [0.499999812812, -0.000249625468, -0.000249625468, -0.499500561876],
}
TV2_DX1 = {
    1e-5: [237.170824513, -79.056941504, -79.056941504, -79.056941504],
    1e-3: [23.717082451, -7.905694150, -7.905694150, -7.905694150],
}
# convention -> (running mean, running var) after the step
TV2_STATE = {
    "torch": ([0.2, 0.5], [1.033333333333, 0.9]),
    "torch_cma": ([2.0, 5.0], [4 / 3, 0.0]),
    "mxnet": ([0.2, 0.5], [1.0, 0.9]),
    "gluon": ([0.2, 0.5], [1.0, 0.9]),
    "d2l": ([0.2, 0.5], [1.0, 0.9]),
    "flax": ([0.02, 0.05], [1.0, 0.99]),
    "keras": ([0.02, 0.05], [1.0, 0.99]),
}


def tv2_expected(convention: str, eps: float) -> dict[str, np.ndarray]:
    """TV2's training results in NCHW for ``convention`` with ``eps`` (0, 1e-5 or 1e-3)."""
    conv = CONVENTIONS[convention]
    defined = eps > 0 or conv.zero_var_guard  # else 0 * inf: NaN in channel 1 (Flax, Keras, d2l)
    s0 = TV2_S0[eps]
    y = np.empty((2, 2, 1, 2))
    y[0, 0, 0], y[1, 0, 0] = [-s0, s0], [s0, -s0]
    y[:, 1] = 0.5 if defined else np.nan
    dx = np.empty((2, 2, 1, 2))
    dx[:, 0, 0, :] = np.reshape(TV2_DX0[eps], (2, 2))
    dx[:, 1, 0, :] = np.reshape(TV2_DX1[eps], (2, 2)) if eps > 0 else (0.0 if defined else np.nan)
    dgamma = np.array([0.0, 0.0]) if conv.fix_gamma else np.array([-s0, 0.0 if defined else np.nan])
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": np.array([1.0, 1.0])}


def test_tv2_state_covers_every_convention() -> None:
    assert set(TV2_STATE) == set(CONVENTIONS)


LAYOUTS = ("nchw", "nhwc")


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if layout == "nhwc" else a


def tv2_inputs(backend: str, dtype: str, layout: str):
    x, g = to_layout(tv2_x(), layout), to_layout(tv2_g(), layout)
    return (arr(backend, x, dtype), arr(backend, TV2_GAMMA, dtype), arr(backend, TV2_BETA, dtype),
            arr(backend, g, dtype), make_state(backend, [0, 0], [1, 1], 0, dtype))


def tv2_kwargs(convention: str, layout: str, eps: float | None) -> dict:
    return {"convention": convention, "eps": eps, "axis": 1 if layout == "nchw" else -1}


def tv2_checks(dtype, layout, exp, ref, y=None, dx=None, dgamma=None, dbeta=None):
    if y is not None:
        check(y, to_layout(exp["y"], layout), dtype, to_layout(ref.mag_y, layout), "y")
    if dx is not None:
        check(dx, to_layout(exp["dx"], layout), dtype, to_layout(ref.mag_dx, layout), "dx")
    if dgamma is not None:
        check(dgamma, exp["dgamma"], dtype, ref.mag_dgamma, "dgamma")
    if dbeta is not None:
        check(dbeta, exp["dbeta"], dtype, ref.mag_dbeta, "dbeta")


def eps_case(convention: str, which: str) -> float:
    return CONVENTIONS[convention].eps if which == "default" else 0.0


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("eps_which", ["default", "eps0"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_tv2_training(backend: str, dtype: str, convention: str, layout: str, eps_which: str) -> None:
    """Forward, running statistics and batch_norm_vjp; NHWC gives the transpose and the same statistics.

    eps = 0 on the constant channel: torch/mxnet/gluon's guard gives y = beta and dx = 0; flax/keras/d2l NaN.
    (The numpy backend may warn on 1/sqrt(0); whether it should is tested separately.)"""
    eps = eps_case(convention, eps_which)
    conv = CONVENTIONS[convention]
    exp = tv2_expected(convention, eps)
    ref = reference(tv2_x(), TV2_GAMMA, TV2_BETA, tv2_g(), eps=eps, axis=1, guard=conv.zero_var_guard,
                    fix_gamma=conv.fix_gamma)
    x, gamma, beta, g, state = tv2_inputs(backend, dtype, layout)
    kw = tv2_kwargs(convention, layout, None if eps_which == "default" else 0.0)
    y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
    rm, rv = TV2_STATE[convention]
    check(new.running_mean, rm, dtype, 10.0, "running_mean")
    check(new.running_var, rv, dtype, 4.0, "running_var")
    assert tracked(new, backend) == 1
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, g, **kw)
    tv2_checks(dtype, layout, exp, ref, y, dx, dgamma, dbeta)


@pytest.mark.parametrize("convention", ["flax", "keras", "d2l"])
def test_tv2_eps0_nan_without_warning_numpy(convention: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y, _ = multibn.batch_norm(tv2_x(), None, TV2_BETA, None, convention=convention, eps=0.0, axis=1)
    assert np.isnan(y[:, 1]).all()


# autodiff wiring does not depend on the layout (batch_norm_vjp is checked on both): NHWC for the channel-last
# conventions only
@pytest.mark.parametrize(("convention", "layout", "eps_which"), [
    *((c, "nchw", "default") for c in ALL_CONVENTIONS),
    ("flax", "nhwc", "default"),
    ("keras", "nhwc", "default"),
    ("torch", "nchw", "eps0"),  # the zero-variance guard: dx = 0 on the constant channel
    ("flax", "nhwc", "eps0"),  # no guard: NaN
])
@pytest.mark.parametrize("fw", AUTODIFF_BACKENDS)
def test_tv2_training_autodiff(fw: str, convention: str, layout: str, eps_which: str) -> None:
    """The same gradients through each framework's own autodiff (torch.autograd, jax.vjp, mxnet.autograd)."""
    backend = fw
    require(backend)
    for dtype in DTYPES if backend != "jax" else ("float32",):  # see NO_JAX_FLOAT64
        with jax_float64(backend):
            eps = eps_case(convention, eps_which)
            conv = CONVENTIONS[convention]
            exp = tv2_expected(convention, eps)
            ref = reference(tv2_x(), TV2_GAMMA, TV2_BETA, tv2_g(), eps=eps, axis=1, guard=conv.zero_var_guard,
                            fix_gamma=conv.fix_gamma)
            x, gamma, beta, g, state = tv2_inputs(backend, dtype, layout)
            kw = tv2_kwargs(convention, layout, None if eps_which == "default" else 0.0)
            y, new, dx, dgamma, dbeta = autodiff(backend, x, gamma, beta, state, g, **kw)
            tv2_checks(dtype, layout, exp, ref, y, dx, dgamma, dbeta)
            check(new.running_var, TV2_STATE[convention][1], dtype, 4.0, "running_var")


def tv2_eval_expected(convention: str) -> dict[str, np.ndarray]:
    """Eval from the init state (RM 0, RV 1): y = gamma x / sqrt(1 + eps) + beta, dx = gamma g / sqrt(1 + eps)."""
    conv = CONVENTIONS[convention]
    s = 1 / math.sqrt(1 + conv.eps)
    x, g = tv2_x(), tv2_g()
    y = x * s + np.reshape(TV2_BETA, (1, 2, 1, 1))
    dgamma = np.zeros(2) if conv.fix_gamma else np.array([1.0, 5.0]) * s
    return {"y": y, "dx": g * s, "dgamma": dgamma, "dbeta": np.array([1.0, 1.0])}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_tv2_eval(backend: str, dtype: str, convention: str, layout: str) -> None:
    conv = CONVENTIONS[convention]
    exp = tv2_eval_expected(convention)
    ref = reference(tv2_x(), TV2_GAMMA, TV2_BETA, tv2_g(), eps=conv.eps, axis=1, fix_gamma=conv.fix_gamma,
                    rm=[0, 0], rv=[1, 1])
    x, gamma, beta, g, state = tv2_inputs(backend, dtype, layout)
    kw = tv2_kwargs(convention, layout, None)
    y, new = multibn.batch_norm(x, gamma, beta, state, training=False, **kw)
    assert all(a is b for a, b in zip(new, state, strict=True))  # eval returns the state's own arrays
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, g, training=False, **kw)
    tv2_checks(dtype, layout, exp, ref, y, dx, dgamma, dbeta)
    if backend in AUTODIFF_BACKENDS:
        x, gamma, beta, g, state = tv2_inputs(backend, dtype, layout)
        y, new, dx, dgamma, dbeta = autodiff(backend, x, gamma, beta, state, g, training=False, **kw)
        tv2_checks(dtype, layout, exp, ref, y, dx, dgamma, dbeta)


def test_tv2_eval_eps0_doc_values(backend: str, dtype: str) -> None:
    """With eps = 0 the eval gradient is g itself and dgamma = [1, 5] (the document's numbers)."""
    x, gamma, beta, g, state = tv2_inputs(backend, dtype, "nchw")
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, g, training=False, eps=0.0)
    check(dx, tv2_g(), dtype, 1.0, "dx")
    check(dgamma, [1.0, 5.0], dtype, 5.0, "dgamma")
    check(dbeta, [1.0, 1.0], dtype, 1.0, "dbeta")


# ---- TV3: two training steps then eval, every convention row -------------------------------------------------
TV3_STEPS = ([[1.0], [3.0]], [[4.0], [8.0]])
TV3_EVAL_X = [[6.0]]
MXNET_CUDNN = Convention("mxnet_cudnn", 0.9, "old", unbiased_running_var=True, eps=1e-3, fix_gamma=True,
                         zero_var_guard=True)
# row -> (convention, [(RM, RV) after step 1, after step 2], eval y)
TV3 = {
    "torch": ("torch", [(0.2, 1.1), (0.78, 1.79)], 3.901600285856),
    "torch_cma": ("torch_cma", [(2.0, 2.0), (4.0, 5.0)], 0.894426296574),
    "mxnet": ("mxnet", [(0.2, 1.0), (0.78, 1.3)], 4.576483013375),
    "mxnet_cudnn": (MXNET_CUDNN, [(0.2, 1.1), (0.78, 1.79)], 3.900521805061),
    "gluon": ("gluon", [(0.2, 1.0), (0.78, 1.3)], 4.578225252258),
    "flax": ("flax", [(0.02, 1.0), (0.0798, 1.03)], 5.833318075579),
    "keras": ("keras", [(0.02, 1.0), (0.0798, 1.03)], 5.830516731305),
    "d2l": ("d2l", [(0.2, 1.0), (0.78, 1.3)], 4.578225252258),
}
# training outputs of the two steps, by eps: step 1 -/+1/sqrt(1+eps), step 2 -/+2/sqrt(4+eps)
TV3_Y = {1e-5: (0.999995000037, 0.999998750002), 1e-3: (0.999500374688, 0.999875023433)}


@pytest.mark.parametrize("row", list(TV3))
def test_tv3(backend: str, dtype: str, row: str) -> None:
    convention, states, y_eval = TV3[row]
    eps = (CONVENTIONS[convention] if isinstance(convention, str) else convention).eps
    state = multibn.init_state(1, backend=backend, convention=convention, dtype=dtype)
    for step, (x, (rm, rv), y1) in enumerate(zip(TV3_STEPS, states, TV3_Y[eps], strict=True), start=1):
        y, state = multibn.batch_norm(arr(backend, x, dtype), None, None, state, convention=convention)
        check(y, [[-y1], [y1]], dtype, 2 * np.max(x), f"y at step {step}")
        check(state.running_mean, [rm], dtype, 1.0, f"running_mean after step {step}")
        check(state.running_var, [rv], dtype, 2.0, f"running_var after step {step}")
        assert tracked(state, backend) == step
    y, same = multibn.batch_norm(arr(backend, TV3_EVAL_X, dtype), None, None, state, training=False,
                                 convention=convention)
    assert all(a is b for a, b in zip(same, state, strict=True))
    check(y, [[y_eval]], dtype, 12.0, "eval y")


def test_tv3_covers_every_convention() -> None:
    assert {c for c, *_ in TV3.values() if isinstance(c, str)} == set(CONVENTIONS)


def test_tv3_mxnet_forward_only_row(backend: str, dtype: str) -> None:
    """MXNet's "forward only" row is eval on the untouched init state: 6 / sqrt(1.001)."""
    state = multibn.init_state(1, backend=backend, convention="mxnet", dtype=dtype)
    y, _ = multibn.batch_norm(arr(backend, TV3_EVAL_X, dtype), None, None, state, training=False,
                              convention="mxnet")
    check(y, [[5.997002248127]], dtype, 12.0, "eval y")


# ---- §6: values measured with MXNet 1.9.1 and torch 2.13 on CPU ----------------------------------------------
M_X = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
M_GAMMA = [1.5, 0.5]
M_BETA = [0.1, -0.2]
M_DY = [[1.0, -2.0], [3.0, 0.5], [-1.0, 2.0]]
M_EPS = 1e-5
# measured float32 values (MXNet gluon / nd.BatchNorm(fix_gamma=False, momentum=0.9, eps=1e-5))
M_Y = [[-1.7371138, -0.8123713], [0.1, -0.2], [1.9371139, 0.4123713]]
M_DX = [[-0.91855371, -0.05103316], [1.83711398, 0.10206188], [-0.91856027, -0.05102871]]
M_DGAMMA = [-2.4494853, 4.8989706]
M_DBETA = [3.0, 0.5]
M_MXNET_STATE = ([0.2, 0.3000001], [1.1666667, 1.1666667])
M_TORCH_STATE = ([0.2, 0.3], [1.3, 1.3])
# MXNet's own float32 kernel is a few 1e-6 off (its two dx[., 0] entries that are equal in exact arithmetic
# differ by 7e-6); compare the measured numbers at that level and the exact values at the dtype's tolerance
MEASURED_ATOL = 2e-5


def measured_inputs(backend: str, dtype: str, shape4: bool):
    def r(a):
        a = np.asarray(a, np.float64)
        return a.reshape(*a.shape, 1, 1) if shape4 else a

    return (arr(backend, r(M_X), dtype), arr(backend, M_GAMMA, dtype), arr(backend, M_BETA, dtype),
            arr(backend, r(M_DY), dtype), make_state(backend, [0, 0], [1, 1], 0, dtype), r)


@pytest.mark.parametrize("shape4", [False, True], ids=["NC", "NC11"])
@pytest.mark.parametrize("convention", ["gluon", "torch"])
def test_measured(backend: str, dtype: str, convention: str, shape4: bool) -> None:
    """y, dx, dgamma, dbeta and the moving statistics of §6, for gluon (MXNet, momentum 0.9) and torch."""
    x, gamma, beta, dy, state, r = measured_inputs(backend, dtype, shape4)
    kw = {"convention": convention, "eps": M_EPS, "axis": 1}
    y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, dy, **kw)
    exact = reference(r(M_X), M_GAMMA, M_BETA, r(M_DY), eps=M_EPS, axis=1)
    for name, got, measured, ex, mag in (
        ("y", y, r(M_Y), exact.y, exact.mag_y),
        ("dx", dx, r(M_DX), exact.dx, exact.mag_dx),
        ("dgamma", dgamma, M_DGAMMA, exact.dgamma, exact.mag_dgamma),
        ("dbeta", dbeta, M_DBETA, exact.dbeta, exact.mag_dbeta),
    ):
        np.testing.assert_allclose(to_numpy(got), measured, rtol=1e-6, atol=MEASURED_ATOL, err_msg=name)
        check(got, ex, dtype, mag, name)
    rm, rv = M_MXNET_STATE if convention == "gluon" else M_TORCH_STATE
    np.testing.assert_allclose(to_numpy(new.running_mean), rm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_var), rv, rtol=1e-6, atol=1e-6)
    exact_rv = 0.9 + 0.1 * exact.var * (3 / 2 if convention == "torch" else 1)
    check(new.running_mean, [0.2, 0.3], dtype, 1.0, "running_mean")
    check(new.running_var, exact_rv, dtype, 2.0, "running_var")


def test_measured_autodiff(backend: str, dtype: str) -> None:
    """§6's dx, dgamma, dbeta through each framework's autodiff (gluon convention)."""
    x, gamma, beta, dy, state, _ = measured_inputs(backend, dtype, False)
    y, new, dx, dgamma, dbeta = autodiff(backend, x, gamma, beta, state, dy, convention="gluon", eps=M_EPS)
    for name, got, measured in (("y", y, M_Y), ("dx", dx, M_DX), ("dgamma", dgamma, M_DGAMMA),
                                ("dbeta", dbeta, M_DBETA)):
        np.testing.assert_allclose(to_numpy(got), measured, rtol=1e-6, atol=MEASURED_ATOL, err_msg=name)
    np.testing.assert_allclose(to_numpy(new.running_var), M_MXNET_STATE[1], rtol=1e-6, atol=1e-6)


def test_measured_fix_gamma(backend: str, dtype: str) -> None:
    """The default ``fix_gamma=True`` (mxnet convention): gamma is ignored and dgamma is 0, and unlike MXNet,
    the caller's gamma array is not overwritten with ones."""
    x, gamma, beta, dy, state, _ = measured_inputs(backend, dtype, False)
    kw = {"convention": "mxnet", "eps": M_EPS, "momentum": 0.9}
    y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
    dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, dy, **kw)
    exact = reference(M_X, M_GAMMA, M_BETA, M_DY, eps=M_EPS, axis=1, fix_gamma=True)
    check(y, exact.y, dtype, exact.mag_y, "y")
    check(dx, exact.dx, dtype, exact.mag_dx, "dx")
    check(dgamma, [0.0, 0.0], dtype, 1.0, "dgamma")
    check(dbeta, M_DBETA, dtype, exact.mag_dbeta, "dbeta")
    np.testing.assert_allclose(to_numpy(new.running_var), M_MXNET_STATE[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(gamma), M_GAMMA)


@pytest.mark.parametrize("convention", ["torch", "mxnet", "keras"])
def test_measured_eval(backend: str, dtype: str, convention: str) -> None:
    """Eval on §6's input with torch's state after §6 (RM [0.2, 0.3], RV [1.3, 1.3]) and gamma != 1:
    y = gamma (x - RM) / sqrt(RV + eps) + beta, dx = gamma dy / sqrt(RV + eps), dgamma = sum dy (x - RM) s."""
    conv = CONVENTIONS[convention]
    rm, rv = M_TORCH_STATE
    exact = reference(M_X, M_GAMMA, M_BETA, M_DY, eps=conv.eps, axis=1, fix_gamma=conv.fix_gamma, rm=rm, rv=rv)
    axis = 1 if convention != "keras" else -1
    for fw_autodiff in (False, True) if backend in AUTODIFF_BACKENDS else (False,):
        x, gamma, beta, dy = (arr(backend, a, dtype) for a in (M_X, M_GAMMA, M_BETA, M_DY))
        state = make_state(backend, rm, rv, 1, dtype)
        kw = {"convention": convention, "axis": axis, "training": False}
        if fw_autodiff:
            y, new, dx, dgamma, dbeta = autodiff(backend, x, gamma, beta, state, dy, **kw)
        else:
            y, new = multibn.batch_norm(x, gamma, beta, state, **kw)
            dx, dgamma, dbeta = multibn.batch_norm_vjp(x, gamma, beta, state, dy, **kw)
        check(y, exact.y, dtype, exact.mag_y, "y")
        check(dx, exact.dx, dtype, exact.mag_dx, "dx")
        check(dgamma, exact.dgamma, dtype, exact.mag_dgamma, "dgamma")
        check(dbeta, exact.dbeta, dtype, exact.mag_dbeta, "dbeta")
        assert tracked(new, backend) == 1


# ---- the frameworks themselves, where installed: re-measure §6/TV1/TV2 live -----------------------------------
def _torch_reference(x, gamma, beta, dy, momentum, eps):
    import torch

    x = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    w = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
    y.backward(torch.tensor(np.asarray(dy), dtype=torch.float64))
    return [t.detach().numpy() for t in (y, x.grad, w.grad, b.grad, rm, rv)]


@pytest.mark.torch
@pytest.mark.parametrize("case", ["tv1", "tv2", "measured"])
def test_live_torch_functional(case: str) -> None:
    """multibn's torch convention (float64, numpy backend) against torch.nn.functional.batch_norm itself."""
    require("torch")
    x, gamma, beta, dy = {
        "tv1": (TV1_X, TV1_GAMMA, TV1_BETA, [[1.0, -2.0], [0.5, 3.0]]),
        "tv2": (tv2_x(), TV2_GAMMA, TV2_BETA, tv2_g()),
        "measured": (M_X, M_GAMMA, M_BETA, M_DY),
    }[case]
    want = _torch_reference(x, gamma, beta, dy, 0.1, 1e-5)
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    c = x.shape[1]
    state = BNState(np.zeros(c), np.ones(c), np.asarray(0, np.int64))
    y, new = multibn.batch_norm(x, np.asarray(gamma), np.asarray(beta), state)
    got = [y, *multibn.batch_norm_vjp(x, np.asarray(gamma), np.asarray(beta), state, dy), *new[:2]]
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11, err_msg=name)


@pytest.mark.torch
def test_live_torch_cma_tv3() -> None:
    """torch_cma against nn.BatchNorm1d(momentum=None) on TV3 (two steps, then eval)."""
    require("torch")
    import torch

    bn = torch.nn.BatchNorm1d(1, momentum=None).double()
    state = multibn.init_state(1, dtype="float64", convention="torch_cma")
    for x in TV3_STEPS:
        bn(torch.tensor(x, dtype=torch.float64))
        _, state = multibn.batch_norm(np.asarray(x), None, None, state, convention="torch_cma")
    np.testing.assert_allclose(state.running_mean, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(state.running_var, bn.running_var.numpy(), rtol=1e-12)
    assert int(state.num_batches_tracked) == int(bn.num_batches_tracked) == 2
    bn.eval()
    want = bn(torch.tensor(TV3_EVAL_X, dtype=torch.float64)).detach().numpy()
    got, _ = multibn.batch_norm(np.asarray(TV3_EVAL_X), None, None, state, training=False, convention="torch_cma")
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.mxnet
@pytest.mark.parametrize("fix_gamma", [True, False])
@pytest.mark.parametrize("case", ["tv1", "tv2", "measured"])
def test_live_mxnet_operator(case: str, fix_gamma: bool) -> None:
    """The mxnet (fix_gamma) and gluon-like conventions against mx.nd.BatchNorm on CPU, after its backward."""
    require("mxnet")
    import mxnet as mx

    x, gamma, beta, dy = {
        "tv1": (TV1_X, TV1_GAMMA, TV1_BETA, [[1.0, -2.0], [0.5, 3.0]]),
        "tv2": (tv2_x(), TV2_GAMMA, TV2_BETA, tv2_g()),
        "measured": (M_X, M_GAMMA, M_BETA, M_DY),
    }[case]
    x, dy = np.asarray(x, np.float32), np.asarray(dy, np.float32)
    c = x.shape[1]
    mx_x, mx_g, mx_b = mx.nd.array(x), mx.nd.array(gamma), mx.nd.array(beta)
    mm, mv = mx.nd.zeros(c), mx.nd.ones(c)
    for a in (mx_x, mx_g, mx_b):
        a.attach_grad()
    with mx.autograd.record():
        out = mx.nd.BatchNorm(mx_x, mx_g, mx_b, mm, mv, eps=1e-3, momentum=0.9, fix_gamma=fix_gamma)
    out.backward(mx.nd.array(dy))
    want = [a.asnumpy() for a in (out, mx_x.grad, mx_g.grad, mx_b.grad, mm, mv)]

    conv = "mxnet" if fix_gamma else dataclasses.replace(CONVENTIONS["mxnet"], fix_gamma=False)
    state = BNState(np.zeros(c, np.float32), np.ones(c, np.float32), np.asarray(0, np.int64))
    g32, b32 = np.asarray(gamma, np.float32), np.asarray(beta, np.float32)
    y, new = multibn.batch_norm(x, g32, b32, state, convention=conv)
    got = [y, *multibn.batch_norm_vjp(x, g32, b32, state, dy, convention=conv), *new[:2]]
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_var"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=MEASURED_ATOL * 10, err_msg=name)
