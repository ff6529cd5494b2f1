"""Non-finite input in training follows ``torch.nn.functional.batch_norm`` (issue 21, item 8): an ``inf`` gives a
running mean of inf (not NaN), whichever element holds it, on every backend; finite results are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import multibn
from tests.helpers import arr, need, to_numpy

INF, NAN = np.inf, np.nan
CASES = {
    "inf inside": [1.0, INF, 2.0, 3.0],
    "inf first": [INF, 1.0, 2.0, 3.0],  # the corrected two-pass centre is the first element: inf
    "two infs": [INF, INF, 2.0, 3.0],
    "minus inf first": [-INF, 1.0, 2.0, 3.0],
    "both infs": [-INF, INF, 1.0, 2.0],
    "nan": [NAN, 1.0, 2.0, 3.0],
}


def _native(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    torch = need("torch")
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    y = torch.nn.functional.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=0.1, eps=1e-5)
    return y.numpy(), rm.numpy(), rv.numpy()


@pytest.mark.parametrize("case", CASES)
def test_non_finite_training_input_gives_the_native_running_statistics(backend: str, case: str) -> None:
    # channel 0 holds the case, channel 1 finite data: channels stay independent
    x = np.stack([np.array(CASES[case]), np.array([0.5, -1.0, 2.0, 4.0])], axis=1).astype(np.float32)
    y0, rm0, rv0 = _native(x)
    with np.errstate(all="ignore"):
        y, st = multibn.batch_norm(arr(backend, x), None, None, multibn.init_state(2, backend=backend))
    np.testing.assert_array_equal(to_numpy(st.running_mean), rm0)
    np.testing.assert_array_equal(np.isnan(to_numpy(st.running_var)), np.isnan(rv0))
    np.testing.assert_array_equal(np.isnan(to_numpy(y)), np.isnan(y0))
    np.testing.assert_allclose(to_numpy(st.running_var)[1], rv0[1], rtol=1e-6)


def test_non_finite_input_under_a_mask_gives_the_native_running_mean_of_the_kept_rows() -> None:
    x = np.array([[INF, 1.0], [1.0, 2.0], [2.0, 3.0], [1e9, 4.0]], np.float32)
    mask = np.array([True, True, True, False])[:, None]
    _, rm0, _ = _native(x[:3])
    with np.errstate(all="ignore"):
        _, st = multibn.batch_norm(x, state=multibn.init_state(2), mask=mask)
    np.testing.assert_array_equal(st.running_mean, rm0)
