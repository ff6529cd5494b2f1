"""``multibn port`` on a model with a batch-renormalisation layer: its inference statistics go like any BN
layer's; what renorm tracks besides is carried where the format has a place for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multibn.checkpoints import read_checkpoint
from multibn.cli import main
from tests.helpers import need


def to_numpy(a: object) -> np.ndarray:
    return a.asnumpy() if hasattr(a, "asnumpy") else np.asarray(a.detach() if hasattr(a, "detach") else a)

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("fmt", ["torch", "gluon", "flax"])
def test_port_carries_a_renorm_layers_inference_statistics(fmt: str, tmp_path: Path) -> None:
    torch = need("torch")
    if fmt == "gluon":
        need("multibn.backends.mxnet", "the gluon format")
    if fmt == "flax":
        need("flax", "the flax format")
    from multibn.layers.torch import BatchNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNorm(4, renorm=True, renorm_clipping={"rmax": 2.0}))
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 3 + 1)
    src, dst = tmp_path / "model.pt", tmp_path / f"model.{fmt}"
    torch.save(model.state_dict(), src)
    assert main(["port", str(src), "--from", "torch", "--to", fmt, "--out", str(dst)]) == 0
    (layer,) = read_checkpoint(dst, fmt).layers.values()
    bn = model[1]
    np.testing.assert_allclose(to_numpy(layer.running_mean), bn.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.running_var), bn.running_var.numpy(), rtol=1e-6)
    assert not np.allclose(bn.running_var.numpy(), 1.0)  # the statistics moved: the test sees a real value
