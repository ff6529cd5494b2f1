"""Two versions of multibn's torch path side by side in one process: ``python benchmarks/before_after.py REV``.

REV (a git revision of this checkout, e.g. ``main`` or a commit) is exported with ``git archive`` into a temporary
directory as the package ``multibn_before``; this checkout's ``multibn`` is "after". Every repetition runs native,
before and after one after the other (interleaved), and the medians of both wall-clock time and process CPU time
are reported as ratios to the native BN. On a machine shared with other processes, wall-clock medians of calls that
last more than a scheduler slice are inflated by preemption; CPU time (``time.process_time``, one thread) is not,
which is why both are given (run with ``--threads 1`` for the CPU figures).

Parts (``--parts``): ``layer`` (multibn.layers.torch.BatchNorm against nn.BatchNorm2d, training forward and
backward, at the CIFAR ResNet-18 stage shapes of ``multibn bench --cases resnet``, NCHW and channels_last),
``fwd`` (functional training forward, the ``--small`` cases), ``model`` (the ``--model resnet18`` step) and
``large`` (functional forward+backward at the default cases of ``multibn bench``, float32; not in the default).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export(rev: str, into: Path) -> None:
    """``multibn`` at ``rev`` as the package ``multibn_before`` under ``into``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "multibn"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    (into / "multibn").rename(into / "multibn_before")
    reg = into / "multibn_before" / "backends" / "__init__.py"
    reg.write_text(reg.read_text().replace('"multibn.backends.', '"multibn_before.backends.'))
    sys.path.insert(0, str(into))


def interleaved(fs: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, tuple[list, list]]:
    for _ in range(warmup):
        for f in fs.values():
            f()
    out: dict[str, tuple[list, list]] = {k: ([], []) for k in fs}
    for _ in range(reps):
        for k, f in fs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            out[k][0].append(time.perf_counter() - t0)
            out[k][1].append(time.process_time() - c0)
    return out


def report(name: str, res: dict[str, tuple[list, list]], unit: float = 1e3) -> None:
    def q(v: list) -> tuple[float, float, float]:
        s = sorted(v)
        return s[len(s) // 4] * unit, statistics.median(s) * unit, s[3 * len(s) // 4] * unit

    wall = {k: q(v[0]) for k, v in res.items()}
    cpu = {k: q(v[1]) for k, v in res.items()}
    n, c = wall["native"][1], cpu["native"][1]
    print(f"{name:28} wall native {n:8.3f} [{wall['native'][0]:.3f}-{wall['native'][2]:.3f}] "
          f"before {wall['before'][1] / n:5.2f}x after {wall['after'][1] / n:5.2f}x "
          f"[{wall['after'][0] / n:.2f}-{wall['after'][2] / n:.2f}] | cpu native {c:8.3f} "
          f"before {cpu['before'][1] / c:5.2f}x after {cpu['after'][1] / c:5.2f}x "
          f"[{cpu['after'][0] / c:.2f}-{cpu['after'][2] / c:.2f}]", flush=True)


def layers(reps: int) -> None:
    import torch

    from multibn.cli.bench.cases import RESNET_SHAPES

    for shape in RESNET_SHAPES:
        for fmt, name in ((torch.contiguous_format, "nchw"), (torch.channels_last, "cl")):
            report(f"layer {'x'.join(map(str, shape))} {name} ms", interleaved(_layer_runs(shape, fmt), reps, 3))


def _layer_runs(shape: tuple[int, ...], fmt: object) -> dict[str, Callable[[], None]]:
    import multibn_before.layers.torch as before
    import torch

    import multibn.layers.torch as after

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    c = shape[1]
    out = {}
    for k, layer in (("native", torch.nn.BatchNorm2d(c)), ("before", before.BatchNorm(c, 4)),
                     ("after", after.BatchNorm(c, 4))):
        def run(layer: torch.nn.Module = layer) -> None:
            torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)

        out[k] = run
    return out


def functional(reps: int) -> None:
    for shape in ((32, 64), (256, 128), (32, 16, 8, 8)):
        report(f"fwd {'x'.join(map(str, shape))} us", interleaved(_fwd_runs(shape), reps * 10, 20), unit=1e6)


def _fwd_runs(shape: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    import multibn_before
    import torch
    import torch.nn.functional as F

    import multibn

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    c = shape[1]
    g, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)

    def call(mod: object) -> Callable[[], None]:
        st = [mod.init_state(c, backend="torch")]

        def run() -> None:
            _, st[0] = mod.batch_norm(x, g, b, st[0])

        return run

    return {"native": lambda: F.batch_norm(x, rm, rv, g, b, True, 0.1, 1e-5), "before": call(multibn_before),
            "after": call(multibn)}


def large(reps: int) -> None:
    for spec in ("nchw_64x64x56x56", "nhwc_64x56x56x64", "nchw_256x256x14x14", "nc_4096x1024"):
        report(f"fwd+bwd {spec} ms", interleaved(_large_runs(spec), reps, 1))


def _large_runs(spec: str) -> dict[str, Callable[[], None]]:
    """The functional fwd+bwd of ``multibn bench``'s default cases (float32): x, gamma, beta requiring grad."""
    import multibn_before
    import torch
    import torch.nn.functional as F

    import multibn
    from multibn.cli.bench.cases import Case

    case = Case.parse(spec)
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(case.shape, generator=gen) * 2 + 0.5, torch.randn(case.shape, generator=gen)
    c = case.shape[case.axis]
    xs, gs, bs = x.requires_grad_(True), torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)

    def nat(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 3, 1, 2) if case.axis == 3 else t

    def native() -> None:
        y = F.batch_norm(nat(xs), rm, rv, gs, bs, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xs, gs, bs), nat(dy))

    def call(mod: object) -> Callable[[], None]:
        st = [mod.init_state(c, backend="torch")]

        def run() -> None:
            y, st[0] = mod.batch_norm(xs, gs, bs, st[0], axis=case.axis)
            torch.autograd.grad(y, (xs, gs, bs), dy)

        return run

    return {"native": native, "before": call(multibn_before), "after": call(multibn)}


def model(reps: int, batches: tuple[int, ...]) -> None:
    from multibn_before.layers import torch as before_layers

    from multibn.cli.bench import models
    from multibn.layers import torch as after_layers

    for batch in batches:
        for variant in ("", "cl"):
            fs = {"native": models.torch_resnet18(batch, ["native"], "cpu", variant)["native"],
                  "after": models.torch_resnet18(batch, ["multibn"], "cpu", variant)["multibn"]}
            convert = after_layers.convert_batchnorm
            after_layers.convert_batchnorm = before_layers.convert_batchnorm  # the builder imports it at call
            try:
                fs["before"] = models.torch_resnet18(batch, ["multibn"], "cpu", variant)["multibn"]
            finally:
                after_layers.convert_batchnorm = convert
            report(f"resnet18 b{batch} {variant or 'nchw'} ms", interleaved(fs, reps, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the 'before' git revision")
    parser.add_argument("--parts", default="layer,fwd,model")
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batches", default="32,8")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"before = {args.rev}, after = this checkout; torch {torch.__version__}, {torch.get_num_threads()} "
          "thread(s); medians (wall: [IQR] of after / native median), ratios to native")
    with tempfile.TemporaryDirectory() as tmp:
        export(args.rev, Path(tmp))
        parts = args.parts.split(",")
        if "layer" in parts:
            layers(args.reps)
        if "fwd" in parts:
            functional(args.reps)
        if "large" in parts:
            large(max(5, args.reps // 3))
        if "model" in parts:
            model(max(5, args.reps // 3), tuple(int(b) for b in args.batches.split(",")))


if __name__ == "__main__":
    main()
