import numpy as np

import multibn
from tests.helpers import to_numpy


def test_tv1_torch_every_backend(backend: str) -> None:
    x = np.array([[1, 10], [3, 14]], np.float32)
    state = multibn.init_state(2, backend=backend)
    y, new = multibn.batch_norm(x, [2.0, 0.5], [0.0, 1.0], state, backend=backend)
    np.testing.assert_allclose(to_numpy(y), [[-1.99999000007, 0.500000624999], [1.99999000007, 1.499999375001]],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_mean), [0.2, 1.2], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(new.running_var), [1.1, 1.7], rtol=1e-6)
    assert int(to_numpy(new.num_batches_tracked).reshape(-1)[0]) == 1
