"""Write the README's porting example into the current directory: ``stem-symbol.json``, ``stem-0003.params``
(an ``mx.mod.Module`` checkpoint of a conv-BN-ReLU-conv-BN stem, trained 3 epochs with weight decay) and
``map.json`` (the names of the matching ``torch.nn.Sequential``).

Run with the full environment (MXNet 1.9 beside NumPy 1.26):
``.venvs/full/bin/python docs/examples/stem_checkpoint.py``.
"""

from __future__ import annotations

import json

import numpy as np

np.bool = np.bool_  # type: ignore[attr-defined]  # MXNet 1.9 uses the alias NumPy 1.24 removed
import mxnet as mx  # noqa: E402


def main() -> None:
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    data = mx.sym.var("data")
    net = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv0")
    net = mx.sym.BatchNorm(net, name="bn0")  # sym.BatchNorm's defaults: fix_gamma=True, eps 1e-3
    net = mx.sym.Activation(net, act_type="relu")
    net = mx.sym.Convolution(net, num_filter=8, kernel=(1, 1), name="conv1")
    net = mx.sym.BatchNorm(net, name="bn1", fix_gamma=False)
    loss = mx.sym.LinearRegressionOutput(mx.sym.mean(net, axis=(1, 2, 3)), name="out")
    x = rng.normal(1.0, 2.0, size=(64, 3, 8, 8)).astype("float32")
    y = rng.normal(size=(64,)).astype("float32")
    it = mx.io.NDArrayIter(x, y, batch_size=16, label_name="out_label")
    mod = mx.mod.Module(loss, label_names=["out_label"])
    mod.fit(it, num_epoch=3, optimizer="sgd", optimizer_params={"learning_rate": 0.05, "wd": 0.01})
    mod.save_checkpoint("stem", 3)  # stem-symbol.json, stem-0003.params
    mapping = {"arg:conv0_weight": "0.weight", "arg:conv0_bias": "0.bias", "bn0_": "1",
               "arg:conv1_weight": "3.weight", "arg:conv1_bias": "3.bias", "bn1_": {"to": "4", "fix_gamma": False}}
    with open("map.json", "w") as f:
        json.dump(mapping, f, indent=1)
    print("wrote stem-symbol.json, stem-0003.params, map.json")


if __name__ == "__main__":
    main()
