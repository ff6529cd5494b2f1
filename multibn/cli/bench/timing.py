"""Timing: every implementation of one (backend, case, pass) side by side, interleaved, and the records with their
ratios to the native BN and to the roofline (one reduction and one streaming pass forward, 4 and 2 forward and
backward)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .cases import IMPL_ORDER, Case, Runner
from .models import model_case, model_runners
from .runners import IMPLS


def time_interleaved(runners: dict[str, Runner], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per repetition of each runner: ``warmup`` untimed rounds, then ``reps`` rounds A B C A B C ..."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range), in ms."""
    q1, med, q3 = np.percentile(np.asarray(times) * 1e3, [25, 50, 75])
    return float(med), float(q3 - q1)


def measure(backend: str, case: Case, pass_: str, impls: Sequence[str], reps: int, warmup: int,
            device: str = "cpu") -> list[dict[str, Any]]:
    """The records of one (backend, case, pass): every impl in ``impls`` timed side by side."""
    runners = IMPLS[backend](case, pass_, impls, device)
    times = time_interleaved(runners, reps, warmup)
    med = {k: summarize(v) for k, v in times.items()}
    if "roofline:sum" in med:
        (s, s_iqr), (c, c_iqr) = med.pop("roofline:sum"), med.pop("roofline:copy")
        ns, nc = (1, 1) if pass_ == "fwd" else (4, 2)  # 2 reads + 1 write; 6 reads + 2 writes (also "layer")
        med["roofline"] = (ns * s + nc * c, ns * s_iqr + nc * c_iqr)
    native = med.get("native", (None,))[0]
    roof = med.get("roofline", (None,))[0]
    records = []
    for impl in sorted(med, key=IMPL_ORDER.index):
        m, iqr = med[impl]
        records.append({
            "backend": backend, "impl": impl, "case": case.name, "dtype": case.dtype, "pass": pass_,
            "median_ms": round(m, 4), "iqr_ms": round(iqr, 4), "runs": reps,
            "ratio_to_native": round(m / native, 3) if native else None,
            "ratio_to_roofline": round(m / roof, 3) if roof else None,
        })
    return records



def measure_model(backend: str, model: str, batch: int, reps: int, warmup: int,
                  device: str = "cpu", variant: str = "") -> list[dict[str, Any]]:
    """Rows for one training step of ``model`` (a ``variant`` of it) at ``batch``: multibn's layers and the native
    BN side by side."""
    runners = model_runners(backend, model, batch, ("multibn", "native"), device, variant)
    med = {k: summarize(v) for k, v in time_interleaved(runners, reps, warmup).items()}
    native = med.get("native", (None,))[0]
    return [{
        "backend": backend, "impl": impl, "case": model_case(model, variant, batch), "dtype": "float32",
        "pass": "train-step",
        "median_ms": round(m, 4), "iqr_ms": round(iqr, 4), "runs": reps,
        "ratio_to_native": round(m / native, 3) if native else None, "ratio_to_roofline": None,
    } for impl, (m, iqr) in sorted(med.items(), key=lambda kv: IMPL_ORDER.index(kv[0]))]

