"""``multibn bench``: the arguments, the loop over cases, passes and backends, and the Keras subprocesses."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from multibn.progress import progress_bar

from ..usage import BACKENDS, UsageError, check_outputs, parse_list, unavailable, usage_error
from .cases import (
    CASE_PRESETS,
    DEFAULT_CASES,
    DEFAULT_PASSES,
    IMPL_ORDER,
    KERAS_BACKENDS,
    MEM_OF,
    PASSES,
    QUICK_CASES,
    SMALL_CASES,
    SMALL_PASSES,
    Case,
    Skip,
    installed,
    use_all_torch_threads,
)
from .memory import MEM_PASSES, child_env, measure_memory, measure_model_memory, mem_worker
from .models import MODEL_BACKENDS, MODEL_PASSES, MODELS, model_variants
from .report import environment, pass_order, plot, table
from .timing import measure, measure_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="7 repetitions, the two smaller float32 cases (under two minutes on 2 cores)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, from {','.join(BACKENDS)} (default: every installed backend)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated NAME[:DTYPE], or a preset: resnet (the BN inputs of a CIFAR ResNet-18 "
                        "at batch 32 and 8, NCHW and NHWC, passes layer,layer-mem) (default: "
                        f"{','.join(DEFAULT_CASES)})")
    parser.add_argument("--passes", default=None,
                        help=f"comma-separated, from {','.join(PASSES)} (layer: the layers' training forward and "
                        "backward, multibn's against the native layer; mem: the peak memory of a forward+backward "
                        f"pass above the memory before it, median of {MEM_PASSES}, multibn's and the native BN's, "
                        "each in a fresh subprocess: peak RSS on the CPU, the allocator's peak on a GPU; default: "
                        "; layer-mem: the same of the layer pass; with --model: train-step,step-mem; default: "
                        f"{','.join(DEFAULT_PASSES)})")
    parser.add_argument("--small", action="store_true",
                        help=f"the small cases {','.join(SMALL_CASES)}, passes {','.join(SMALL_PASSES)}")
    parser.add_argument("--model", choices=tuple(MODELS), default=None,
                        help="one training step of the model with multibn's layers against the native BN, instead "
                        "of the cases: lenet at batch 256 and 32 on torch, Gluon (hybridized) and Flax (jit); "
                        "resnet18 (CIFAR, width 32) at batch 32 and 8 on torch, NCHW and channels_last (and "
                        "compiled with --compiled), with the peak memory of a step (pass step-mem)")
    parser.add_argument("--batches", default=None, help="--model: comma-separated batch sizes instead of the model's")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation (>= 7)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--compiled", action="store_true", help="also time multibn under torch.compile")
    parser.add_argument("--keras", choices=("auto", "no"), default="auto",
                        help="Keras BatchNormalization on its torch and jax backends, one subprocess each")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the arrays live: cpu (default) or gpu (torch CUDA device 0, JAX's first GPU, "
                        "mx.gpu(0); numpy is skipped)")
    parser.add_argument("--json", metavar="PATH", help="write the environment and the records as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--keras-worker", help=argparse.SUPPRESS)  # internal: KERAS_BACKEND of this subprocess
    parser.add_argument("--mem-worker", help=argparse.SUPPRESS)  # internal: BACKEND:IMPL of one "mem" measurement
    parser.add_argument("--mem-of", default="fwd+bwd", help=argparse.SUPPRESS)  # its pass, or model:VARIANT:BATCH




def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    # Threads: every core for torch, MXNet (which uses half unless told) and XLA; NumPy is single-threaded.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.keras_worker:
        # Keras decides its backend at import: this process is one Keras backend, the parent reads stdout.
        return _keras_worker(args)
    if args.mem_worker:
        return mem_worker(args)
    if (bad_output := check_outputs("bench", json=args.json, plot=args.plot)) is not None:
        return bad_output
    try:
        backends = parse_list(args.backends, BACKENDS, "backend") if args.backends else installed(BACKENDS)
    except UsageError as e:
        return usage_error("bench", e)
    if "torch" in backends:
        use_all_torch_threads()  # before MXNet, which drops torch's thread count on import
    missing = unavailable(backends)
    for name, why in missing.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    backends = [b for b in backends if b not in missing]
    if args.model:
        return _run_model(args, backends)
    quick = args.quick
    default_cases = SMALL_CASES if args.small else QUICK_CASES if quick else DEFAULT_CASES
    cases = args.cases.split(",") if args.cases else list(default_cases)
    preset_passes = next((CASE_PRESETS[c][1] for c in cases if c in CASE_PRESETS), None)
    cases = [e for c in cases for e in (CASE_PRESETS[c][0] if c in CASE_PRESETS else (c,))]
    parsed = [Case.parse(c) for c in cases]
    passes = args.passes.split(",") if args.passes else list(
        preset_passes or (SMALL_PASSES if args.small else DEFAULT_PASSES))
    for p in passes:
        if p not in PASSES:
            raise SystemExit(f"unknown pass {p!r}; choose from {', '.join(PASSES)}")
    reps = args.reps or (7 if quick else 15)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    keras_bes = [kb for kb in KERAS_BACKENDS if kb in backends and installed(["keras"])] \
        if args.keras == "auto" and set(passes) - set(MEM_OF) else []

    env = environment(backends)
    timing = f"{reps} reps after {warmup} warm-up, interleaved; medians in ms" if set(passes) - set(MEM_OF) else ""
    memory = f"peak memory: median of {MEM_PASSES} passes after 1 warm-up, each in a fresh subprocess" \
        if set(passes) & set(MEM_OF) else ""
    print(f"multibn bench: {len(parsed)} case(s) x {len(passes)} pass(es) x {len(backends)} backend(s), "
          + "; ".join(t for t in (timing, memory) if t))
    print(f"cpu: {env['cpu']} ({env['cpu_count']} cores), gpu: {env['gpu']}, allocator: {env['allocator']}, "
          f"threads: {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    records: list[dict[str, Any]] = []
    progress = progress_bar(not args.quiet, len(parsed) * len(passes) * len(backends) + len(keras_bes),
                            "multibn bench")
    for case in parsed:
        for pass_ in passes:
            for b in backends:
                progress.set_postfix_str(f"{b} {case.name} {case.dtype} {pass_}")
                records += _measure_one(args, b, case, pass_, reps, warmup)
                progress.update()
    for kb in keras_bes:
        progress.set_postfix_str(f"keras on {kb} (subprocess)")
        records += _keras_subprocess(kb, args, cases, passes, reps, warmup)
        progress.update()
    progress.close()
    records.sort(key=lambda r: (
        [c.name + c.dtype for c in parsed].index(r["case"] + r["dtype"]), pass_order(r["pass"]),
        BACKENDS.index(r["backend"]), IMPL_ORDER.index(r["impl"])))
    _report(args, env, records)
    return 0


def _measure_one(args: argparse.Namespace, backend: str, case: Case, pass_: str, reps: int,
                 warmup: int) -> list[dict[str, Any]]:
    """The records of one (backend, case, pass); a :class:`Skip` is reported on stderr and gives none."""
    impls = ["multibn", "native", "roofline"]
    if backend == "torch" and args.compiled:
        impls.insert(1, "multibn-compiled")
    if pass_ in MEM_OF:  # NumPy has no native BN
        return measure_memory(backend, case, impls[:1] if backend == "numpy" else impls[:-1], args.device, pass_)
    try:
        return measure(backend, case, pass_, impls, reps, warmup, args.device)
    except Skip as e:
        print(f"\nskipped {backend} {case.name}:{case.dtype}: {e}", file=sys.stderr)
        return []


def _report(args: argparse.Namespace, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")


def _run_model(args: argparse.Namespace, backends: Sequence[str]) -> int:
    """``--model``: one training step at each batch size (and of each variant), multibn's layers against the native
    BN, per backend; with pass ``step-mem`` also the peak memory of a step, per implementation in a subprocess."""
    reps = args.reps or (7 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else 3
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else MODELS[args.model]
    passes = args.passes.split(",") if args.passes else list(MODEL_PASSES[args.model])
    for p in passes:
        if p not in ("train-step", "step-mem"):
            raise SystemExit(f"unknown pass {p!r} with --model; choose from train-step, step-mem")
    backends = [b for b in MODEL_BACKENDS if b in backends]
    env = environment(backends)
    print(f"multibn bench --model {args.model}: {len(backends)} backend(s), batches {batches}, "
          f"{reps} reps after {warmup} warm-up, interleaved; medians in ms")
    jobs = [(batch, b, v) for batch in batches for b in backends for v in model_variants(b, args.model, args.compiled)]
    records: list[dict[str, Any]] = []
    progress = progress_bar(not args.quiet, len(jobs) * len(passes), "multibn bench")
    for batch, b, variant in jobs:
        for p in passes:
            progress.set_postfix_str(f"{b} {args.model} {variant} batch {batch} {p}")
            try:
                if p == "train-step":
                    records += measure_model(b, args.model, batch, reps, warmup, args.device, variant)
                else:
                    records += measure_model_memory(b, args.model, variant, batch, ("multibn", "native"),
                                                    args.device)
            except Skip as e:
                print(f"\nskipped {b} {args.model}: {e}", file=sys.stderr)
            progress.update()
    progress.close()
    _report(args, env, records)
    return 0


# ---- Keras: one subprocess per Keras backend ---------------------------------------------------------------------
def _keras_subprocess(kb: str, args: argparse.Namespace, cases: Sequence[str], passes: Sequence[str],
                      reps: int, warmup: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "multibn", "bench", "--keras-worker", kb, "--cases", ",".join(cases),
           "--passes", ",".join(p for p in passes if p not in MEM_OF), "--reps", str(reps), "--warmup", str(warmup),
           "--device", args.device]
    if args.quiet:
        cmd.append("--quiet")
    proc = subprocess.run(cmd, env=child_env({"KERAS_BACKEND": kb}), stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        print(f"keras on {kb}: the subprocess failed (exit {proc.returncode}); no keras rows", file=sys.stderr)
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _keras_worker(args: argparse.Namespace) -> int:
    """Keras on one backend beside that framework's native BN and roofline; prints the keras rows as JSON."""
    kb = args.keras_worker
    if kb == "torch":
        use_all_torch_threads()
    records = []
    cases = [Case.parse(c) for c in args.cases.split(",")]
    passes = args.passes.split(",") if args.passes else list(DEFAULT_PASSES)
    for case in cases:
        for pass_ in passes:
            try:
                rows = measure(kb, case, pass_, ["keras", "native", "roofline"], args.reps, args.warmup, args.device)
            except Exception as e:  # one case keras cannot do must not lose the others
                print(f"keras on {kb}, {case.name}:{case.dtype} {pass_}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            native = next((r["median_ms"] for r in rows if r["impl"] == "native"), None)
            records += [dict(r, native_ms_in_subprocess=native) for r in rows if r["impl"] == "keras"]
    print(json.dumps(records))
    return 0
