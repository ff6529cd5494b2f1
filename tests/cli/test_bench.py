"""``multibn bench`` on a tiny case: the harness keeps working (no timing is asserted; benchmarks never run here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from multibn.cli import COMMANDS, bench
from multibn.cli.bench import memory
from multibn.cli.bench.cases import CASE_PRESETS, Case, Skip
from multibn.cli.bench.memory import MEM_PASSES, peak_memory_here
from multibn.cli.bench.models import MODELS
from multibn.cli.bench.report import table
from tests.helpers import backends_tested_here, has, need, need_installed, only_tested_here

pytestmark = pytest.mark.commands  # the commands run once, in the full environment (tests/conftest.py)

#: every installed backend (the default), but those this run leaves to the full environment
BACKENDS = ["--backends", *only_tested_here()] if only_tested_here() else []

FIELDS = {"backend", "impl", "case", "dtype", "pass", "median_ms", "iqr_ms", "runs", "ratio_to_native",
          "ratio_to_roofline"}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


def test_bench_is_a_command() -> None:
    assert COMMANDS["bench"][0] == "multibn.cli.bench"


def test_bench_tiny_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--cases", "nchw_2x3x4x5,nc_8x4:float16,nhwc_2x4x5x3", "--reps", "2", "--warmup", "1", "--keras", "no",
            "--quiet", "--json", str(out), *BACKENDS]
    have_plot = has("matplotlib")
    if have_plot:
        argv += ["--plot", str(tmp_path / "bench.png")]
    assert _run(argv) == 0
    table = capsys.readouterr().out
    assert "nchw_2x3x4x5" in table and "nhwc_2x4x5x3" in table and "roofline" in table
    data = json.loads(out.read_text())
    assert {"versions", "threads", "allocator", "cpu", "gpu"} <= set(data["environment"])
    records = data["records"]
    assert records and all(set(r) == FIELDS for r in records)
    assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
    assert {r["dtype"] for r in records} == {"float32", "float16"}
    for r in records:
        assert r["impl"] in ("multibn", "multibn-compiled", "native", "keras", "roofline")
        assert r["median_ms"] >= 0 and r["iqr_ms"] >= 0 and r["runs"] == 2
        if r["impl"] == "roofline":
            assert r["ratio_to_roofline"] == 1.0
    backends = {r["backend"] for r in records if r["impl"] == "multibn"}
    assert "numpy" in backends
    if have_plot:
        assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_keras_subprocess(tmp_path: Path) -> None:
    need("torch")
    need_installed("keras")  # imported by bench's subprocess, not here
    out = tmp_path / "bench.json"
    assert _run(["--backends", "torch", "--cases", "nc_8x4", "--passes", "fwd", "--reps", "2", "--warmup", "1",
                 "--quiet", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert any(r["impl"] == "keras" and r["backend"] == "torch" for r in records)


def test_case_names() -> None:
    assert Case.parse("nchw_64x64x56x56").shape == (64, 64, 56, 56)
    assert Case.parse("nc_4096x1024:bfloat16").dtype == "bfloat16"
    nhwc = Case.parse("nhwc_64x56x56x64")
    assert (nhwc.shape, nhwc.axis) == ((64, 56, 56, 64), 3) and Case.parse("nchw_1x2x3x4").axis == 1
    with pytest.raises(ValueError):
        Case.parse("nchw_2x3")


def test_bench_layer_pass_and_small_cases(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert _run(["--small", "--cases", "nc_8x4,nchw_2x3x4x5", "--reps", "2", "--warmup", "1", "--keras", "no",
                 "--quiet", "--json", str(out), *BACKENDS]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["pass"] for r in records} == {"fwd", "layer"}
    layer = [r for r in records if r["pass"] == "layer"]
    assert "numpy" not in {r["backend"] for r in layer}  # NumPy has no layer: skipped
    for r in layer:
        assert set(r) == FIELDS and r["impl"] in ("multibn", "native", "roofline")
        if r["impl"] == "native":
            assert r["ratio_to_native"] == 1.0


@pytest.mark.torch
def test_bench_model_lenet(tmp_path: Path) -> None:
    need("torch")
    out = tmp_path / "bench.json"
    assert _run(["--model", "lenet", "--backends", "torch", "--reps", "2", "--warmup", "1", "--quiet",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {(r["case"], r["impl"]) for r in records} == {
        (f"lenet_b{b}", i) for b in MODELS["lenet"] for i in ("multibn", "native")}
    assert all(set(r) == FIELDS and r["pass"] == "train-step" and r["backend"] == "torch" for r in records)


MEM_FIELDS = {"backend", "impl", "case", "dtype", "pass", "peak_mib", "passes_mib", "retained_mib_per_pass",
              "baseline_mib", "runs", "activation_mib", "native_peak_mib", "extra_activations", "ratio_to_native",
              "method"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux's /proc")
def test_bench_mem_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One fresh subprocess per implementation; x of 2 MiB, so y and dx alone raise the peak RSS well past what
    the kernel's batched RSS counters may lag by (up to 64 pages per thread)."""
    out = tmp_path / "bench.json"
    backends = ",".join(b for b in ("numpy", "torch") if b in backends_tested_here())
    assert _run(["--backends", backends, "--cases", "nchw_8x16x64x64", "--passes", "fwd,mem", "--reps", "2",
                 "--warmup", "1", "--keras", "no", "--quiet", "--json", str(out)]) == 0
    assert "peak MiB" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    mem = [r for r in records if r["pass"] == "mem"]
    assert all(set(r) == FIELDS for r in records if r["pass"] == "fwd")
    assert {(r["backend"], r["impl"]) for r in mem} == {("numpy", "multibn")} | (
        {("torch", "multibn"), ("torch", "native")} if "torch" in backends else set())
    for r in mem:
        assert set(r) == MEM_FIELDS and r["runs"] == len(r["passes_mib"]) == MEM_PASSES
        assert r["peak_mib"] > 0 and r["baseline_mib"] > 0 and r["activation_mib"] == 2.0
        if r["backend"] == "torch":
            assert r["native_peak_mib"] > 0 and r["extra_activations"] is not None
        else:
            assert r["native_peak_mib"] is None and r["extra_activations"] is None


def test_bench_unknown_pass_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown pass 'memory'"):
        _run(["--backends", "numpy", "--cases", "nc_8x4", "--passes", "memory", "--keras", "no", "--quiet"])


def test_bench_mem_table() -> None:
    row = {"backend": "torch", "impl": "multibn", "case": "nc_8x4", "dtype": "float32", "pass": "mem",
           "peak_mib": 3.0, "passes_mib": [3.0] * 3, "retained_mib_per_pass": 0.0, "baseline_mib": 200.0, "runs": 3,
           "activation_mib": 2.0, "native_peak_mib": 2.0, "extra_activations": 0.5, "ratio_to_native": 1.5,
           "method": "peak RSS"}
    text = table([row, dict(row, impl="native", peak_mib=2.0, extra_activations=0.0, ratio_to_native=1.0)])
    assert "+0.50" in text and "+0.00" in text and "median ms" not in text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux's /proc")
def test_bench_mem_without_clear_refs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the peak-RSS counter cannot be reset: one peak over the passes, and the method says so."""
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    res = peak_memory_here("numpy", Case.parse("nchw_8x16x32x32"), "multibn", "cpu")
    assert len(res["peaks"]) == 1 and res["peaks"][0] >= 0 and "not writable" in res["method"]
    with pytest.raises(Skip, match="native"):
        peak_memory_here("numpy", Case.parse("nc_8x4"), "native", "cpu")
    with pytest.raises(Skip, match="no peak-memory statistic for the GPU"):
        peak_memory_here("mxnet", Case.parse("nc_8x4"), "multibn", "gpu")


def test_case_preset_resnet() -> None:
    """``--cases resnet``: the ResNet-18 stage shapes at batch 32 and 8, each NCHW and NHWC, float32."""
    cases = [Case.parse(c) for c in CASE_PRESETS["resnet"][0]]
    assert len(cases) == 12 and {c.dtype for c in cases} == {"float32"}
    nchw = {c.shape for c in cases if c.axis == 1}
    nhwc = {(n, c, h, w) for n, h, w, c in (k.shape for k in cases if k.axis == 3)}
    assert nchw == nhwc == {(32, 32, 32, 32), (32, 64, 16, 16), (32, 128, 8, 8), (32, 256, 4, 4), (8, 32, 32, 32),
                            (8, 256, 4, 4)}
    assert CASE_PRESETS["resnet"][1] == ("layer", "layer-mem")


@pytest.mark.torch
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux's /proc")
def test_bench_layer_channels_last_and_layer_mem(tmp_path: Path) -> None:
    """The layer pass takes NHWC cases on torch (channels_last memory) and the layer-mem pass measures it."""
    need("torch")
    out = tmp_path / "bench.json"
    assert _run(["--backends", "torch", "--cases", "nchw_2x8x4x4,nhwc_2x4x4x8", "--passes", "layer,layer-mem",
                 "--reps", "2", "--warmup", "1", "--keras", "no", "--quiet", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    layer = {(r["case"], r["impl"]) for r in records if r["pass"] == "layer"}
    mem = [r for r in records if r["pass"] == "layer-mem"]
    assert layer == {(c, i) for c in ("nchw_2x8x4x4", "nhwc_2x4x4x8") for i in ("multibn", "native")}
    assert {(r["case"], r["impl"]) for r in mem} == layer
    assert all(set(r) == MEM_FIELDS and r["native_peak_mib"] is not None for r in mem)


@pytest.mark.torch
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux's /proc")
def test_bench_model_resnet18(tmp_path: Path) -> None:
    """``--model resnet18`` at a tiny batch: NCHW and channels_last training steps, and their peak memory."""
    need("torch")
    out = tmp_path / "bench.json"
    assert _run(["--model", "resnet18", "--backends", "torch", "--batches", "2", "--reps", "2", "--warmup", "1",
                 "--quiet", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    cases = {"resnet18_b2", "resnet18_cl_b2"}
    steps = [r for r in records if r["pass"] == "train-step"]
    assert {(r["case"], r["impl"]) for r in steps} == {(c, i) for c in cases for i in ("multibn", "native")}
    assert all(set(r) == FIELDS and r["median_ms"] > 0 for r in steps)
    mem = [r for r in records if r["pass"] == "step-mem"]
    assert {(r["case"], r["impl"]) for r in mem} == {(c, i) for c in cases for i in ("multibn", "native")}
    assert all(set(r) == MEM_FIELDS and r["peak_mib"] > 0 for r in mem)
