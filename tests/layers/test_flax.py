"""multibn's Flax layers against Flax's own, and the framework-free JAX layer's checks.

* ``multibn.layers.flax.BatchNorm`` swapped for ``flax.linen.BatchNorm`` (``use_fast_variance=False``) in a
  Conv -> BN -> Dense model and an MLP: the same variable tree at init, the same losses, parameters and
  ``batch_stats`` after SGD steps under ``jit``, ``value_and_grad`` and ``mutable=["batch_stats"]``, the same
  eval output; bfloat16 params with float32 ``batch_stats``; masks (when ``multibn.batch_norm`` has ``mask=``);
  ``axis_name`` under ``shard_map`` on 4 host devices;
* ``multibn.layers.nnx.BatchNorm`` swapped for ``flax.nnx.BatchNorm`` the same way, with ``nnx.jit``,
  ``nnx.value_and_grad`` and ``train()``/``eval()``;
* ``multibn.layers.jax.BatchNorm``: float32 running statistics under bfloat16 params (against Flax over 1000
  steps) and errors for parameter trees it does not recognise.

Flax's tests skip where Flax is not installed (the ``current`` environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import multibn
from tests.helpers import LENET_X, LENET_Y, PARITY_LR, PARITY_STEPS, batches, host_devices, need

jax = need("jax")
jnp = jax.numpy

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
LR = 0.05


def flax_linen() -> Any:
    return need("flax.linen", why="flax is not installed in this environment")


def flax_nnx() -> Any:
    return need("flax.nnx", why="flax is not installed in this environment")


def data(shape: tuple[int, ...], n_out: int, steps: int = STEPS, seed: int = 0) -> list[tuple[Any, Any]]:
    """``steps`` (input, target) pairs, channels last, with per-feature offsets and spreads."""
    rng = np.random.default_rng(seed)
    offset, spread = rng.normal(size=shape[-1]) * 3, rng.uniform(0.5, 2.0, shape[-1])
    return [(jnp.asarray((rng.normal(size=shape) * spread + offset).astype(np.float32)),
             jnp.asarray(rng.normal(size=(shape[0], n_out)).astype(np.float32))) for _ in range(steps)]


def assert_trees_close(got: Any, want: Any, rtol: float = 2e-5, atol: float = 2e-6) -> None:
    """Same structure, shapes and dtypes; values close."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (jax.tree_util.keystr(path), a.dtype, b.dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# ==== flax.linen ======================================================================================================
def linen_models(kind: str) -> tuple[Any, Any]:
    """(Flax's model, the same model with multibn's BatchNorm)."""
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    class Net(nn.Module):
        bn: Any
        bn_kw: Any

        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            kw = dict(self.bn_kw)
            if kind == "conv":
                x = nn.Conv(4, (3, 3), use_bias=False)(x)
                x = self.bn(use_running_average=not train, momentum=0.9, **kw)(x)
                x = nn.relu(x).reshape(x.shape[0], -1)
            else:
                x = nn.Dense(8)(x)
                x = nn.relu(self.bn(momentum=0.8, epsilon=1e-3, **kw)(x, use_running_average=not train))
                x = nn.Dense(6, use_bias=False)(x)
                x = nn.tanh(self.bn(use_running_average=not train, use_scale=False, **kw)(x))
            return nn.Dense(2)(x)

    return (Net(nn.BatchNorm, (("use_fast_variance", False),)), Net(BatchNorm, ()))


def linen_train(model: Any, variables: Any, batches: list) -> tuple[list[float], Any]:
    @jax.jit
    def step(variables: Any, x: Any, t: Any) -> tuple[Any, Any]:
        def loss(params: Any) -> tuple[Any, Any]:
            y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.mean((y - t) ** 2), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - LR * g, variables["params"], grads)
        return value, {"params": params, "batch_stats": stats}

    losses = []
    for x, t in batches:
        value, variables = step(variables, x, t)
        losses.append(float(value))
    return losses, variables


@pytest.mark.parametrize(("kind", "shape"), [("conv", (8, 5, 5, 3)), ("mlp", (16, 5))])
def test_linen_swap_inits_trains_and_evaluates_as_flax(kind: str, shape: tuple[int, ...]) -> None:
    native, ours = linen_models(kind)
    batches = data(shape, 2)
    key = jax.random.PRNGKey(0)
    v_native, v_ours = native.init(key, batches[0][0], train=False), ours.init(key, batches[0][0], train=False)
    assert_trees_close(v_ours, v_native, rtol=0, atol=0)
    # init in training mode leaves the running statistics at their initial values, as in Flax
    assert_trees_close(ours.init(key, batches[0][0], train=True), native.init(key, batches[0][0], train=True),
                       rtol=0, atol=0)
    l_native, v_native = linen_train(native, v_native, batches)
    l_ours, v_ours = linen_train(ours, v_ours, batches)
    np.testing.assert_allclose(l_ours, l_native, rtol=1e-5)
    assert_trees_close(v_ours, v_native)
    stats = jax.tree_util.tree_leaves(v_ours["batch_stats"])
    assert all(not np.allclose(np.asarray(s), np.asarray(s).flat[0]) for s in stats)  # they moved
    x = batches[-1][0] * 1.5 + 0.3
    np.testing.assert_allclose(np.asarray(ours.apply(v_ours, x, train=False)),
                               np.asarray(native.apply(v_native, x, train=False)), rtol=1e-5, atol=1e-5)


def test_linen_eval_mode_gradients_match_flax() -> None:
    """Gradients with respect to params and input of an eval-mode BN (use_running_average=True)."""
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    x = data((6, 4), 1)[0][0]
    rng = np.random.default_rng(3)
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)}}
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def grads(layer: Any) -> Any:
        def f(params: Any, x: Any) -> Any:
            return jnp.sum(jnp.sin(layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)) * w)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(variables["params"], x)

    assert_trees_close(grads(BatchNorm(use_running_average=True)), grads(nn.BatchNorm(use_running_average=True)))


@pytest.mark.parametrize(("x_dtype", "param_dtype", "out_dtype"), [
    ("float32", "bfloat16", None), ("bfloat16", "bfloat16", None), ("bfloat16", "float32", None),
    ("float32", "bfloat16", "bfloat16"), ("bfloat16", "float32", "bfloat16"),
])
def test_linen_dtypes_as_flax_with_float32_batch_stats(x_dtype: str, param_dtype: str, out_dtype: str | None) -> None:
    """Flax's dtype rule (y in ``dtype``, else in result_type(x, scale, bias), computed in at least float32) and
    float32 batch_stats whatever param_dtype."""
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    kw = {"param_dtype": param_dtype, "dtype": out_dtype, "momentum": 0.9}
    native = nn.BatchNorm(use_running_average=False, use_fast_variance=False, **kw)
    ours = BatchNorm(use_running_average=False, **kw)
    x = data((32, 3), 1)[0][0].astype(x_dtype)
    v_native, v_ours = native.init(jax.random.PRNGKey(0), x), ours.init(jax.random.PRNGKey(0), x)
    assert_trees_close(v_ours, v_native, rtol=0, atol=0)
    assert v_ours["batch_stats"]["mean"].dtype == jnp.float32 and v_ours["params"]["scale"].dtype == param_dtype
    for x, _ in data((32, 3), 1, steps=3, seed=1):
        x = x.astype(x_dtype)
        y_native, upd_native = native.apply(v_native, x, mutable=["batch_stats"])
        y_ours, upd_ours = ours.apply(v_ours, x, mutable=["batch_stats"])
        assert y_ours.dtype == y_native.dtype
        tol = 1e-2 if y_native.dtype == jnp.bfloat16 else 2e-5  # one bfloat16 ulp; float32 rounding
        np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_native, np.float32), rtol=tol,
                                   atol=tol)
        assert_trees_close(upd_ours, upd_native, rtol=1e-5, atol=1e-6)
        v_native, v_ours = {**v_native, **upd_native}, {**v_ours, **upd_ours}


@pytest.mark.parametrize("axis", [1, (1,), (-1, -2), (1, 3)])
def test_linen_feature_axes_as_flax(axis: Any) -> None:
    """One feature axis anywhere, or several (params and batch_stats of shape x.shape[axis]), in training and
    eval, with gradients, as Flax's."""
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    x = jnp.moveaxis(data((8, 2, 5, 3), 1)[0][0], -1, 1)  # (8, 3, 2, 5)
    native = nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False)
    ours = BatchNorm(axis=axis, momentum=0.9)
    v = native.init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert_trees_close(ours.init(jax.random.PRNGKey(0), x, use_running_average=False), v, rtol=0, atol=0)
    w = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    stats = jax.tree_util.tree_map(lambda a: a * 1.5 + 0.25, v["batch_stats"])

    def run(layer: Any) -> Any:
        def f(params: Any, x: Any) -> Any:
            y, upd = layer.apply({"params": params, "batch_stats": v["batch_stats"]}, x, use_running_average=False,
                                 mutable=["batch_stats"])
            y_eval = layer.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
            return jnp.sum(jnp.sin(y) * w + y_eval * w), (y, upd, y_eval)

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(v["params"], x)

    assert_trees_close(run(ours), run(native), rtol=2e-5, atol=1e-5)


def test_linen_gradient_through_the_running_statistics_update_matches_flax() -> None:
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    x = data((6, 3), 1)[0][0]

    def grad(layer: Any) -> Any:
        v = layer.init(jax.random.PRNGKey(0), x)

        def f(x: Any) -> Any:
            _, upd = layer.apply(v, x, mutable=["batch_stats"])
            return jnp.sum(upd["batch_stats"]["mean"] * 3.0 + upd["batch_stats"]["var"])

        return jax.grad(f)(x)

    kw = {"use_running_average": False, "momentum": 0.9}
    assert_trees_close(grad(BatchNorm(**kw)), grad(nn.BatchNorm(use_fast_variance=False, **kw)))


def test_linen_refusals() -> None:
    flax_linen()
    from multibn.layers.flax import BatchNorm

    x, key = jnp.ones((4, 3)), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"axis must be an int in \[-2, 2\) for an input of rank 2, got 2"):
        BatchNorm(use_running_average=False, axis=2).init(key, x)
    # (axis=(0, 1) on rank-2 input and integer input are Flax's too: test_flax_dropin.py)
    with pytest.raises(ValueError, match=r"axis=\(\) must name at least one feature axis"):
        BatchNorm(use_running_average=False, axis=()).init(key, x)
    with pytest.raises(NotImplementedError, match="axis_index_groups"):
        BatchNorm(use_running_average=False, axis_index_groups=[[0, 1]]).init(key, x)
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNorm(use_running_average=False, momentum=1.5).init(key, x)
    with pytest.raises(TypeError, match="x must have a floating, integer or boolean dtype, got complex64"):
        BatchNorm(use_running_average=False).init(key, jnp.ones((4, 3), jnp.complex64))
    # Flax's rule for the mode: in neither the constructor nor the call, or in both, is an error
    with pytest.raises(ValueError, match="use_running_average"):
        BatchNorm().init(key, x)
    with pytest.raises(ValueError, match="use_running_average"):
        BatchNorm(use_running_average=True).init(key, x, use_running_average=True)


@pytest.mark.parametrize(("convention", "momentum", "torch_momentum"), [("torch", 0.9, 0.1), ("torch_cma", None, None)])
def test_linen_convention_keeps_flax_momentum_meaning(convention: str, momentum: float | None,
                                                      torch_momentum: float | None) -> None:
    """convention="torch", momentum=0.9 (Flax's: weight of the old value) is torch's momentum 0.1, with the
    unbiased running variance; "torch_cma" keeps a counter in batch_stats for its cumulative average. The
    running statistics equal nn.BatchNorm1d's."""
    flax_linen()
    torch = need("torch")
    from multibn.layers.flax import BatchNorm

    native = torch.nn.BatchNorm1d(3, momentum=torch_momentum)
    ours = BatchNorm(use_running_average=False, momentum=momentum, convention=convention)
    batches = data((10, 3), 1, steps=3)
    variables = ours.init(jax.random.PRNGKey(0), batches[0][0])
    step = jax.jit(lambda v, x: ours.apply(v, x, mutable=["batch_stats"]))
    for x, _ in batches:
        y_native = native(torch.tensor(np.asarray(x)))
        y, upd = step(variables, x)
        variables = {**variables, **upd}
        np.testing.assert_allclose(np.asarray(y), y_native.detach().numpy(), rtol=1e-5, atol=2e-6)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), native.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), native.running_var.numpy(), rtol=1e-6)
    assert set(stats) == ({"mean", "var", "num_batches_tracked"} if momentum is None else {"mean", "var"})
    if momentum is None:
        assert int(stats["num_batches_tracked"]) == int(native.num_batches_tracked) == 3


@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_linen_mask_matches_flax(axis: Any) -> None:
    """Masked statistics (a mask broadcast over the features, padded positions): outputs, running statistics
    and gradients as Flax's masked BatchNorm, for one feature axis and for two."""
    nn = flax_linen()
    from multibn.layers.flax import BatchNorm

    x = data((6, 4, 3), 1)[0][0]
    mask = np.random.default_rng(2).uniform(size=(6, 4, 1)) < 0.6
    mask[:2], mask[-1] = True, False  # a padded row; every feature of axis (1, 2) keeps two masked-in elements
    mask = jnp.asarray(mask)
    native = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.9, use_fast_variance=False)
    ours = BatchNorm(use_running_average=False, axis=axis, momentum=0.9)
    variables = native.init(jax.random.PRNGKey(0), x)

    def run(layer: Any) -> Any:
        def f(params: Any, x: Any) -> Any:
            y, upd = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mask=mask,
                                 mutable=["batch_stats"])
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0)), (y, upd)

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(variables["params"], x)

    assert_trees_close(run(ours), run(native), rtol=1e-5, atol=1e-5)


def test_linen_axis_name_under_shard_map_matches_flax(tmp_path: Path) -> None:
    """axis_name on 4 host devices with equal shards (where Flax's mean of per-device moments is exact): the
    outputs, gradients and running statistics of Flax's BatchNorm, and of BN over the whole batch."""
    nn = flax_linen()
    host_devices(4)
    from jax.sharding import PartitionSpec as P

    from multibn.layers.flax import BatchNorm

    try:
        from jax import shard_map
    except ImportError:  # jax < 0.8
        from jax.experimental.shard_map import shard_map
    mesh = jax.make_mesh((4,), ("d",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 3)) * [1, 2, 3] + [0, 1, -2], jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def run(layer: Any, name: str | None) -> Any:
        v = layer.init(jax.random.PRNGKey(0), x)

        def loss(params: Any, x: Any, w: Any) -> Any:
            y, upd = layer.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * w), (y, upd)

        grads = jax.grad(loss, argnums=(0, 1), has_aux=True)  # of replicated params: summed over devices
        if name is None:
            return jax.jit(grads)(v["params"], x, w)
        f = shard_map(grads, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=((P(), P("d")), (P("d"), P())))
        return jax.jit(f)(v["params"], x, w)

    def err(a: Any, b: Any) -> float:
        return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False))

    kw = dict(use_running_average=False, momentum=0.9)
    got = run(BatchNorm(axis_name="d", **kw), "d")
    want = run(nn.BatchNorm(axis_name="d", use_fast_variance=False, **kw), "d")
    whole = run(nn.BatchNorm(use_fast_variance=False, **kw), None)
    errors = [err(got, want), err(got, whole)]
    assert max(errors) < 2e-5, errors


# ==== flax.nnx ========================================================================================================
def nnx_model(bn_cls: Any, **bn_kw: Any) -> Any:
    nnx = flax_nnx()

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.dense1 = nnx.Linear(5, 8, rngs=rngs)
            self.bn1 = bn_cls(8, momentum=0.8, rngs=rngs, **bn_kw)
            self.dense2 = nnx.Linear(8, 6, use_bias=False, rngs=rngs)
            self.bn2 = bn_cls(6, use_scale=False, epsilon=1e-3, rngs=rngs, **bn_kw)
            self.out = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = nnx.relu(self.bn1(self.dense1(x)))
            return self.out(nnx.tanh(self.bn2(self.dense2(x))))

    return Net(nnx.Rngs(0))


def nnx_pair(**bn_kw: Any) -> tuple[Any, Any]:
    nnx = flax_nnx()
    from multibn.layers.nnx import BatchNorm

    return nnx_model(nnx.BatchNorm, use_fast_variance=False, **bn_kw), nnx_model(BatchNorm, **bn_kw)


def nnx_train(model: Any, batches: list) -> list[float]:
    nnx = flax_nnx()

    @nnx.jit
    def step(model: Any, x: Any, t: Any) -> Any:
        def loss(model: Any) -> Any:
            return jnp.mean((model(x) - t) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads))
        return value

    model.train()
    return [float(step(model, x, t)) for x, t in batches]


def test_nnx_swap_inits_trains_and_evaluates_as_flax() -> None:
    nnx = flax_nnx()
    native, ours = nnx_pair()
    assert_trees_close(nnx.state(ours), nnx.state(native), rtol=0, atol=0)
    batches = data((16, 5), 2)
    np.testing.assert_allclose(nnx_train(ours, batches), nnx_train(native, batches), rtol=1e-5)
    assert_trees_close(nnx.state(ours), nnx.state(native))
    ours.eval()
    native.eval()
    assert ours.bn1.use_running_average and ours.bn2.use_running_average
    x = batches[-1][0] * 1.5 + 0.3
    before = nnx.state(ours, nnx.BatchStat)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(native(x)), rtol=1e-5, atol=1e-5)
    assert_trees_close(nnx.state(ours, nnx.BatchStat), before, rtol=0, atol=0)  # eval leaves them
    # the call argument takes precedence over the attribute, as in Flax
    h = data((16, 8), 1)[0][0]
    np.testing.assert_allclose(np.asarray(ours.bn1(h, use_running_average=False)),
                               np.asarray(native.bn1(h, use_running_average=False)), rtol=1e-5, atol=2e-6)
    assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(native, nnx.BatchStat))


def test_nnx_bfloat16_params_and_refusals() -> None:
    nnx = flax_nnx()
    from multibn.layers.nnx import BatchNorm

    kw = {"param_dtype": jnp.bfloat16, "momentum": 0.9, "rngs": nnx.Rngs(0)}
    native, ours = nnx.BatchNorm(3, use_fast_variance=False, **kw), BatchNorm(3, **kw)
    assert_trees_close(nnx.state(ours), nnx.state(native), rtol=0, atol=0)
    assert ours.mean.value.dtype == jnp.float32 and ours.scale.value.dtype == jnp.bfloat16
    for x, _ in data((32, 3), 1, steps=3):
        x = x.astype(jnp.bfloat16)
        y_native, y_ours = native(x), ours(x)
        assert y_ours.dtype == y_native.dtype
        np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_native, np.float32), rtol=1e-5,
                                   atol=2e-5)
    assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(native, nnx.BatchStat), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="axis_index_groups"):
        BatchNorm(3, axis_index_groups=[[0, 1]], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchNorm(0, rngs=nnx.Rngs(0))


def test_nnx_torch_cma_counts_batches_as_torch() -> None:
    nnx = flax_nnx()
    torch = need("torch")
    from multibn.layers.nnx import BatchNorm

    native, ours = torch.nn.BatchNorm1d(3, momentum=None), BatchNorm(3, convention="torch_cma", rngs=nnx.Rngs(0))
    for x, _ in data((10, 3), 1, steps=3):
        np.testing.assert_allclose(np.asarray(ours(x)), native(torch.tensor(np.asarray(x))).detach().numpy(),
                                   rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(ours.mean.value), native.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var.value), native.running_var.numpy(), rtol=1e-6)
    assert int(ours.num_batches_tracked.value) == int(native.num_batches_tracked) == 3


def test_nnx_mask_matches_flax() -> None:
    nnx = flax_nnx()
    from multibn.layers.nnx import BatchNorm

    x = data((6, 4, 3), 1)[0][0]
    mask = jnp.asarray(np.random.default_rng(2).uniform(size=(6, 4, 1)) < 0.6)
    native = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ours(x, mask=mask)), np.asarray(native(x, mask=mask)), rtol=1e-5,
                               atol=2e-6)
    assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(native, nnx.BatchStat))


# ==== multibn.layers.jax (no Flax needed but for the comparison) ======================================================
def test_jax_layer_bfloat16_params_keep_running_statistics_moving() -> None:
    """1000 steps on data of mean 3 with bfloat16 params: float32 running statistics reach 3, as Flax's do (in
    bfloat16 they stall at 2.4, where 0.01 * (3 - R) falls below half an ulp of R)."""
    from multibn.layers.jax import BatchNorm

    bn = BatchNorm(2)
    params, state = bn.init("bfloat16")
    assert params["scale"].dtype == jnp.bfloat16
    assert state.running_mean.dtype == state.running_var.dtype == jnp.float32
    xs = (jax.random.normal(jax.random.PRNGKey(0), (1000, 64, 2)) * 0.5 + 3.0).astype(jnp.bfloat16)

    def body(state: Any, x: Any) -> tuple[Any, None]:
        return bn.apply(params, state, x, training=True)[1], None

    state = jax.jit(lambda s: jax.lax.scan(body, s, xs)[0])(state)
    np.testing.assert_allclose(np.asarray(state.running_mean), 3.0, atol=0.02)
    np.testing.assert_allclose(np.asarray(state.running_var), 0.25, atol=0.02)
    try:
        nn = flax_linen()
    except pytest.skip.Exception:
        return
    native = nn.BatchNorm(use_running_average=False, param_dtype=jnp.bfloat16, use_fast_variance=False)
    stats = native.init(jax.random.PRNGKey(0), xs[0])["batch_stats"]

    def native_body(stats: Any, x: Any) -> tuple[Any, None]:
        v = {"params": {"scale": params["scale"], "bias": params["bias"]}, "batch_stats": stats}
        return native.apply(v, x, mutable=["batch_stats"])[1]["batch_stats"], None

    stats = jax.jit(lambda s: jax.lax.scan(native_body, s, xs)[0])(stats)
    np.testing.assert_allclose(np.asarray(state.running_mean), np.asarray(stats["mean"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.running_var), np.asarray(stats["var"]), rtol=1e-4)


def test_jax_layer_refuses_parameter_trees_it_does_not_recognise() -> None:
    from multibn.layers.jax import BatchNorm

    bn = BatchNorm(3)
    params, state = bn.init()
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"keys \['bias', 'scale'\].*got keys \['beta', 'gamma'\]"):
        bn.apply({"gamma": params["scale"], "beta": params["bias"]}, state, x, training=True)
    with pytest.raises(ValueError, match=r"got keys \['params'\] \(pass variables\['params'\]"):
        bn.apply({"params": params}, state, x, training=True)
    with pytest.raises(ValueError, match=r"got keys \['scale'\]"):
        bn.apply({"scale": params["scale"]}, state, x, training=True)
    with pytest.raises(ValueError, match=r"exactly the keys \[\] \(affine=False\), got keys \['bias', 'scale'\]"):
        BatchNorm(3, affine=False).apply(params, state, x, training=True)
    with pytest.raises(TypeError, match="params must be a dict"):
        bn.apply([params["scale"], params["bias"]], state, x, training=True)


# ==== multibn.layers.jax: pure init/apply under jit and grad, against flax.linen, the textbook LeNet =================
def test_jax_layer_pure_init_apply_under_jit_and_grad() -> None:
    jax = need("jax")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    bn = BatchNorm(3)
    params, state = bn.init()
    assert params["scale"].shape == params["bias"].shape == state.running_mean.shape == (3,)
    x = jnp.asarray(batches((4, 3, 2, 2), 1)[0][0]).transpose(0, 2, 3, 1)  # channels last, as Flax
    step = jax.jit(bn.apply, static_argnames="training")
    y, new = step(params, state, x, training=True)
    y_ref, new_ref = multibn.batch_norm(x, params["scale"], params["bias"], state, convention="flax")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    for a, b in zip(new, new_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(new.num_batches_tracked) == 1 and int(state.num_batches_tracked) == 0  # pure

    def loss(params: Any, state: Any, x: Any) -> Any:
        y, new = bn.apply(params, state, x, training=True)
        return jnp.sum(y ** 3), new

    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, x)
    assert set(grads) == {"scale", "bias"} and all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
    y_eval, same = step(params, new, x, training=False)
    assert same is not None and np.isfinite(np.asarray(y_eval)).all()
    plain = BatchNorm(3, affine=False, axis=1, convention="torch")
    p0, s0 = plain.init()
    assert p0 == {}
    assert plain.apply(p0, s0, x.transpose(0, 3, 1, 2), training=True)[0].shape == (4, 3, 2, 2)


def test_jax_layer_matches_flax_linen() -> None:
    jax = need("jax")
    flax_nn = need("flax.linen")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    shape = (6, 2, 2, 3)
    native = flax_nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, use_fast_variance=False)
    variables = native.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    rng = np.random.default_rng(1)
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
                 "batch_stats": variables["batch_stats"]}
    bn = BatchNorm(3)
    params, state = bn.from_flax(variables)

    def native_loss(params: Any, stats: Any, x: Any, t: Any) -> Any:
        y, upd = native.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.mean((y - t) ** 2), upd["batch_stats"]

    def our_loss(params: Any, state: Any, x: Any, t: Any) -> Any:
        y, new = bn.apply(params, state, x, training=True)
        return jnp.mean((y - t) ** 2), new

    native_params, stats = variables["params"], variables["batch_stats"]
    for x, t in batches((6, 3, 2, 2)):
        x, t = jnp.asarray(x).transpose(0, 2, 3, 1), jnp.asarray(t).transpose(0, 2, 3, 1)
        g, stats = jax.grad(native_loss, has_aux=True)(native_params, stats, x, t)
        native_params = jax.tree_util.tree_map(lambda p, g: p - PARITY_LR * g, native_params, g)
        g, state = jax.grad(our_loss, has_aux=True)(params, state, x, t)
        params = jax.tree_util.tree_map(lambda p, g: p - PARITY_LR * g, params, g)
    got = BatchNorm.to_flax(params, state)
    want = {"params": native_params, "batch_stats": stats}
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(state.num_batches_tracked) == PARITY_STEPS


def test_lenet_jax() -> None:
    jax = need("jax")
    jnp = jax.numpy
    from multibn.layers.jax import BatchNorm

    conv_dims = ("NCHW", "OIHW", "NCHW")
    bns = [BatchNorm(6, axis=1), BatchNorm(16, axis=1), BatchNorm(120), BatchNorm(84)]
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> Any:
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[1:])), jnp.float32)

    def dense(n_in: int, n_out: int) -> dict[str, Any]:
        return {"w": weights(n_out, n_in).T, "b": jnp.zeros(n_out)}

    params = {
        "conv1": {"w": weights(6, 1, 5, 5), "b": jnp.zeros(6)},
        "conv2": {"w": weights(16, 6, 5, 5), "b": jnp.zeros(16)},
        "fc1": dense(256, 120), "fc2": dense(120, 84), "fc3": dense(84, 10),
    }
    bn_params, states = zip(*(bn.init() for bn in bns), strict=True)
    params["bn"] = list(bn_params)

    def pool(x: Any) -> Any:
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4

    def net(params: Any, states: Any, x: Any, training: bool) -> tuple[Any, list]:
        new = []

        def bn(i: int, h: Any) -> Any:
            h, s = bns[i].apply(params["bn"][i], states[i], h, training=training)
            new.append(s)
            return jax.nn.sigmoid(h)

        for i, name in enumerate(("conv1", "conv2")):
            h = jax.lax.conv_general_dilated(x, params[name]["w"], (1, 1), "VALID", dimension_numbers=conv_dims)
            x = pool(bn(i, h + params[name]["b"].reshape(1, -1, 1, 1)))
        x = x.reshape(x.shape[0], -1)
        x = bn(2, x @ params["fc1"]["w"] + params["fc1"]["b"])
        x = bn(3, x @ params["fc2"]["w"] + params["fc2"]["b"])
        return x @ params["fc3"]["w"] + params["fc3"]["b"], new

    def loss(params: Any, states: Any, x: Any, y: Any) -> tuple[Any, list]:
        logits, new = net(params, states, x, True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)), new

    @jax.jit
    def step(params: Any, states: Any, x: Any, y: Any) -> tuple[Any, Any, list]:
        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params, states, x, y)
        return value, jax.tree_util.tree_map(lambda p, g: p - 0.9 * g, params, grads), new

    value, new_params, new_states = step(params, list(states), jnp.asarray(LENET_X), jnp.asarray(LENET_Y))
    assert np.isfinite(float(value))
    assert not np.array_equal(np.asarray(new_params["bn"][0]["scale"]), np.asarray(params["bn"][0]["scale"]))
    assert all(int(s.num_batches_tracked) == 1 for s in new_states)
    assert not np.array_equal(np.asarray(new_states[2].running_var), np.ones(120))
    logits, _ = jax.jit(net, static_argnums=3)(new_params, new_states, jnp.asarray(LENET_X), False)
    assert logits.shape == (8, 10)
