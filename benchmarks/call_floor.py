"""The per-call floor of the torch training forward on a tiny tensor, where the arithmetic is nothing: multibn's train
rule run eagerly (its ~35 per-channel aten ops), the same Python compiled by inductor (``torch.compile``, dynamic and
static shapes), a trivial compiled function of three ops, and ``F.batch_norm`` (one aten op). It shows what compiling
the rule can and cannot remove: the eager ops go, but every call of a compiled callable still pays dynamo's guard
evaluation and its pre-graph bytecode. One thread; medians of 400 calls after 20 (and the compiles) untimed.
Run: .venvs/full/bin/python benchmarks/call_floor.py"""
import statistics
import time

import torch
import torch.nn.functional as F

from multibn.algorithm import Norm, train_rule
from multibn.backends import get_backend

torch.set_num_threads(1)
rule = train_rule(get_backend("torch"), Norm(1e-5, False, True), 1)


def forward(x, g, b):
    return rule.forward(None, x, g, b)


def trivial(x, g, b):
    return x * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), x.sum((0, 2, 3)), x.sum((0, 2, 3))


def median_us(f, n=400):
    for _ in range(20):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


x, g, b = torch.randn(8, 16, 2, 2), torch.ones(16), torch.zeros(16)
calls = {
    "multibn train rule, eager": lambda: forward(x, g, b),
    "the same, torch.compile(dynamic=True)": (lambda f: lambda: f(x, g, b))(torch.compile(forward, dynamic=True)),
    "the same, torch.compile(dynamic=False)": (lambda f: lambda: f(x, g, b))(torch.compile(forward, dynamic=False)),
    "trivial 3-op function, torch.compile(dynamic=True)": (lambda f: lambda: f(x, g, b))(
        torch.compile(trivial, dynamic=True)),
    "F.batch_norm(training=True)": lambda: F.batch_norm(x, None, None, g, b, True),
}
with torch.no_grad():
    for name, call in calls.items():
        print(f"{name:52s} {median_us(call):7.1f} us per call")
