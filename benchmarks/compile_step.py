"""Compiled training step: a small conv net with multibn's BatchNorm vs the same net with nn.BatchNorm2d, both
torch.compile(fullgraph=True) (inductor), CPU. Steps alternate; prints medians and the median of per-pair ratios.
Run: .venvs/full/bin/python benchmarks/compile_step.py"""
import copy
import statistics
import time

import torch
from torch import nn

from multibn.layers.torch import convert_batchnorm

torch.manual_seed(0)
native = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
)
ours = convert_batchnorm(copy.deepcopy(native))
x, t = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def stepper(model):
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), t).backward()
        opt.step()
    return step


steps = {"nn.BatchNorm2d": stepper(native), "multibn": stepper(ours)}
for s in steps.values():
    for _ in range(3):
        s()  # compile and warm up
times = {k: [] for k in steps}
for _ in range(30):
    for k, s in steps.items():
        t0 = time.perf_counter()
        s()
        times[k].append(time.perf_counter() - t0)
ratios = [a / b for a, b in zip(times["multibn"], times["nn.BatchNorm2d"], strict=True)]
for k, v in times.items():
    print(f"{k:15s} median {statistics.median(v) * 1e3:.2f} ms")
print(f"ratio multibn / native: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
