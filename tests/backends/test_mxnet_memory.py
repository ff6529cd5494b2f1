"""Peak memory of MXNet forward+backward passes, in activations (bytes of x): multibn's functional op and Gluon
layer against bounds just above what native ``mx.nd.BatchNorm``/``gluon.nn.BatchNorm`` need (about 1: y).

Each measurement runs in a fresh subprocess with glibc returning freed blocks to the system at once (as
``multibn bench --passes mem``): the peak of one pass (VmHWM, reset before it) above the RSS before it, after
warm-up passes, median of 3. The bounds sit between the measured peak and the peak before the fix they guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import need

pytestmark = pytest.mark.mxnet  # run in the full environment only (see conftest.same_in_current)

mxnet_adapter = need("multibn.backends.mxnet", "MXNet 1.9")

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import gc, json, sys
from multibn.cli.bench import memory, runners
from multibn.cli.bench.cases import Case
kind, spec = sys.argv[1], sys.argv[2]
case = Case.parse(spec)
mx = runners.import_mxnet()
if kind == "layer":
    run = runners.gluon_layer_impls(case, ["multibn"], mx.cpu())["multibn"]
else:
    run = runners.mxnet_impls(case, "fwd+bwd", ["multibn"], "cpu")["multibn"]
if not memory.reset_peak_rss():
    print(json.dumps({"skip": "/proc/self/clear_refs is not writable"}))
    sys.exit(0)
run(); run()
peaks = []
for _ in range(3):
    gc.collect()
    memory.reset_peak_rss()
    base = memory.proc_status("VmRSS")
    run()
    peaks.append(memory.proc_status("VmHWM") - base)
print(json.dumps({"activations": sorted(peaks)[1] / case.nbytes}))
"""


def peak_activations(kind: str, case: str) -> float:
    """The peak of one forward+backward pass in activations: ``kind`` "functional" (``multibn.batch_norm`` under
    ``autograd.record``) or "layer" (the hybridized Gluon layer), on the bench ``case``."""
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS needs Linux's /proc/self/status")
    from multibn.cli.bench.memory import MEM_ENV, child_env

    proc = subprocess.run([sys.executable, "-c", _SCRIPT, kind, case], env=child_env(MEM_ENV), cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res["activations"]


def test_functional_float16_streams_through_float32_buffers() -> None:
    # float16 x, statistics in float32: the kernels convert chunk by chunk through float32 buffers (here 4 MiB
    # each, half an activation), no full-size float32 temporaries (before: 15 activations)
    assert peak_activations("functional", "nchw_256x64x16x16:float16") < 6


def test_gluon_layer_writes_into_mxnets_buffers() -> None:
    # hybridized layer on a graph input: y and dx written by the kernels into the operator's output and input
    # gradient buffers, no reshape back (before: 5 activations, with NumPy's y and dx copied into MXNet's buffers
    # and the reshapes' copies of y and dy; left: MXNet's copy of the graph input through the reshape, kept for the
    # backward, and the operator's input gradient copied into x.grad; gluon.nn.BatchNorm: 1)
    assert peak_activations("layer", "nchw_64x64x32x32") < 3.75


def test_functional_dx_into_the_gradient_buffer() -> None:
    # float32 under autograd.record: dx written by the backward's kernel into x.grad (request "write"), not into a
    # new array then copied (before: 3.2 activations; left: y, and the forward's copy of x that the backward reads,
    # which keeps the engine from deadlocking on the caller's arrays: 2.2; mx.nd.BatchNorm: 1)
    assert peak_activations("functional", "nchw_64x64x56x56") < 2.7


# ---- the MXNet-operator path (x over HOST_MAX_ELEMENTS) writing dx into x.grad: values and engine order ------------
LARGE = (64, 8, 16, 20)  # 163840 elements: over the 2^17 that run on the NumPy adapter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("grad_req", ["write", "add"])
def test_large_gradients_into_x_grad_match_native(grad_req: str, dtype: str) -> None:
    import multibn

    mx = mxnet_adapter.mx
    assert np.prod(LARGE) > mxnet_adapter.HOST_MAX_ELEMENTS
    rng = np.random.default_rng(5)
    xn = (rng.standard_normal(LARGE) * 2 + 0.5).astype(dtype)
    dyn = rng.standard_normal(LARGE).astype(dtype)
    gn, bn = rng.random(8).astype(np.float32) + 0.5, rng.standard_normal(8).astype(np.float32)

    def grads(native: bool) -> list[np.ndarray]:
        # the native reference in float32 (MXNet's CPU BatchNorm), multibn in the dtype under test
        x = mx.nd.array(xn.astype(np.float32) if native else xn, dtype="float32" if native else dtype)
        g, b = mx.nd.array(gn), mx.nd.array(bn)
        x.attach_grad(grad_req=grad_req)
        g.attach_grad(grad_req=grad_req)
        b.attach_grad(grad_req=grad_req)
        for _ in range(2):  # twice: "add" accumulates, "write" overwrites
            with mx.autograd.record():
                if native:
                    y = mx.nd.BatchNorm(x, g, b, mx.nd.zeros(8), mx.nd.ones(8), eps=1e-5, fix_gamma=False)
                else:
                    y, _ = multibn.batch_norm(x, g, b, None, convention="gluon")
            y.backward(mx.nd.array(dyn, dtype=y.dtype))
        return [a.grad.asnumpy().astype(np.float64) for a in (x, g, b)]

    got, want = grads(False), grads(True)
    tol = {"float32": (1e-4, 2e-5), "float16": (2e-2, 2e-2)}[dtype]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol[0], atol=tol[1] * np.abs(b).max())
