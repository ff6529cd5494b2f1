"""What ``multibn bench`` prints and writes: the environment of the run, the tables of times and peak memory,
and the PNG of the ratios."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..usage import BACKENDS
from .cases import IMPL_ORDER, MEM_OF, PASSES
from .memory import MEM_PASSES


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _allocator() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            conf = os.environ.get("MALLOC_CONF") or os.environ.get("TCMALLOC_RELEASE_RATE") or ""
            return f"{name} ({preload}{'; ' + conf if conf else ''})"
    return "glibc malloc (default)" if platform.system() == "Linux" else "system default"


def environment(backends: Sequence[str]) -> dict[str, Any]:
    """Versions, thread counts, allocator, CPU and GPU of this process (imports the backends' frameworks)."""
    from importlib import metadata

    import multibn

    env: dict[str, Any] = {
        "multibn": multibn.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "allocator": _allocator(), "versions": {},
        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                               "MXNET_CPU_WORKER_NTHREADS", "XLA_FLAGS") if k in os.environ},
        "gpu": None,
    }
    for dist in ("numpy", "torch", "jax", "jaxlib", "mxnet", "flax", "keras"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env["versions"][dist] = metadata.version(dist)
    env["threads"]["numpy"] = 1
    if "torch" in backends:
        import torch

        env["threads"]["torch"] = torch.get_num_threads()
        env["threads"]["torch_interop"] = torch.get_num_interop_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    if "jax" in backends:
        import jax

        env["jax_devices"] = [str(d) for d in jax.devices()]
        if env["gpu"] is None and jax.default_backend() == "gpu":
            env["gpu"] = jax.devices()[0].device_kind
    return env



#: the passes whose records are peak memory, not time
MEM_PASS_NAMES = (*MEM_OF, "step-mem")


def pass_order(p: str) -> int:
    return PASSES.index(p) if p in PASSES else len(PASSES)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(records: Sequence[dict[str, Any]]) -> str:
    """The timings, then the peak memory (passes "mem", "layer-mem", "step-mem") of the same records."""
    timed = [r for r in records if r["pass"] not in MEM_PASS_NAMES]
    mem = [r for r in records if r["pass"] in MEM_PASS_NAMES]
    return "\n\n".join(t for t in (_time_table(timed) if timed else "", mem_table(mem) if mem else "") if t)


def mem_table(records: Sequence[dict[str, Any]]) -> str:
    """Peak memory above the baseline, in MiB and beside the native BN's, the excess in activations (x's size)."""
    head = (f"{'case':<20} {'dtype':<8} {'pass':<9} {'backend':<7} {'impl':<16} {'peak MiB':>9} {'native MiB':>10} "
            f"{'x native':>9} {'extra act.':>10} {'act. MiB':>9} {'kept MiB/pass':>13}")
    lines = [f"peak memory of a forward+backward pass (mem: the function; layer-mem: the layer; step-mem: a "
             f"training step) above the memory before it (median of {MEM_PASSES}); extra act.: (peak - native "
             "peak) / bytes of x (step-mem: of the model's largest BN input); kept: memory still held after the "
             "passes, per pass",
             head, "-" * len(head)]
    prev = None
    for r in records:
        if prev is not None and (r["case"], r["dtype"], r["pass"]) != prev:
            lines.append("")
        prev = (r["case"], r["dtype"], r["pass"])
        extra = r["extra_activations"]  # + 0.0: no "-0.00"
        lines.append(
            f"{r['case']:<20} {r['dtype']:<8} {r['pass']:<9} {r['backend']:<7} {r['impl']:<16} {r['peak_mib']:>9.1f} "
            f"{_fmt(r['native_peak_mib'], '10.1f'):>10} {_fmt(r['ratio_to_native'], '9.2f'):>9} "
            f"{_fmt(extra if extra is None else round(extra, 2) + 0.0, '+10.2f'):>10} {r['activation_mib']:>9.1f} "
            f"{r['retained_mib_per_pass']:>13.1f}")
    return "\n".join(lines)


def _time_table(records: Sequence[dict[str, Any]]) -> str:
    head = (f"{'case':<20} {'dtype':<8} {'pass':<10} {'backend':<7} {'impl':<16} {'median ms':>10} "
            f"{'IQR ms':>8} {'runs':>4} {'x native':>9} {'x roofline':>10}")
    lines = [head, "-" * len(head)]
    prev = None
    own = False  # keras rows: ratios to the native BN timed in the Keras subprocess, not to the row above
    for r in records:
        key = (r["case"], r["dtype"], r["pass"], r["backend"])
        if prev is not None and key[:3] != prev[:3]:
            lines.append("")
        prev = key
        lines.append(
            f"{r['case']:<20} {r['dtype']:<8} {r['pass']:<10} {r['backend']:<7} {r['impl']:<16} "
            f"{r['median_ms']:>10.2f} {r['iqr_ms']:>8.2f} {r['runs']:>4} "
            f"{_fmt(r['ratio_to_native'], '9.2f'):>9} {_fmt(r['ratio_to_roofline'], '10.2f'):>10}"
            + (" *" if r["impl"] == "keras" else ""))
        own = own or r["impl"] == "keras"
    if own:
        lines.append("* keras rows run in a subprocess (Keras picks its backend at import): their ratios are to the "
                     "native BN and roofline timed beside them there, not to the rows of this process")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str) -> None:
    """A PNG with two bar charts: each implementation's ratio to the native BN and to the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["pass"] not in MEM_PASS_NAMES]  # times only
    groups = sorted({(r["case"], r["dtype"], r["pass"]) for r in records},
                    key=lambda k: (k[0], k[1], pass_order(k[2])))
    series = [(b, i) for b in BACKENDS for i in IMPL_ORDER
              if any(r["backend"] == b and r["impl"] == i and i != "roofline" for r in records)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8), sharex=True)
    width = 0.8 / max(len(series), 1)
    for ax, key, title in ((axes[0], "ratio_to_native", "time / native BN of the same framework"),
                           (axes[1], "ratio_to_roofline", "time / memory roofline of the same framework")):
        for j, (b, i) in enumerate(series):
            vals = []
            for grp in groups:
                r = next((r for r in records if (r["case"], r["dtype"], r["pass"]) == grp
                          and r["backend"] == b and r["impl"] == i), None)
                vals.append(r[key] if r and r[key] is not None else np.nan)
            ax.bar(np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width, vals, width, label=f"{b} {i}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(title)
    axes[1].set_xticks(np.arange(len(groups)), [f"{c}\n{d} {p}" for c, d, p in groups], fontsize=8)
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle("multibn bench (median ratios, lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
