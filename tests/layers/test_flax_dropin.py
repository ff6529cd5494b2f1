"""multibn.layers.flax.BatchNorm where flax.linen.BatchNorm takes what multibn's refused (issue 21, item 8):
integer and boolean input (Flax's dtype promotion), rank-1 input and feature axes that are all of the input's; and
the one dtype choice that differs on purpose, pinned: under x64, float64 input leaves multibn's batch_stats in the
dtype they were made in (float32), where Flax's become float64 after the first update."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.helpers import jax_float64, need

jax = need("jax")
jnp = jax.numpy


def linen() -> Any:
    return need("flax.linen", why="flax is not installed in this environment")


def run_both(kw: dict, xs: list[Any], **native_kw: Any) -> list[tuple[Any, Any]]:
    """Init on xs[0], then a training step per input and an eval call, with Flax's layer and multibn's: the
    outputs and variables of each, side by side."""
    nn = linen()
    from multibn.layers.flax import BatchNorm

    pairs = []
    models = (nn.BatchNorm(use_fast_variance=False, **kw, **native_kw), BatchNorm(**kw))
    variables = [m.init(jax.random.PRNGKey(0), xs[0], use_running_average=False) for m in models]
    pairs.append(tuple(variables))
    for x in xs:
        outs = [m.apply(v, x, use_running_average=False, mutable=["batch_stats"]) for m, v in
                zip(models, variables, strict=True)]
        variables = [{**v, **upd} for v, (_, upd) in zip(variables, outs, strict=True)]
        pairs.append(tuple(y for y, _ in outs))
        pairs.append(tuple(variables))
    pairs.append(tuple(m.apply(v, xs[-1], use_running_average=True) for m, v in zip(models, variables, strict=True)))
    return pairs


def assert_pairs_equal(pairs: list[tuple[Any, Any]], rtol: float = 2e-6, atol: float = 2e-6) -> None:
    for native, ours in pairs:
        assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(native)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(native), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool"])
@pytest.mark.parametrize("affine", [True, False])
def test_integer_and_boolean_input_as_flax(dtype: str, affine: bool) -> None:
    """Cast to promote_types(dtype, float32) for the statistics; y in result_type(x, scale, bias), promoted to
    float32 when that is not floating (no scale or bias), as flax.linen.BatchNorm."""
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.integers(0, 2 if dtype == "bool" else 50, size=(8, 3)).astype(dtype)) for _ in range(3)]
    kw = {"momentum": 0.9, "use_scale": affine, "use_bias": affine}
    pairs = run_both(kw, xs)
    assert pairs[1][1].dtype == jnp.float32
    assert_pairs_equal(pairs)


def test_integer_input_nnx_as_flax() -> None:
    nnx = need("flax.nnx", why="flax is not installed in this environment")
    from multibn.layers.nnx import BatchNorm

    native = nnx.BatchNorm(3, use_fast_variance=False, momentum=0.9, rngs=nnx.Rngs(0))
    ours = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    x = jnp.arange(24, dtype=jnp.int32).reshape(8, 3) % 7
    y_native, y_ours = native(x), ours(x)
    assert y_ours.dtype == y_native.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_native), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean.value), np.asarray(native.mean.value), rtol=1e-6)


@pytest.mark.parametrize(("shape", "axis"), [((5,), -1), ((5,), 0), ((4, 3), (0, 1)), ((2, 3, 2), (0, 1, 2))],
                         ids=str)
def test_feature_axes_that_are_all_the_inputs_as_flax(shape: tuple[int, ...], axis: Any) -> None:
    """Rank-1 input with axis=-1 (or every axis a feature axis): one element per feature, a batch of one: y is
    bias, the running mean moves towards x and the variance towards 0, as in Flax."""
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.normal(size=shape).astype(np.float32) * 2 + 1) for _ in range(3)]
    pairs = run_both({"momentum": 0.9, "axis": axis, "bias_init": jax.nn.initializers.ones}, xs)
    assert_pairs_equal(pairs[0::2])  # the variables after init and each step
    # y = x * scale + shift with scale = 1 / sqrt(0 + eps): bias up to the rounding of |x * scale| (the README's
    # error model of the fused form; Flax's centred form gives bias exactly)
    bound = max(float(jnp.abs(x).max()) for x in xs) / np.sqrt(1e-5) * 2.0**-23
    assert_pairs_equal(pairs[1::2], atol=bound)
    # integer rank-1 input too, under jax.jit
    nn = linen()
    from multibn.layers.flax import BatchNorm

    x = jnp.arange(4)
    for model in (nn.BatchNorm(use_running_average=False), BatchNorm(use_running_average=False)):
        v = model.init(jax.random.PRNGKey(0), x)
        y, upd = jax.jit(lambda v, x, m=model: m.apply(v, x, mutable=["batch_stats"]))(v, x)
        assert y.dtype == jnp.float32 and y.shape == (4,)
        np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), np.arange(4) * 0.01, rtol=1e-6)


def test_x64_float64_input_keeps_float32_batch_stats() -> None:
    """The choice, pinned: multibn keeps batch_stats in the dtype init made them (float32, as Flax's own init
    does), computing the update in float64 and rounding it once; Flax's become float64 after one update, so the
    state's dtypes change between steps (a jitted step retraces, a lax.scan/fori_loop carry is refused). y is
    float64 and equal; the statistics equal Flax's rounded to float32. Float64 statistics are had by asking:
    param_dtype=float64 with force_float32_reductions=False, as in Flax."""
    linen()
    from multibn.layers.flax import BatchNorm

    with jax_float64():
        rng = np.random.default_rng(2)
        xs = [jnp.asarray(rng.normal(size=(16, 3)) * 3 + 100) for _ in range(3)]
        assert xs[0].dtype == jnp.float64
        pairs = run_both({"momentum": 0.9}, xs)
        for native, ours in pairs[2::2][:-1]:  # the variables after each step
            assert native["batch_stats"]["mean"].dtype == jnp.float64  # Flax's: promoted by the update
            assert ours["batch_stats"]["mean"].dtype == ours["batch_stats"]["var"].dtype == jnp.float32
            for key in ("mean", "var"):
                np.testing.assert_allclose(np.asarray(ours["batch_stats"][key]),
                                           np.asarray(native["batch_stats"][key]).astype(np.float32), rtol=1e-6)
        for native, ours in pairs[1::2]:  # the outputs
            assert ours.dtype == native.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(ours), np.asarray(native), rtol=1e-5, atol=1e-5)
        # the state's structure is stable: scanning training steps works
        model = BatchNorm(use_running_average=False, momentum=0.9)
        v = model.init(jax.random.PRNGKey(0), xs[0])

        def step(stats: Any, x: Any) -> tuple[Any, Any]:
            y, upd = model.apply({**v, "batch_stats": stats}, x, mutable=["batch_stats"])
            return upd["batch_stats"], y.sum()

        stats, _ = jax.lax.scan(step, v["batch_stats"], jnp.stack(xs))
        np.testing.assert_allclose(np.asarray(stats["mean"]),
                                   np.asarray(pairs[-2][0]["batch_stats"]["mean"]).astype(np.float32), rtol=1e-6)
        # float64 statistics when asked for, as Flax
        asked = run_both({"momentum": 0.9, "param_dtype": jnp.float64, "force_float32_reductions": False}, xs)
        assert asked[-2][1]["batch_stats"]["mean"].dtype == jnp.float64
        assert_pairs_equal(asked, rtol=1e-12, atol=1e-10)
