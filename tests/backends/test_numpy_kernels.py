"""The NumPy adapter's fast kernels on the layouts that choose their code paths, against float64 references.

Rows of Q of at least ``_LONG`` elements take per-channel operands broadcast along the row and are summed by einsum
in runs (with and without a ragged tail); shorter rows get the operands expanded along Q; channels last (Q == 1) is
summed in blocks of rows; a small ``_CHUNK`` cuts tiles along C. Data far from zero (mean 1000, std 3) so that a
sum not taken about the centre, or taken with an error growing with the count, shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from multibn import algorithm as alg
from multibn.backends import get_backend
from multibn.backends import numpy as npb

#: (shape, channel axis): Q = 1031 (runs of 256 and a tail), Q = 1100 (runs of 220), Q = 600 (runs of 200, expanded
#: operands), Q = 35, channels last with P = 150 (two whole blocks of 64 rows and a ragged one)
LAYOUTS = [((3, 4, 1031), 1), ((2, 3, 1100), 1), ((2, 3, 600), 1), ((9, 4, 5, 7), 1), ((150, 5), 1), ((3, 50, 6), 2)]


@pytest.fixture(params=[None, 1500], ids=["chunk-default", "chunk-1500"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param is not None:
        monkeypatch.setattr(npb, "_CHUNK", request.param)


def _ref(shape: tuple[int, ...], axis: int, dtype: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sdt = "float64" if dtype == "float64" else "float32"
    c = shape[axis]
    bshape = tuple(c if i == axis else 1 for i in range(len(shape)))
    axes = tuple(i for i in range(len(shape)) if i != axis)
    x = (rng.standard_normal(shape) * 3 + 1000).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    m = (x.astype(np.float64).mean(axis=axes) + rng.standard_normal(c) * 0.1).astype(sdt).reshape(bshape)
    a, b, cc = (rng.standard_normal(bshape).astype(sdt) for _ in range(3))
    return {"x": x, "dy": dy, "m": m, "a": a, "b": b, "c": cc, "axes": axes, "sdt": np.dtype(sdt)}


def _close_sum(got: np.ndarray, terms: np.ndarray, axes: tuple[int, ...], sdt: np.dtype) -> None:
    """A sum in the stats dtype within 1e-5 (float32) or 1e-13 (float64) of sum |terms| of the float64 sum."""
    assert got.dtype == sdt
    ref, mag = terms.sum(axis=axes), np.abs(terms).sum(axis=axes)
    tol = 1e-5 if sdt == np.float32 else 1e-13
    np.testing.assert_array_less(np.abs(got.astype(np.float64).ravel() - ref.ravel()), tol * mag.ravel() + 1e-30)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=[f"{s}-axis{a}" for s, a in LAYOUTS])
def test_kernels_match_float64(chunk: None, shape: tuple, axis: int, dtype: str) -> None:
    be = get_backend("numpy")
    d = _ref(shape, axis, dtype, seed=sum(shape))
    x, dy, m, a, b, c, axes, sdt = (d[k] for k in ("x", "dy", "m", "a", "b", "c", "axes", "sdt"))
    x64, dy64, m64 = x.astype(np.float64), dy.astype(np.float64), m.astype(np.float64)
    _close_sum(be.channel_sum(x, axes, sdt), x64, axes, sdt)
    s1, s2 = be.channel_dev_sums(x, m, axes)
    _close_sum(s1, x64 - m64, axes, sdt)
    _close_sum(s2, (x64 - m64) ** 2, axes, sdt)
    t1, t2 = be.backward_sums(dy, x, m, axes)
    _close_sum(t1, dy64, axes, sdt)
    _close_sum(t2, dy64 * (x64 - m64), axes, sdt)
    eps = float(np.finfo(dtype).eps)
    for got, ref in ((be.scale_shift(x, a, c), x64 * a + c),
                     (be.backward_apply(dy, x, m, a, b, c), a * dy64 + b * (x64 - m64) + c)):
        assert got.dtype == x.dtype and got.shape == x.shape
        # one rounding to x's dtype, plus the stats dtype's on terms of size |a dy| + |b (x - m)| + |c|
        bound = np.abs(ref) * eps + 8 * float(np.finfo(sdt).eps) * (np.abs(ref) + np.abs(b * (x64 - m64)) + 1)
        np.testing.assert_array_less(np.abs(got.astype(np.float64) - ref), bound + 1e-30)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=[f"{s}-axis{a}" for s, a in LAYOUTS])
def test_constant_channel_exact(chunk: None, shape: tuple, axis: int) -> None:
    """S = Q = 0 exactly about the channel's own value, so M2 = 0 and the mean is the value. Each channel is
    constant at one of the values, in turn (every layout has at least 3 channels: each value in every layout)."""
    be = get_backend("numpy")
    c = shape[axis]
    values = np.resize(np.asarray([0.1, -7.77, 123456.7], np.float32), c)
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = np.broadcast_to(values.reshape(bshape), shape).copy()
    st = alg.batch_stats(be, x, alg.Layout.of(shape, axis))
    assert np.all(st.m2 == 0) and np.array_equal(st.mean.reshape(-1), values)


@pytest.mark.parametrize("unbiased", [True, False])
def test_statistics_stay_in_float32_for_counts_over_65535(unbiased: bool) -> None:
    """float32 statistics of float32 input whatever the count: NumPy 1.x divides a float32 array by an int over
    65535 in float64 (value-based casting), which ran every later full-size pass in float64 at twice the cost."""
    from multibn.conventions import resolve_convention
    from multibn.state import BNState

    be = get_backend("numpy")
    x = np.random.default_rng(0).standard_normal((70_000, 3)).astype(np.float32)
    conv = resolve_convention("torch" if unbiased else "gluon", None, None)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, mean, m2 = alg.train_forward(be, alg.Norm.of(conv), 1, None, x, g, b)
    assert (y.dtype, mean.dtype, m2.dtype) == (np.float32,) * 3
    state = BNState(np.zeros(3, np.float32), np.ones(3, np.float32), np.asarray(0))
    var = (m2 / np.float32(x.shape[0] - unbiased)).astype(np.float32)
    new = alg.update_state(be, conv, state, alg.Stats(x.shape[0], mean, m2))
    keep, take = conv.update_weights()
    np.testing.assert_array_equal(new.running_var, (np.float32(keep) * 1 + np.float32(take) * var).astype(np.float32))
