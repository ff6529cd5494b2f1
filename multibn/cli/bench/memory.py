"""The ``mem`` pass: the peak memory of one forward+backward pass of ``multibn`` and ``native`` (and
``multibn-compiled``), each in a fresh subprocess (a peak counter is per process, and a framework keeps what it
once allocated), and multibn's excess over the native BN in activations (bytes of x)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cases import MEM_OF, Case, Runner, Skip, use_all_torch_threads
from .models import model_case, model_runners
from .runners import IMPLS

#: model -> bytes of its largest BN input at a batch size (the unit of ``extra_activations`` for ``step-mem``)
MODEL_ACTIVATION: dict[str, Callable[[int], int]] = {
    "lenet": lambda batch: batch * 6 * 24 * 24 * 4, "resnet18": lambda batch: batch * 32 * 32 * 32 * 4,
}

#: forward+backward passes measured by the "mem" pass, after one warm-up pass
MEM_PASSES = 3
#: the environment of a "mem" subprocess: glibc serves every block over 64 KiB by its own mmap and unmaps it when
#: freed, so resident memory follows live memory (and the kernel's high-water mark, updated at each unmap, sees
#: every peak); by default freed blocks stay resident in the heap and hide later peaks
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MIB = 1 << 20


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_here(backend: str, case: Case, impl: str, device: str, of: str = "fwd+bwd") -> dict[str, Any]:
    """One implementation's peak memory in this process over ``MEM_PASSES`` forward+backward passes of the runner
    of pass ``of`` (``fwd+bwd``: the functional call; ``layer``: the layer), after one warm-up pass (compilation,
    kernel loading, caches): :func:`peak_memory_of`."""
    _gpu_check(backend, device)
    runners = IMPLS[backend](case, of, [impl], device)
    if impl not in runners:
        raise Skip(f"{impl} is not available for {backend} here")
    return peak_memory_of(runners[impl], backend, device)


def _gpu_check(backend: str, device: str) -> None:
    if device == "gpu":
        if backend in GPU_PEAK:
            GPU_PEAK[backend][0]()
        elif backend != "numpy":  # numpy_impls says why NumPy is skipped
            raise Skip(f"{backend} has no peak-memory statistic for the GPU")


def peak_memory_of(run: Runner, backend: str, device: str) -> dict[str, Any]:
    """The peak memory of ``MEM_PASSES`` calls of ``run`` after one warm-up call. Returns ``peaks`` (bytes, one
    per pass), ``baseline`` (bytes before the passes), ``retained`` (bytes per pass still held after the passes:
    a leak or a cache that grows) and ``method``.

    CPU: before each pass the kernel's peak-RSS counter (VmHWM) is reset; the pass's peak is VmHWM after it above
    the RSS before it (so a framework's deferred frees from the pass before do not count twice). Where the counter
    cannot be reset: one peak, VmHWM over the passes without warm-up (compilation included), above the RSS before
    them. GPU: the allocator's statistics (:data:`GPU_PEAK`)."""
    if device == "gpu":
        return GPU_PEAK[backend][1](run)
    try:
        proc_status("VmRSS")
    except OSError as e:
        raise Skip(f"peak RSS needs Linux's /proc/self/status ({e})") from e
    warm = reset_peak_rss()
    if warm:
        run()
    gc.collect()
    start = proc_status("VmRSS")
    peaks = []
    for _ in range(MEM_PASSES):
        if warm:
            gc.collect()
            reset_peak_rss()
        base = proc_status("VmRSS")
        run()
        peaks.append(proc_status("VmHWM") - base)
    if not warm:
        peaks = [proc_status("VmHWM") - start]
    gc.collect()
    method = ("peak RSS of each pass (VmHWM, reset before it) above the RSS before it, after one warm-up pass"
              if warm else "peak RSS over the passes (VmHWM; /proc/self/clear_refs is not writable: no warm-up, "
              "compilation included) above the RSS before them")
    return {"peaks": peaks, "baseline": start, "retained": (proc_status("VmRSS") - start) // MEM_PASSES,
            "method": method}


# ---- on a GPU: the allocator's statistics ----------------------------------------------------------------------
def _torch_gpu_check() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")


def _torch_gpu_peak(run: Runner) -> dict[str, Any]:
    """``torch.cuda.max_memory_allocated``, reset before each pass."""
    import torch

    run()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    peaks = []
    for _ in range(MEM_PASSES):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return {"peaks": peaks, "baseline": start,
            "retained": (torch.cuda.memory_allocated() - start) // MEM_PASSES,
            "method": "torch.cuda.max_memory_allocated of each pass above the memory allocated before it"}


def _jax_gpu_check() -> None:
    import jax

    try:
        jax.devices("gpu")
    except RuntimeError as e:
        raise Skip(f"JAX has no GPU here ({e})") from e


def _jax_gpu_peak(run: Runner) -> dict[str, Any]:
    """JAX's ``peak_bytes_in_use``, which cannot be reset: one peak, warm-up pass included."""
    import jax

    dev = jax.devices("gpu")[0]
    stats = dev.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        raise Skip(f"JAX gives no peak_bytes_in_use for {dev}")
    start = stats["bytes_in_use"]
    for _ in range(1 + MEM_PASSES):
        run()
    stats = dev.memory_stats()
    return {"peaks": [stats["peak_bytes_in_use"] - start], "baseline": start,
            "retained": (stats["bytes_in_use"] - start) // (1 + MEM_PASSES),
            "method": "JAX peak_bytes_in_use (cannot be reset: warm-up pass included) above bytes_in_use before"}


#: backend -> (raise :class:`Skip` unless it has a GPU here, the peak of a runner's passes on that GPU)
GPU_PEAK: dict[str, tuple[Callable[[], None], Callable[[Runner], dict[str, Any]]]] = {
    "torch": (_torch_gpu_check, _torch_gpu_peak), "jax": (_jax_gpu_check, _jax_gpu_peak),
}


# ---- one subprocess per implementation ----------------------------------------------------------------------------
def measure_memory(backend: str, case: Case, impls: Sequence[str], device: str = "cpu",
                   pass_: str = "mem") -> list[dict[str, Any]]:
    """The records of a memory pass (``mem``: of the ``fwd+bwd`` pass; ``layer-mem``: of the ``layer`` pass) of
    one (backend, case): each implementation's peak (the median over its passes) in its own fresh subprocess, and
    multibn's excess over the native BN in activations (bytes of x)."""
    args = ["--cases", f"{case.name}:{case.dtype}", "--mem-of", MEM_OF[pass_]]
    return _memory_records(backend, impls, device, args, case.name, case.dtype, pass_, case.nbytes)


def measure_model_memory(backend: str, model: str, variant: str, batch: int, impls: Sequence[str],
                         device: str = "cpu") -> list[dict[str, Any]]:
    """Pass ``step-mem``: the peak memory of a training step of ``model`` per implementation, each in a fresh
    subprocess; the excess is in activations of the model's largest BN input (:data:`MODEL_ACTIVATION`)."""
    args = ["--model", model, "--mem-of", f"model:{variant}:{batch}"]
    nbytes = MODEL_ACTIVATION[model](batch)
    return _memory_records(backend, impls, device, args, model_case(model, variant, batch), "float32", "step-mem",
                           nbytes)


def _memory_records(backend: str, impls: Sequence[str], device: str, worker_args: Sequence[str], name: str,
                    dtype: str, pass_: str, nbytes: int) -> list[dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for impl in impls:
        cmd = [sys.executable, "-m", "multibn", "bench", "--mem-worker", f"{backend}:{impl}", *worker_args,
               "--device", device]
        proc = subprocess.run(cmd, env=child_env(MEM_ENV), stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            print(f"\n{pass_} {backend} {impl} {name}:{dtype}: the subprocess failed (exit {proc.returncode})",
                  file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if "skip" in res:
            print(f"\nskipped {pass_} {backend} {impl} {name}:{dtype}: {res['skip']}", file=sys.stderr)
            continue
        results[impl] = res
    peak = {impl: float(np.median(res["peaks"])) for impl, res in results.items()}
    native = peak.get("native")
    records = []
    for impl, res in results.items():
        records.append({
            "backend": backend, "impl": impl, "case": name, "dtype": dtype, "pass": pass_,
            "peak_mib": round(peak[impl] / MIB, 2), "passes_mib": [round(p / MIB, 2) for p in res["peaks"]],
            "retained_mib_per_pass": round(res["retained"] / MIB, 2), "baseline_mib": round(res["baseline"] / MIB, 1),
            "runs": MEM_PASSES, "activation_mib": round(nbytes / MIB, 2),
            "native_peak_mib": None if native is None else round(native / MIB, 2),
            "extra_activations": None if native is None else round((peak[impl] - native) / nbytes, 3),
            "ratio_to_native": round(peak[impl] / native, 3) if native else None, "method": res["method"],
        })
    return records


def mem_worker(args: argparse.Namespace) -> int:
    """One "mem" measurement (``--mem-worker BACKEND:IMPL``); prints its result as one JSON line."""
    backend, impl = args.mem_worker.split(":")
    if backend == "torch":
        use_all_torch_threads()
    try:
        if args.mem_of.startswith("model:"):
            _, variant, batch = args.mem_of.split(":")
            _gpu_check(backend, args.device)
            runners = model_runners(backend, args.model, int(batch), [impl], args.device, variant)
            res = peak_memory_of(runners[impl], backend, args.device)
        else:
            res = peak_memory_here(backend, Case.parse(args.cases), impl, args.device, args.mem_of)
    except Skip as e:
        res = {"skip": str(e)}
    print(json.dumps(res))
    return 0


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment plus ``extra``, with the directory holding this multibn first on PYTHONPATH (so that a
    subprocess runs the same multibn, also from a checkout that is not installed)."""
    import multibn

    root = os.path.dirname(os.path.dirname(os.path.abspath(multibn.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
