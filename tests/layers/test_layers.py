"""The multibn.layers package: each framework's module imports on its own (that importing the package imports no
framework is tests/test_imports.py).

Each layer against its framework's own BN is in this directory's file of that framework (test_torch, test_gluon,
test_flax for Flax and multibn.layers.jax): parity runs (a native layer and the multibn layer start from the same
values, take five SGD steps on the same batches, and end with the same parameters, running statistics and
num_batches_tracked), state dicts and parameter files both ways, rank checks, the textbook LeNet with BN.
"""

from __future__ import annotations

import importlib

import pytest

from tests.helpers import need


@pytest.mark.parametrize("module", ["torch", "jax"])
def test_layer_modules_import(module: str) -> None:
    need(module)
    layer = importlib.import_module(f"multibn.layers.{module}").BatchNorm
    assert "BatchNorm" in repr(layer(3))
