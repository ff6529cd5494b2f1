"""What the public functions refuse and what they accept.

Every documented error: its type, and a message that names the argument, what it got and what it needs. A call
that raises checks everything before it computes, so it leaves the caller's arrays (state included) unchanged;
that is tested for each error below on every backend. Then the inputs accepted as well as their plain forms:
big-endian float arrays, NumPy integers for ``axis`` and ``num_features``; ``device`` honoured by every array of
a state, the counter included. (The commands' refusals are in tests/cli/test_inputs.py.)
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

import multibn
from multibn import CONVENTIONS, BNState, Convention
from multibn.backends import get_backend
from tests.helpers import arr, host_devices, jax_float64, need, require, to_numpy

TORCH_CONVENTIONS = ("torch", "torch_cma")
ALLOWING_CONVENTIONS = tuple(c for c in CONVENTIONS if c not in TORCH_CONVENTIONS)
CONVENTION_LIST = "torch, torch_cma, mxnet, gluon, d2l, flax, keras"
FLOATS = r"\(float16, bfloat16, float32, float64\)"


def inputs(backend: str, shape: tuple[int, ...] = (3, 2)):
    """x, gamma, beta and a state of ``backend`` (C = shape[1]) with recognisable values."""
    c = shape[1]
    x = arr(backend, np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 5)
    state = BNState(arr(backend, np.linspace(-1, 1, c)), arr(backend, np.linspace(0.5, 2, c)),
                    get_backend(backend).counter(7))
    return x, arr(backend, np.linspace(0.5, 1.5, c)), arr(backend, np.linspace(-0.3, 0.3, c)), state


def raises_and_changes_nothing(exc: type[Exception], match: str, call: Callable[[], object],
                               *watched: object) -> None:
    """``call()`` raises ``exc`` matching ``match`` and leaves every watched array (or BNState) as it was."""
    arrays = [a for w in watched for a in (w if isinstance(w, BNState) else (w,)) if w is not None]
    before = [to_numpy(a).copy() for a in arrays]
    with pytest.raises(exc, match=match):
        call()
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)


# ---- shapes ------------------------------------------------------------------------------------------------
def test_wrong_rank(backend: str) -> None:
    state = inputs(backend)[3]
    x1 = arr(backend, [1.0, 2.0, 3.0])
    raises_and_changes_nothing(
        ValueError, r"x must have rank >= 2 \(a batch axis and a channel axis\), got shape \(3,\)",
        lambda: multibn.batch_norm(x1, None, None, state), state)
    raises_and_changes_nothing(ValueError, r"x must have rank >= 2.*got shape \(3,\)",
                               lambda: multibn.batch_norm_vjp(x1, None, None, state, x1), state)
    if backend != "mxnet":  # MXNet 1.x has no 0-d arrays
        raises_and_changes_nothing(ValueError, r"x must have rank >= 2.*got shape \(\)",
                                   lambda: multibn.batch_norm(arr(backend, 1.0), None, None, state), state)


@pytest.mark.parametrize("which", ["gamma", "beta", "state.running_mean", "state.running_var"])
@pytest.mark.parametrize("bad_shape", [(3,), (1,), (1, 2)])
def test_per_channel_vector_of_wrong_shape(backend: str, which: str, bad_shape: tuple[int, ...]) -> None:
    x, gamma, beta, state = inputs(backend)
    args = {"gamma": gamma, "beta": beta, "running_mean": state.running_mean, "running_var": state.running_var}
    args[which.removeprefix("state.")] = arr(backend, np.ones(bad_shape))
    st = BNState(args["running_mean"], args["running_var"], state.num_batches_tracked)
    shown = re.escape(str(bad_shape))
    for training in (True, False):
        raises_and_changes_nothing(
            ValueError,
            rf"{re.escape(which)} must have shape \(2,\), one value per channel of x along axis 1, got shape {shown}",
            lambda t=training: multibn.batch_norm(x, args["gamma"], args["beta"], st, training=t), st, args["gamma"])
    # the channel count follows the axis: along axis 0 there are 3 channels
    key = which.removeprefix("state.")
    vecs = {k: arr(backend, np.ones(4 if k == key else 3)) for k in args}
    st0 = BNState(vecs["running_mean"], vecs["running_var"], state.num_batches_tracked)
    raises_and_changes_nothing(
        ValueError,
        rf"{re.escape(which)} must have shape \(3,\), one value per channel of x along axis 0, got shape \(4,\)",
        lambda: multibn.batch_norm(x, vecs["gamma"], vecs["beta"], st0, axis=0), st0)


def test_axis_out_of_range(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    for axis in (2, -3):
        raises_and_changes_nothing(
            ValueError, rf"axis must be an int in \[-2, 2\) for x of shape \(3, 2\), got {axis}",
            lambda a=axis: multibn.batch_norm(x, gamma, beta, state, axis=a), state)


def test_dy_of_wrong_shape(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    raises_and_changes_nothing(
        ValueError, r"dy must have the shape of x, \(3, 2\), got \(2, 3\)",
        lambda: multibn.batch_norm_vjp(x, gamma, beta, state, arr(backend, np.ones((2, 3)))), state)


# ---- dtypes ------------------------------------------------------------------------------------------------
INT_DTYPE = {"numpy": "int64", "torch": "int64", "jax": "int32", "mxnet": "int64"}


def test_integer_x(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    xi = arr(backend, [[1, 2], [3, 4]], INT_DTYPE[backend])
    dt = get_backend(backend).dtype_name(xi)
    assert dt.startswith("int")
    raises_and_changes_nothing(TypeError, rf"x must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm(xi, gamma, beta, state), state)
    raises_and_changes_nothing(TypeError, rf"x must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm_vjp(xi, gamma, beta, state, x[:2]), state)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])  # MXNet 1.x has no complex arrays
def test_complex_x(backend: str) -> None:
    require(backend)
    _, gamma, beta, state = inputs(backend)
    xc = arr(backend, [[1, 2j], [3, 4]], "complex64")
    raises_and_changes_nothing(TypeError, rf"x must have a floating dtype {FLOATS}, got complex64",
                               lambda: multibn.batch_norm(xc, gamma, beta, state), state)


def test_integer_parameters_and_dy(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    ints = arr(backend, [1, 2], INT_DTYPE[backend])
    dt = get_backend(backend).dtype_name(ints)
    raises_and_changes_nothing(TypeError, rf"gamma must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm(x, ints, beta, state), state)
    raises_and_changes_nothing(TypeError, rf"beta must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm(x, gamma, ints, state), state)
    raises_and_changes_nothing(TypeError, rf"state.running_var must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm(x, gamma, beta, state._replace(running_var=ints)), state)
    raises_and_changes_nothing(TypeError, rf"dy must have a floating dtype {FLOATS}, got {dt}",
                               lambda: multibn.batch_norm_vjp(x, gamma, beta, state,
                                                              arr(backend, np.ones((3, 2)), INT_DTYPE[backend])),
                               state)


def test_float_num_batches_tracked(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    bad = state._replace(num_batches_tracked=arr(backend, [1.0]))
    raises_and_changes_nothing(TypeError, r"state.num_batches_tracked must be an integer array, got dtype float32",
                               lambda: multibn.batch_norm(x, gamma, beta, bad), state)


@pytest.mark.mxnet
def test_bfloat16_on_mxnet() -> None:
    """MXNet 1.9's NDArray has no bfloat16: a bfloat16 state is refused with a TypeError."""
    require("mxnet")
    with pytest.raises(TypeError, match=r"the mxnet backend has no bfloat16 dtype"):
        multibn.init_state(2, backend="mxnet", dtype="bfloat16")


@pytest.mark.mxnet
@pytest.mark.parametrize("which", ["x", "gamma"])
def test_bfloat16_array_on_mxnet(which: str) -> None:
    require("mxnet")
    ml_dtypes = need("ml_dtypes")
    state = multibn.init_state(2, backend="mxnet")
    x = np.ones((3, 2), ml_dtypes.bfloat16 if which == "x" else np.float32)
    gamma = np.ones(2, ml_dtypes.bfloat16 if which == "gamma" else np.float32)
    raises_and_changes_nothing(
        TypeError, rf"{which} could not be converted to a mxnet array: the mxnet backend has no bfloat16 dtype",
        lambda: multibn.batch_norm(x, gamma, None, state, backend="mxnet"), state)


def test_bfloat16_on_numpy() -> None:
    ml_dtypes = need("ml_dtypes")
    with pytest.raises(TypeError, match=r"the numpy backend has no bfloat16 dtype"):
        multibn.batch_norm(np.ones((3, 2), ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match=r"the numpy backend has no bfloat16 dtype"):
        multibn.init_state(2, dtype="bfloat16")


def test_float64_on_jax_needs_x64() -> None:
    require("jax")
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    with pytest.raises(TypeError, match=r"x could not be converted to a jax array: float64 on the jax backend needs "
                                        r"jax_enable_x64"):
        multibn.batch_norm(np.ones((3, 2)), backend="jax")
    with pytest.raises(TypeError, match=r"float64 on the jax backend needs jax_enable_x64"):
        multibn.init_state(2, backend="jax", dtype="float64")


# ---- backends, conventions, mode ---------------------------------------------------------------------------
@pytest.mark.parametrize(("fx", "fg"), [("torch", "jax"), ("jax", "torch"), ("mxnet", "torch"), ("torch", "mxnet")])
def test_mixed_frameworks(fx: str, fg: str) -> None:
    require(fx, fg)
    x, gamma, beta, state = inputs(fx)
    _, other_gamma, _, other_state = inputs(fg)
    raises_and_changes_nothing(
        TypeError, rf"x is a {fx} array but gamma is a {fg} array; arrays of two frameworks cannot be mixed",
        lambda: multibn.batch_norm(x, other_gamma, beta, state), state, other_gamma)
    raises_and_changes_nothing(
        TypeError, rf"x is a {fx} array but state.running_mean is a {fg} array",
        lambda: multibn.batch_norm(x, gamma, beta, other_state), other_state)
    raises_and_changes_nothing(
        TypeError, rf"x is a {fx} array but dy is a {fg} array",
        lambda: multibn.batch_norm_vjp(x, gamma, beta, state, inputs(fg)[0]), state)
    raises_and_changes_nothing(
        TypeError, rf"x is a {fx} array but backend='{fg}'; only NumPy arrays and Python sequences are converted",
        lambda: multibn.batch_norm(x, backend=fg), state)


def test_numpy_parameters_with_a_framework_x_need_the_backend_named() -> None:
    require("torch")
    x, _, _, state = inputs("torch")
    with pytest.raises(TypeError, match=r"x is a torch array but gamma is a numpy array.*pass backend='torch'"):
        multibn.batch_norm(x, np.ones(2, np.float32), None, state)
    y, _ = multibn.batch_norm(x, np.ones(2, np.float32), None, state, backend="torch")
    assert get_backend("torch").is_array(y)


def test_backend_cannot_be_inferred() -> None:
    with pytest.raises(TypeError, match=r"cannot infer the backend from x of type builtins.list; pass a NumPy, "
                                        r"PyTorch, JAX or MXNet array, or name the backend"):
        multibn.batch_norm([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match=r"x must be an array or a sequence of numbers, got str"):
        multibn.batch_norm("12", backend="numpy")


def test_unknown_convention(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    raises_and_changes_nothing(
        ValueError, rf"convention 'pytorch' is unknown; known conventions: {CONVENTION_LIST}",
        lambda: multibn.batch_norm(x, gamma, beta, state, convention="pytorch"), state)
    raises_and_changes_nothing(
        ValueError, r"convention 'Torch' is unknown",
        lambda: multibn.batch_norm_vjp(x, gamma, beta, state, x, convention="Torch"), state)
    raises_and_changes_nothing(
        TypeError, r"convention must be a name or a multibn.Convention, got int 3",
        lambda: multibn.batch_norm(x, gamma, beta, state, convention=3), state)
    with pytest.raises(ValueError, match=r"convention 'tf' is unknown"):
        multibn.init_state(2, backend=backend, convention="tf")


def test_unknown_backend() -> None:
    msg = r"backend must be one of 'numpy', 'torch', 'jax', 'mxnet' or None, got 'tensorflow'"
    state = multibn.init_state(2)
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(np.ones((3, 2), np.float32), None,
                                                                          None, state, backend="tensorflow"), state)
    with pytest.raises(ValueError, match=msg):
        multibn.init_state(2, backend="tensorflow")
    with pytest.raises(ValueError, match=r"got 'Torch'"):
        multibn.batch_norm_vjp(np.ones((3, 2), np.float32), None, None, None, np.ones((3, 2), np.float32),
                               backend="Torch")


def test_missing_state_in_eval(backend: str) -> None:
    x, gamma, beta, _ = inputs(backend)
    msg = (r"state is required when training=False \(eval mode normalises with the running statistics\); "
           r"create one with multibn.init_state")
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, training=False), gamma)
    raises_and_changes_nothing(ValueError, msg,
                               lambda: multibn.batch_norm_vjp(x, gamma, beta, None, x, training=False), gamma)


def test_bad_state_and_training_types(backend: str) -> None:
    x, gamma, beta, state = inputs(backend)
    raises_and_changes_nothing(
        TypeError, r"state must be a multibn.BNState \(running_mean, running_var, num_batches_tracked\), a multibn."
                   r"RenormState \(the same and running_std, renorm_mean, renorm_std\) or None, got list",
        lambda: multibn.batch_norm(x, gamma, beta, list(state)), state)
    raises_and_changes_nothing(
        TypeError, r"training must be True or False, got int 1",
        lambda: multibn.batch_norm(x, gamma, beta, state, training=1), state)


@pytest.mark.parametrize("momentum", [1.5, -0.1, 1.0000001, float("nan"), float("inf")])
def test_momentum_outside_unit_interval(backend: str, momentum: float) -> None:
    x, gamma, beta, state = inputs(backend)
    msg = rf"momentum must be in \[0, 1\], got {re.escape(repr(momentum))}"
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, state,
                                                                          momentum=momentum), state)
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, state, training=False,
                                                                          convention="flax", momentum=momentum),
                               state)
    with pytest.raises(ValueError, match=msg):
        Convention("custom", momentum, "old", unbiased_running_var=False, eps=1e-5)


def test_momentum_of_wrong_type() -> None:
    state = multibn.init_state(2)
    raises_and_changes_nothing(
        TypeError, r"momentum must be a float in \[0, 1\] or None, got str '0.1'",
        lambda: multibn.batch_norm(np.ones((3, 2), np.float32), None, None, state, momentum="0.1"), state)
    with pytest.raises(TypeError, match=r"momentum must be a float in \[0, 1\] or None, got bool True"):
        multibn.batch_norm(np.ones((3, 2), np.float32), momentum=True)


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan")])
def test_negative_eps(backend: str, eps: float) -> None:
    x, gamma, beta, state = inputs(backend)
    msg = rf"eps must be >= 0, got {re.escape(repr(eps))}"
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, state, eps=eps), state)
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm_vjp(x, gamma, beta, state, x, eps=eps),
                               state)
    with pytest.raises(ValueError, match=msg):
        Convention("custom", 0.9, "old", unbiased_running_var=False, eps=eps)
    with pytest.raises(TypeError, match=r"eps must be a non-negative float, got str '1e-5'"):
        multibn.batch_norm(x, eps="1e-5")


def test_invalid_convention_records() -> None:
    with pytest.raises(ValueError, match=r"momentum_weighs must be 'new' or 'old', got 'both'"):
        Convention("custom", 0.1, "both", unbiased_running_var=False, eps=1e-5)
    with pytest.raises(ValueError, match=r"momentum=None \(cumulative average\) is only defined with "
                                         r"momentum_weighs='new'"):
        Convention("custom", None, "old", unbiased_running_var=False, eps=1e-5)


def test_init_state_arguments() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"num_features must be a positive int, got {bad!r}"):
            multibn.init_state(bad)
    with pytest.raises(TypeError, match=r"dtype must be one of float16, bfloat16, float32, float64, got 'int32'"):
        multibn.init_state(2, dtype="int32")


# ---- one value per channel -------------------------------------------------------------------------------------
SINGLE_SHAPES = [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)]


@pytest.mark.parametrize("shape", SINGLE_SHAPES)
@pytest.mark.parametrize("convention", TORCH_CONVENTIONS)
def test_single_value_per_channel_raises_under_torch(backend: str, convention: str, shape: tuple[int, ...]) -> None:
    """PyTorch's F.batch_norm error, raised before anything changes; eval with N = 1 is fine."""
    x, gamma, beta, state = inputs(backend, shape)
    msg = (rf"Expected more than 1 value per channel when training, got input size {re.escape(str(shape))} "
           rf"\(convention '{convention}' stores the unbiased running variance M2/\(n-1\)\)")
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, state,
                                                                          convention=convention), state, x, gamma)
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm(x, gamma, beta, None,
                                                                          convention=convention))
    raises_and_changes_nothing(ValueError, msg, lambda: multibn.batch_norm_vjp(x, gamma, beta, state, x,
                                                                              convention=convention), state)
    y, _ = multibn.batch_norm(x, gamma, beta, state, training=False, convention=convention)
    assert tuple(to_numpy(y).shape) == shape
    # N = 1 with more than one value per channel (E5) is allowed
    multibn.batch_norm(inputs(backend, (1, 3, 2))[0], gamma, beta, state, convention=convention)


def fused_tolerance(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """A few float32 ulp of the fused terms |x| * gamma / sqrt(eps) that cancel in y = x * scale + shift."""
    return 4 * 2.0**-23 * (np.abs(x) * np.abs(gamma) / np.sqrt(eps) + 1)


@pytest.mark.parametrize("shape", SINGLE_SHAPES)
@pytest.mark.parametrize("convention", ALLOWING_CONVENTIONS)
def test_single_value_per_channel_allowed_elsewhere(backend: str, convention: str, shape: tuple[int, ...]) -> None:
    """MXNet, Gluon, Flax, Keras and d2l have no such check: variance 0, so y = beta (up to the fused form's
    rounding), and the biased running variance moves toward 0."""
    conv = CONVENTIONS[convention]
    xs = np.array([0.3, -7.0, 12.5], np.float32).reshape(shape)
    gamma = np.array([2.0, 0.5, 1.5], np.float32)
    beta = np.array([0.1, -0.2, 0.7], np.float32)
    state = multibn.init_state(3, backend=backend)
    y, new = multibn.batch_norm(arr(backend, xs), arr(backend, gamma), arr(backend, beta), state,
                                convention=convention, axis=1)
    g = np.ones(3) if conv.fix_gamma else gamma
    got = to_numpy(y).reshape(3)
    assert np.all(np.abs(got - beta) <= fused_tolerance(xs.reshape(3), g, conv.eps)), got - beta
    keep, take = conv.update_weights()
    np.testing.assert_allclose(to_numpy(new.running_mean), take * xs.reshape(3), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_var), [keep] * 3, rtol=1e-6)


@pytest.mark.parametrize("convention", ["mxnet", "flax"])
def test_single_value_per_channel_gives_beta_up_to_fused_rounding(convention: str) -> None:
    """y = x * scale + shift (the fused form the contract fixes, as PyTorch's CPU kernel) gives beta for a constant
    channel only up to the rounding of the two large terms, |x * scale| * ulp; MXNet, Flax and Keras normalise in
    the centred form and give beta exactly. A documented difference, bounded here."""
    xs = np.array([[0.3, -7.0, 12.5]], np.float32)
    gamma = np.array([2.0, 0.5, 1.5], np.float32)
    beta = np.array([0.1, -0.2, 0.7], np.float32)
    y, _ = multibn.batch_norm(xs, gamma, beta, convention=convention, axis=1)
    eps = multibn.CONVENTIONS[convention].eps
    gamma_eff = np.ones(3) if multibn.CONVENTIONS[convention].fix_gamma else gamma
    bound = 4 * np.finfo(np.float32).eps * (np.abs(xs[0]) * gamma_eff / np.sqrt(eps) + np.abs(beta))
    assert np.all(np.abs(y[0] - beta) <= bound)


# ---- MXNet-specific --------------------------------------------------------------------------------------------
@pytest.mark.mxnet
def test_empty_batch_on_mxnet() -> None:
    require("mxnet")
    state = multibn.init_state(2, backend="mxnet")
    raises_and_changes_nothing(
        ValueError, r"x could not be converted to a mxnet array: the mxnet backend cannot hold zero-size arrays "
                    r"\(MXNet 1.x\), got shape \(0, 2\)",
        lambda: multibn.batch_norm(np.zeros((0, 2), np.float32), None, None, state, backend="mxnet"), state)

# ==== what the public functions accept as well as their plain forms ===============================================
# big-endian float arrays, NumPy integers for ``axis`` and ``num_features``; ``device`` honoured by every array of a
# state, the counter included.
def _reference_y(x, gamma, beta, axis):
    """Training-mode BN in float64, the textbook formula."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    x = x.astype(np.float64)
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    return gamma.reshape(shape) * (x - mean) / np.sqrt(var + 1e-5) + beta.reshape(shape)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_big_endian_float_arrays_are_accepted(backend, dtype):
    require(backend)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 3).astype(">f4"), rng.normal(size=3).astype(">f4")
    assert not x.dtype.isnative
    with jax_float64(backend, np.dtype(dtype).name):  # float64 on jax: with x64 on for this call
        y, state = multibn.batch_norm(x, gamma, beta, multibn.init_state(3), backend=backend)
    assert to_numpy(y).dtype.name == np.dtype(dtype).name
    tol = 5e-3 if dtype == ">f2" else 1e-5
    np.testing.assert_allclose(to_numpy(y), _reference_y(x, gamma, beta, 1), rtol=tol, atol=tol)
    np.testing.assert_allclose(to_numpy(state.running_mean), 0.1 * x.astype(np.float64).mean((0, 2)), rtol=1e-3,
                               atol=1e-6)


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-2), np.intp(1)])
def test_numpy_integer_axis(axis):
    x = np.random.default_rng(1).normal(size=(5, 3, 4)).astype(np.float32)
    y, _ = multibn.batch_norm(x, axis=axis)
    np.testing.assert_allclose(y, _reference_y(x, np.ones(3), np.zeros(3), 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bad", "shown"), [(1.0, "1.0"), (True, "True"), ("1", "'1'"), (np.bool_(True), None),
                                            (np.float64(1.0), None)])
def test_non_integer_axis_is_refused_naming_its_type(bad, shown):
    """A NumPy scalar's repr can look like an int (``1.0``, ``True``): the message names its type then."""
    shown = f"{type(bad).__name__} " if shown is None else shown  # np.bool_ is "bool_" in NumPy 1, "bool" in 2
    with pytest.raises(ValueError, match=f"axis must be an int .* got {shown}"):
        multibn.batch_norm(np.zeros((4, 3), np.float32), axis=bad)


def test_numpy_integer_num_features():
    state = multibn.init_state(np.int64(4))
    assert state.running_mean.shape == (4,)
    for bad in (True, 4.0, np.float32(4), 0, np.int64(-1)):
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            multibn.init_state(bad)


def test_init_state_on_jax_with_a_device_string():
    require("jax")
    import jax

    state = multibn.init_state(4, backend="jax", device="cpu")
    cpu = jax.devices("cpu")[0]
    assert all(a.devices() == {cpu} for a in state)
    _, new = multibn.batch_norm(np.ones((3, 4), np.float32), state=state, backend="jax", device="cpu")
    assert int(new.num_batches_tracked) == 1


def test_jax_counter_follows_the_device():
    """On the second of the host devices conftest.py gives JAX."""
    jax = need("jax")
    d1 = host_devices(2)[1]
    state = multibn.init_state(4, backend="jax", device="cpu:1")
    assert all(a.devices() == {d1} for a in state), [a.devices() for a in state]
    x = jax.device_put(np.ones((3, 4), np.float32), d1)
    y, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 0))
    assert all(a.devices() == {d1} for a in new), [a.devices() for a in new]
    y, new = multibn.batch_norm(np.ones((3, 4), np.float32), state=multibn.init_state(4), backend="jax", device=d1)
    assert all(a.devices() == {d1} for a in (y, *new)), [a.devices() for a in (y, *new)]


@pytest.mark.mxnet
def test_mxnet_counter_follows_the_device():
    require("mxnet")
    import mxnet as mx

    ctx = mx.cpu(1)
    state = multibn.init_state(4, backend="mxnet", device=ctx)
    assert all(a.context == ctx for a in state)
    x = mx.nd.ones((3, 4), ctx=ctx)
    _, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 0))
    assert [a.context for a in new] == [ctx] * 3
    _, new = multibn.batch_norm(x, state=multibn.BNState(state.running_mean, state.running_var, 5), device=ctx)
    assert new.num_batches_tracked.context == ctx and int(new.num_batches_tracked.asscalar()) == 6
