"""Batch renormalisation and ghost batch norm: against Keras 3's ``BatchNormalization(renorm=True)`` on its JAX and
torch backends, against a float64 textbook transcription of ghost BN, across backends, and their derivatives
(gradcheck/gradgradcheck, ``jax.test_util.check_grads``), and the errors for what is not supported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import multibn
from tests.helpers import ALL_BACKENDS, ROOT, arr, jax_float64, mxnet_module, need, need_installed, require, to_numpy

CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
GAMMA = np.array([0.5, 1.0, 2.0], np.float32)
BETA = np.array([0.1, -0.2, 0.3], np.float32)


def _steps(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal(shape) * (i + 1) + i).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32)) for i in range(n)]


# ---- batch renormalisation against Keras 3 -------------------------------------------------------------------------
def _keras_run(keras_backend: str, steps: list, training: list[bool], tmp_path: Path) -> dict[str, np.ndarray]:
    need_installed("keras", "the reference of batch renormalisation")  # not imported here: Keras picks its backend
    src, dst = tmp_path / f"in_{keras_backend}.npz", tmp_path / f"out_{keras_backend}.npz"
    config = {"nsteps": len(steps), "axis": -1, "momentum": 0.9, "eps": 1e-3, "clip": CLIP, "renorm_momentum": 0.8}
    data = {"config": json.dumps(config), "gamma": GAMMA, "beta": BETA}
    for i, ((x, dy), t) in enumerate(zip(steps, training, strict=True)):
        data.update({f"x{i}": x, f"dy{i}": dy, f"training{i}": t})
    np.savez(src, **data)
    env = dict(os.environ, KERAS_BACKEND=keras_backend, PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "conformance" / "keras_renorm_worker.py"),
                    str(src), str(dst)], env=env, check=True, timeout=300, cwd=ROOT, capture_output=True)
    with np.load(dst) as d:
        return dict(d)


def _forward_backward(backend: str, x: np.ndarray, dy: np.ndarray, state: object, g: np.ndarray = GAMMA,
                      b: np.ndarray = BETA, **kw: object) -> tuple[tuple, object]:
    """``((y, dx, dgamma, dbeta), new_state)`` of ``sum(y * dy)`` by the backend's own autodiff (NumPy:
    :func:`multibn.batch_norm_vjp`)."""
    if backend == "numpy":
        y, new = multibn.batch_norm(x, g, b, state, **kw)
        return (y, *multibn.batch_norm_vjp(x, g, b, state, dy, **kw)), new
    if backend == "torch":
        torch = need("torch")
        xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
        y, new = multibn.batch_norm(xt, gt, bt, state, **kw)
        (y * torch.tensor(dy)).sum().backward()
        return (y.detach(), xt.grad, gt.grad, bt.grad), new
    if backend == "jax":
        jax = need("jax")

        def f(x, g, b):
            return multibn.batch_norm(x, g, b, state, **kw)

        y, vjp, new = jax.vjp(f, *(jax.numpy.asarray(a) for a in (x, g, b)), has_aux=True)
        return (y, *vjp(jax.numpy.asarray(dy))), new
    mx = mxnet_module()
    xm, gm, bm = (mx.nd.array(a) for a in (x, g, b))
    for a in (xm, gm, bm):
        a.attach_grad()
    with mx.autograd.record():
        y, new = multibn.batch_norm(xm, gm, bm, state, **kw)
    y.backward(mx.nd.array(dy))
    return (y, xm.grad, gm.grad, bm.grad), new


def _multibn_step(backend: str, x: np.ndarray, dy: np.ndarray, state: object, training: bool, **kw: object
                  ) -> tuple[tuple, object]:
    """One step under the keras convention with momentum 0.9 (the Keras reference's settings)."""
    return _forward_backward(backend, x, dy, state, convention="keras", momentum=0.9, training=training, **kw)


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_renorm_equals_keras(keras_backend: str, tmp_path: Path) -> None:
    """Outputs, gradients and every moving statistic over four training steps and an inference step."""
    require(keras_backend)
    steps = _steps((16, 2, 3), n=5)
    training = [True, True, True, True, False]
    ref = _keras_run(keras_backend, steps, training, tmp_path)
    state = multibn.init_state(3, backend=keras_backend, renorm=True)
    names = {"running_mean": "moving_mean", "running_var": "moving_variance", "running_std": "moving_stddev",
             "renorm_mean": "renorm_mean", "renorm_std": "renorm_stddev"}
    for i, ((x, dy), t) in enumerate(zip(steps, training, strict=True)):
        got, state = _multibn_step(keras_backend, x, dy, state, t, renorm=CLIP, renorm_momentum=0.8)
        for k, g in zip(("y", "dx", "dgamma", "dbeta"), got, strict=True):
            np.testing.assert_allclose(to_numpy(g), ref[f"{k}{i}"], rtol=2e-5, atol=2e-5, err_msg=f"{k}, step {i}")
        for ours, theirs in names.items():
            np.testing.assert_allclose(to_numpy(getattr(state, ours)), ref[f"{theirs}{i}"], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{ours}, step {i}")


def _renorm_reference(x: np.ndarray, state: tuple, clip: dict, eps: float) -> np.ndarray:
    """Keras's formula in float64, channels last: ``y = xhat * (r gamma) + (d gamma + beta)``."""
    x = x.astype(np.float64)
    red = tuple(range(x.ndim - 1))
    mean, var = x.mean(red), x.var(red)
    rstd = np.maximum(np.asarray(state[5], np.float64), np.sqrt(eps))
    r = np.clip(np.sqrt(var + eps) / rstd, clip.get("rmin", -np.inf), clip.get("rmax", np.inf))
    d = np.clip((mean - np.asarray(state[4], np.float64)) / rstd, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    return (x - mean) / np.sqrt(var + eps) * (r * GAMMA) + (d * GAMMA + BETA)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_renorm_same_on_every_backend(backend: str) -> None:
    """Every backend's outputs, gradients (its own autodiff; NumPy's batch_norm_vjp) and running statistics equal
    NumPy's in float64 and Keras's formula, over three steps."""
    require(backend)
    steps = _steps((8, 4, 3), n=3, seed=1)
    ours = multibn.init_state(3, backend=backend, renorm=True)
    ref = multibn.init_state(3, renorm=True, dtype="float64")
    for x, dy in steps:
        got, ours = _multibn_step(backend, x, dy, ours, True, renorm=CLIP)
        np.testing.assert_allclose(to_numpy(got[0]), _renorm_reference(x, ref, CLIP, 1e-3), rtol=1e-4, atol=1e-4)
        want = multibn.batch_norm_vjp(x.astype(np.float64), GAMMA.astype(np.float64), BETA.astype(np.float64), ref,
                                      dy.astype(np.float64), convention="keras", momentum=0.9, renorm=CLIP)
        _, ref = multibn.batch_norm(x.astype(np.float64), GAMMA.astype(np.float64), BETA.astype(np.float64), ref,
                                    convention="keras", momentum=0.9, renorm=CLIP)
        for g, w in zip(got[1:], want, strict=True):
            np.testing.assert_allclose(to_numpy(g), w, rtol=1e-4, atol=1e-4)
        for k in ours._fields:
            np.testing.assert_allclose(to_numpy(getattr(ours, k)), to_numpy(getattr(ref, k)), rtol=1e-5, atol=1e-6)


def test_renorm_without_clipping_at_the_first_step_is_plain_bn() -> None:
    """With renorm_std 1 and renorm_mean 0 the first step has r = std_B, d = mean_B: ``y = x * gamma + beta``
    (batch renormalisation's identity at initialisation), which plain BN is not."""
    x = np.random.default_rng(3).standard_normal((10, 3)) * 2 + 1
    state = multibn.init_state(3, renorm=True, dtype="float64", convention="keras")
    y, _ = multibn.batch_norm(x, GAMMA.astype(np.float64), BETA.astype(np.float64), state, convention="keras",
                              renorm={}, eps=0.0)
    np.testing.assert_allclose(y, x * GAMMA + BETA, rtol=1e-12, atol=1e-12)


# ---- ghost batch norm against the textbook, per sub-batch ----------------------------------------------------------
def _ghost_reference(x: np.ndarray, dy: np.ndarray, g: np.ndarray, b: np.ndarray, k: int, ax: int, eps: float,
                     unbiased: bool) -> tuple[np.ndarray, ...]:
    """y, dx, dgamma, dbeta, mean of the sub-batch means, mean of their running variances, in float64."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    sh = [1] * x.ndim
    sh[ax] = -1
    ys, dxs, dg, db, means, variances = [], [], 0.0, 0.0, [], []
    for i in range(x.shape[0] // k):
        xs, dys = x[i * k:(i + 1) * k], dy[i * k:(i + 1) * k]
        n = xs.size // xs.shape[ax]
        m, v = xs.mean(red, keepdims=True), xs.var(red, keepdims=True)
        s = 1 / np.sqrt(v + eps)
        xhat = (xs - m) * s
        ys.append(xhat * g.reshape(sh) + b.reshape(sh))
        dxs.append(g.reshape(sh) * s * (dys - dys.mean(red, keepdims=True)
                                         - xhat * (dys * xhat).mean(red, keepdims=True)))
        dg, db = dg + (dys * xhat).sum(red), db + dys.sum(red)
        means.append(m.reshape(-1))
        variances.append(v.reshape(-1) * (n / (n - 1) if unbiased else 1))
    return (np.concatenate(ys), np.concatenate(dxs), dg, db, np.mean(means, 0), np.mean(variances, 0))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("shape", "axis", "convention"), [((12, 3, 4, 5), 1, "torch"), ((8, 5, 3), -1, "keras"),
                                                          ((16, 3), 1, "gluon")])
def test_ghost_equals_textbook(backend: str, shape: tuple[int, ...], axis: int, convention: str) -> None:
    require(backend)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    g, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    conv = multibn.CONVENTIONS[convention]
    ref = _ghost_reference(x, dy, g, b, 4, axis % len(shape), conv.eps, conv.unbiased_running_var)
    kw = {"axis": axis, "convention": convention, "virtual_batch_size": 4, "momentum": 1.0 if
          conv.momentum_weighs == "new" else 0.0}
    state = multibn.init_state(c, backend=backend, convention=convention)
    (y, *grads), new = _forward_backward(backend, x, dy, state, g, b, **kw)
    for got, want in zip((y, *grads, new.running_mean, new.running_var), ref, strict=True):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-4, atol=2e-4)


def test_ghost_eval_is_plain_bn() -> None:
    x = np.random.default_rng(5).standard_normal((8, 3)).astype(np.float32)
    state = multibn.init_state(3)
    y, _ = multibn.batch_norm(x, state=state, training=False, virtual_batch_size=4)
    want, _ = multibn.batch_norm(x, state=state, training=False)
    np.testing.assert_array_equal(y, want)


# ---- derivatives ---------------------------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_torch_gradcheck_and_gradgradcheck(variant: str) -> None:
    torch = need("torch")
    rng = np.random.default_rng(6)
    x = torch.tensor(rng.standard_normal((8, 3, 2)) * 2 + 1, requires_grad=True)
    g = torch.tensor(rng.uniform(0.5, 2, 3), requires_grad=True)
    b = torch.tensor(rng.standard_normal(3), requires_grad=True)
    if variant == "renorm":
        # r and d are constants for differentiation (Keras's stop_gradient), so finite differences agree with the
        # derivative where both are clipped: a small renorm_std (r at rmax) and a far renorm_mean (d at -dmax)
        state = multibn.init_state(3, backend="torch", dtype="float64", renorm=True)
        state = state._replace(renorm_mean=torch.tensor([50.0, 60.0, 70.0], dtype=torch.float64),
                               renorm_std=torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64))
        kw = {"renorm": {"rmax": 3.0, "dmax": 5.0}}
    else:
        state, kw = multibn.init_state(3, backend="torch", dtype="float64"), {"virtual_batch_size": 4}

    def f(x: object, g: object, b: object) -> object:
        return multibn.batch_norm(x, g, b, state, **kw)[0]

    assert torch.autograd.gradcheck(f, (x, g, b))
    assert torch.autograd.gradgradcheck(f, (x, g, b))
    assert torch.autograd.gradcheck(f, (x, g, b), check_forward_ad=True, check_backward_ad=False)


@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_jax_check_grads(variant: str) -> None:
    jax = need("jax")
    from jax.test_util import check_grads

    rng = np.random.default_rng(7)
    with jax_float64():
        x = jax.numpy.asarray(rng.standard_normal((8, 2, 3)) * 2 + 1)
        g, b = jax.numpy.asarray(rng.uniform(0.5, 2, 3)), jax.numpy.asarray(rng.standard_normal(3))
        if variant == "renorm":  # r and d clipped: see test_torch_gradcheck_and_gradgradcheck
            state = multibn.init_state(3, backend="jax", dtype="float64", renorm=True, convention="keras")
            state = state._replace(renorm_std=jax.numpy.asarray([0.01, 0.02, 0.03]),
                                   renorm_mean=jax.numpy.asarray([-50.0, 60.0, 70.0]))
            kw = {"renorm": {"rmax": 3.0, "dmax": 5.0}, "convention": "keras", "backend": "jax"}
        else:
            state = multibn.init_state(3, backend="jax", dtype="float64", convention="keras")
            kw = {"virtual_batch_size": 2, "convention": "keras", "backend": "jax"}

        def f(x: object, g: object, b: object) -> object:
            return multibn.batch_norm(x, g, b, state, **kw)[0]

        check_grads(f, (x, g, b), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


# ---- what is not supported raises ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"renorm": {}}, "renorm needs state to be a multibn.RenormState"),
    ({"renorm": {"rmax": 0.5, "rmin": 1.0}, "renorm_state": True}, "rmax (0.5) must be >= rmin (1.0)"),
    ({"renorm": {"dmax": -1}, "renorm_state": True}, "renorm['dmax'] must be >= 0"),
    ({"renorm": {"cap": 2}, "renorm_state": True}, "renorm has unknown keys ['cap']"),
    ({"renorm": {}, "renorm_momentum": 1.5, "renorm_state": True}, "renorm_momentum must be a float in [0, 1]"),
    ({"renorm_state": True}, "state is a multibn.RenormState but renorm is None"),
    ({"virtual_batch_size": 5}, "virtual_batch_size=5 must divide the batch size, x.shape[0] = 8"),
    ({"virtual_batch_size": 0}, "virtual_batch_size must be None or a positive int"),
    ({"virtual_batch_size": 4, "mask": np.ones((8, 3), bool)}, "virtual_batch_size with mask="),
    ({"virtual_batch_size": 4, "renorm": {}, "renorm_state": True}, "virtual_batch_size with renorm"),
    ({"virtual_batch_size": 4, "axis": 0}, "the channel axis must not be 0"),
])
def test_variant_errors_name_the_argument(kwargs: dict, message: str) -> None:
    kwargs = dict(kwargs)
    renorm_state = kwargs.pop("renorm_state", False)
    x = np.random.default_rng(8).standard_normal((8, 3)).astype(np.float32)
    channels = 8 if kwargs.get("axis") == 0 else 3
    state = multibn.init_state(channels, renorm=renorm_state)
    before = [a.copy() for a in state]
    with pytest.raises(ValueError) as info:
        multibn.batch_norm(x, None, None, state, **kwargs)
    assert message in str(info.value)
    for a, b in zip(state, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_variant_errors_are_type_errors_where_the_type_is_wrong() -> None:
    with pytest.raises(TypeError, match="renorm must be None or a dict"):
        multibn.batch_norm(np.ones((4, 3), np.float32), state=multibn.init_state(3, renorm=True), renorm=[1.0])


def test_renorm_state_in_eval_normalises_with_the_running_statistics() -> None:
    x = arr("numpy", np.random.default_rng(9).standard_normal((6, 3)))
    state = multibn.init_state(3, renorm=True)._replace(running_mean=np.full(3, 0.5, np.float32))
    y, same = multibn.batch_norm(x, state=state, training=False)
    want, _ = multibn.batch_norm(x, state=multibn.BNState(*state[:3]), training=False)
    np.testing.assert_array_equal(y, want)
    assert same is state or all(a is b for a, b in zip(same, state, strict=True))


# ---- the conformance battery's rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("convention", sorted(multibn.CONVENTIONS))
def test_variant_battery_rows_pass_on_every_installed_backend(convention: str) -> None:
    """``multibn check``'s variant rows: every installed backend against the float64 transcriptions, pairwise too."""
    from multibn.conformance import check_case, variant_battery
    from tests.helpers import installed

    for case in variant_battery([convention]):
        rows, _ = check_case(case, installed())
        assert {r.quantity for r in rows} >= {"y", "dx", "dgamma", "dbeta", "running_mean", "running_var"}
        failed = [(r.backend, r.case, r.quantity, r.detail) for r in rows if not r.ok]
        assert not failed, failed


# ---- recompute_statistics on models with the variants ---------------------------------------------------------------
@pytest.mark.torch
def test_torch_recompute_statistics_with_renorm_and_ghost_layers() -> None:
    """The exact statistics land in running_mean/running_var (running_std agreeing with them); what renorm
    tracks for training is left as it was."""
    torch = need("torch")
    from multibn.layers.torch import BatchNorm, recompute_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(BatchNorm(3, renorm=True), BatchNorm(3, virtual_batch_size=4))
    for _ in range(2):
        model(torch.randn(8, 3) * 2 + 1)
    before = {k: v.clone() for k, v in model[0].named_buffers()}
    batches = [torch.randn(8, 3) * 3 - 1 for _ in range(3)]
    recompute_statistics(model, batches, progress=False)
    data = torch.cat(batches).double()
    torch.testing.assert_close(model[0].running_mean, data.mean(0).float())
    torch.testing.assert_close(model[0].running_var, data.var(0).float())
    torch.testing.assert_close(model[0].running_std, torch.sqrt(model[0].running_var + model[0].eps))
    for k in ("renorm_mean", "renorm_std", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[0], k), before[k])


def test_flax_recompute_statistics_with_a_renorm_layer() -> None:
    jax = need("jax")
    need("flax", "the Flax layer")
    from multibn.layers.flax import BatchNorm, recompute_statistics

    model = BatchNorm(use_running_average=False, renorm=True)
    x = jax.numpy.asarray(np.random.default_rng(10).standard_normal((8, 3)), jax.numpy.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    _, updates = model.apply(variables, x * 2 + 1, mutable=["batch_stats"])
    variables = {**variables, **updates}
    batches = [np.random.default_rng(i).standard_normal((8, 3)).astype(np.float32) * 3 - 1 for i in range(3)]
    out = recompute_statistics(model, variables, batches, progress=False)
    data = np.concatenate(batches).astype(np.float64)
    stats = out["batch_stats"]
    np.testing.assert_allclose(stats["mean"], data.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], data.var(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], np.sqrt(np.asarray(stats["var"]) + 1e-5), rtol=1e-6)
    for k in ("renorm_mean", "renorm_std"):
        np.testing.assert_array_equal(stats[k], variables["batch_stats"][k])


# ---- hypothesis: every backend equals NumPy in float64, for any input ------------------------------------------------
VARIANT_SHAPES = (((4, 3), 1), ((4, 2, 3), -1), ((6, 3, 2), 1), ((4, 2, 2, 3), -1), ((8, 2, 1, 2), 1))


def test_variants_on_every_backend_equal_float64_for_any_input(backend: str) -> None:
    """Hypothesis draws shapes, conventions, clipping, renorm statistics and sub-batch sizes: each backend's output
    and new state (float32) equal NumPy's float64 run of the same float32 values, within float32 rounding."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.core.test_properties import values

    def on_backend(state: tuple) -> tuple:
        """``state`` on ``backend``: its own counter, the float statistics converted."""
        fresh = multibn.init_state(len(state[0]), backend=backend, renorm=len(state) == 6)
        return type(state)(*(a if i == 2 else arr(backend, state[i]) for i, a in enumerate(fresh)))

    @settings(max_examples=max(settings.default.max_examples // (6 if backend == "jax" else 2), 4),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        shape, axis = data.draw(st.sampled_from(VARIANT_SHAPES))
        convention = data.draw(st.sampled_from(sorted(multibn.CONVENTIONS)))
        c = shape[axis]
        x = data.draw(values(shape, -5.0, 5.0)).astype(np.float32)
        g = data.draw(values((c,), 0.5, 2.0)).astype(np.float32)
        b = data.draw(values((c,), -1.0, 1.0)).astype(np.float32)
        if data.draw(st.booleans()):  # renorm, with drawn statistics and clipping
            clip = {k: v for k, v in (("rmin", data.draw(st.sampled_from([None, 0.5, 0.9]))),
                                      ("rmax", data.draw(st.sampled_from([None, 1.1, 2.0]))),
                                      ("dmax", data.draw(st.sampled_from([None, 0.0, 0.5, 3.0])))) if v is not None}
            rm = data.draw(values((c,), -2.0, 2.0)).astype(np.float32)
            rs = data.draw(values((c,), 0.1, 3.0)).astype(np.float32)
            state = multibn.init_state(c, renorm=True)._replace(renorm_mean=rm, renorm_std=rs)
            kw = {"renorm": clip, "renorm_momentum": data.draw(st.sampled_from([0.0, 0.5, 0.99]))}
        else:
            state = multibn.init_state(c)
            k = data.draw(st.sampled_from([d for d in (1, 2, shape[0]) if shape[0] % d == 0 and d > 1]))
            kw = {"virtual_batch_size": k}
        kw.update(convention=convention, axis=axis)
        try:
            want_y, want = multibn.batch_norm(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64),
                                              type(state)(*(np.asarray(a, np.float64) if a.dtype.kind == "f" else a
                                                            for a in state)), **kw)
        except ValueError as e:  # e.g. one value per channel under torch's rules: the backend must refuse too
            with pytest.raises(ValueError, match=str(e).split("(")[0][:40]):
                multibn.batch_norm(arr(backend, x), arr(backend, g), arr(backend, b), on_backend(state), **kw)
            return
        y, new = multibn.batch_norm(arr(backend, x), arr(backend, g), arr(backend, b), on_backend(state), **kw)
        # the fused y = x * scale + shift rounds like (|x| + |mean|) * |scale| * ulp (README, Numerics)
        eps = multibn.CONVENTIONS[convention].eps
        x64 = x.astype(np.float64)
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        if "renorm" in kw:
            var = x64.var(red)
            r = np.sqrt(var + eps) / np.maximum(rs.astype(np.float64), np.sqrt(eps))
            r = np.clip(r, kw["renorm"].get("rmin", 0.0), kw["renorm"].get("rmax", np.inf))
            scale = np.abs(g) * r / np.sqrt(var + eps)
        else:
            k = kw["virtual_batch_size"]
            var = np.min([x64[i:i + k].var(red) for i in range(0, shape[0], k)], axis=0)
            scale = np.abs(g) / np.sqrt(var + eps)
        fused = 16 * 2.0**-23 * 2 * np.abs(x64).max() * scale.max()
        np.testing.assert_allclose(to_numpy(y), want_y, atol=fused + 2e-5 * (1 + np.abs(want_y).max()), rtol=2e-5)
        for k_, w in zip(want._fields, want, strict=True):
            np.testing.assert_allclose(to_numpy(getattr(new, k_)).astype(np.float64), np.asarray(w, np.float64),
                                       atol=2e-5 * (1 + np.abs(np.asarray(w, np.float64)).max()), rtol=2e-5,
                                       err_msg=k_)

    check()
