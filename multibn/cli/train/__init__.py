"""``multibn train``: the textbook batch-norm experiments, trained on every installed backend with multibn's layers.

* ``lenet``: LeNet with sigmoid and average pooling, BN after every conv and hidden dense layer, with and
  without BN (Fashion-MNIST IDX files with ``--data DIR``; by default the 8x8 digits that ship with
  scikit-learn, resized to 28x28, so that it runs offline);
* ``mlp-regression``: a deep tanh MLP 1-10-10-10-10-1 regressing ``y = x^2 + N(0, 1)``, with and without BN
  (momentum 0.5 on the old value) before every tanh;
* ``placement``: BN before or after the ReLU of a small MLP, or none, on a synthetic regression.

``--variant renorm`` (lenet) compares plain BN with batch renormalisation (Ioffe, 2017) at batch 4 instead of
with and without BN: every BN layer renormalised with ``r`` clipped to [1/3, 3] and ``|d| <= 5`` (the end values
of the paper's schedule) and ``renorm_momentum`` 0.99 (Keras's); ``--variant ghost`` compares plain BN with ghost
batch norm (Hoffer et al., 2017: statistics per sub-batch of 4) at batch 32. A backend whose layer does not take
the variant yet is skipped with the reason. At batch 4 training with plain BN amplifies rounding: a difference
between two backends in the last bit grows tenfold about every 45 steps (in float64 too), so their plain-BN
curves part ways after a few hundred steps; the renormalised networks stay much closer.

Every backend starts from the same weights (generated once in NumPy from the seed), sees the same batches in
the same order and takes the same optimizer step (SGD or Adam written once over array operators), so the
per-epoch numbers differ only by floating-point rounding; the command prints the largest difference.
NumPy trains too: its backward is written out here, with :func:`multibn.batch_norm_vjp` for the BN part.
After every epoch each network with BN is evaluated twice: with its running averages and with every BN layer's
statistics recomputed exactly over the training set ("recomputed"; ``recompute_statistics``), which leaves the
training itself unchanged.

Importing this package imports no framework.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from multibn.progress import progress_bar

from ..usage import check_outputs
from .models import GHOST_BATCH, RENORM_CLIPPING, RENORM_MOMENTUM
from .runner import TRAINERS, Unsupported, divergence, make_trainer, to_json, train_run
from .tasks import TASKS, Task

__all__ = ["TASKS", "add_arguments", "run"]

_NAMES = {"bn": "BN", "no-bn": "no BN", "before": "before", "after": "after", "none": "none", "renorm": "renorm",
          "ghost": "ghost"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\nImporting")[0].replace("``", "").replace(":func:", "")
    parser.add_argument("--task", choices=list(TASKS), default="lenet", help="the experiment (default: lenet)")
    parser.add_argument("--backend", default=None, metavar="NAME[,NAME...]",
                        help=f"one of {', '.join(TRAINERS)} or a comma-separated list (default: every installed "
                             "backend in turn; numpy, whose convolutions are slow, last)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 10; 2 with --quick)")
    parser.add_argument("--variant", choices=("bn", "renorm", "ghost"), default="bn",
                        help="the networks compared (lenet): bn, with and without BN (default); renorm, plain BN and "
                             "batch renormalisation (rmin 1/3, rmax 3, dmax 5, renorm_momentum 0.99), default batch 4; "
                             f"ghost, plain BN and ghost BN over sub-batches of {GHOST_BATCH}, default batch 32 (every "
                             f"batch cut to a multiple of {GHOST_BATCH})")
    parser.add_argument("--no-bn", action="store_true",
                        help="train only the network without BN (default: with and without, or every placement)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="directory with the Fashion-MNIST IDX files train-images-idx3-ubyte[.gz], "
                             "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] "
                             "(lenet only; nothing is downloaded; default: scikit-learn's digits at 28x28)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds of the initial weights, the batch order and the synthetic data "
                             "(default: 0; 0 1 2 for mlp-regression)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the textbook's (lenet 256 on --data, 32 on the 1438 shipped training digits; "
                             "mlp-regression 64; placement 64); --variant renorm 4, ghost 32")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: lenet Adam 1e-3, mlp-regression Adam 0.02, placement Adam 0.01)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                        help="default: adam (--optimizer sgd takes the textbook's lr 1.0 unless --lr)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="default: float32; float64 for mlp-regression, whose 1-D input leaves every BN layer's "
                             "weights with an eps-sized gradient at the start, a sign that float32 rounding decides "
                             "differently on each backend (Adam then steps by lr either way)")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset of the data and 2 epochs: a smoke test of every backend")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help='write {"task", "runs": [{"backend", "bn", "variant", "seed", "epochs": [{"epoch", '
                             '"train_loss", "test_loss", "test_acc", "test_loss_recomputed", '
                             '"test_acc_recomputed"}]}], "max_divergence"} to PATH')
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="write PNG curves (loss and accuracy, with vs without BN or BN vs --variant, one line per "
                             "backend; test "
                             "metrics also with recomputed statistics); needs matplotlib")


def _backends(spec: str | None) -> list[str]:
    from multibn.backends import available_backends, get_backend

    if spec is None:
        installed = set(available_backends())
        return [b for b in TRAINERS if b in installed]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in TRAINERS:
            raise ValueError(f"--backend: unknown backend {name!r}; choose from {', '.join(TRAINERS)}")
        get_backend(name)  # ImportError naming the missing framework and its pip extra
    return list(dict.fromkeys(names))


def _fmt(v: float | None, spec: str = "10.4f") -> str:
    return f"{'-':>{spec.split('.')[0]}}" if v is None else format(v, spec)


def _summary(task: Task, runs: list[dict[str, Any]]) -> None:
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))  # in the order trained: task.variants or --variant's
    classify = task.loss == "xent"

    def mean(b: str, v: str, metric: str, epoch: int = -1) -> float | None:
        vals = [r["epochs"][epoch][metric] for r in runs if r["backend"] == b and r["variant"] == v]
        return sum(vals) / len(vals) if vals and vals[0] is not None else None

    seeds = sorted({r["seed"] for r in runs})
    print(f"\nlast epoch{' (mean over seeds ' + ', '.join(map(str, seeds)) + ')' if len(seeds) > 1 else ''}:")
    rec = "test_acc_recomputed" if classify else "test_loss_recomputed"
    head = f"{'backend':<7} {'network':<8} {'train loss':>10} {'test loss':>10}"
    head += f" {'test acc':>9} {'best acc (epoch)':>17} {'epoch-1 acc':>11}" if classify else ""
    head += f" {'recomputed':>10}" + (f" {'best recomputed':>17}" if classify else "")
    print(head)
    print("-" * len(head))
    for b in backends:
        for v in variants:
            line = f"{b:<7} {_NAMES.get(v, v):<8} {_fmt(mean(b, v, 'train_loss'))} {_fmt(mean(b, v, 'test_loss'))}"
            group = [r for r in runs if r["backend"] == b and r["variant"] == v]
            if classify:
                line += f" {_fmt(mean(b, v, 'test_acc'), '9.4f')} {_best(group, 'test_acc')}"
                line += f"  {_fmt(mean(b, v, 'test_acc', 0), '11.4f')}"
            line += f" {_fmt(mean(b, v, rec))}" + (f" {_best(group, rec)}" if classify else "")
            print(line)
    if task.name == "mlp-regression" and {"bn", "no-bn"} <= set(variants):
        for b in backends:
            with_bn, without = mean(b, "bn", "test_loss"), mean(b, "no-bn", "test_loss")
            print(f"{b}: test MSE without BN / with BN = {without:.2f} / {with_bn:.2f} = {without / with_bn:.1f}x")


def _best(group: list[dict[str, Any]], metric: str) -> str:
    """``"  0.9721 ( 9)"``: the best (largest) per-epoch value of ``metric``, mean over the runs of ``group``, and the
    epoch of the first run's best; ``-`` where the metric is None (a network without BN)."""
    if group[0]["epochs"][0][metric] is None:
        return f"{'-':>17}"
    best = max(group[0]["epochs"], key=lambda e: e[metric])  # the first epoch reaching the maximum
    return f"{sum(max(e[metric] for e in r['epochs']) for r in group) / len(group):10.4f} ({best['epoch']:>2})"


def _unsupported(backend: str, task: Task, variants: list[str], seed: int, args: argparse.Namespace) -> str | None:
    """Why ``backend`` cannot train one of ``variants`` (its layer does not take a BN variant yet), or None."""
    try:
        for variant in variants:
            make_trainer(backend, task, variant, seed, args.lr, args.dtype, args.optimizer)
    except Unsupported as e:
        return str(e)
    return None


def run(args: argparse.Namespace) -> int:
    import importlib.util

    task = TASKS[args.task]
    bad_output = check_outputs("train", json=args.json, plot=args.plot)
    if bad_output is not None:
        return bad_output
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("multibn train: error: --plot needs matplotlib: pip install 'multibn[train]'", file=sys.stderr)
        return 2
    try:
        backends = _backends(args.backend)
    except (ValueError, ImportError) as e:
        print(f"multibn train: {e}", file=sys.stderr)
        return 2
    if not backends:
        print("multibn train: no backend is installed (pip install 'multibn[torch]', [jax] or [mxnet])",
              file=sys.stderr)
        return 2
    n_train, n_test, quick_epochs = task.quick
    epochs = args.epochs if args.epochs is not None else (quick_epochs if args.quick else task.epochs)
    try:
        variants = list(task.compared(args.variant, args.no_bn))
    except ValueError as e:
        print(f"multibn train: {e}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or task.default_batch_size(args.data, args.variant)
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else list(task.seeds)
    multiple = task.batch_multiple(tuple(variants))
    if epochs < 1 or batch_size < 2:
        print("multibn train: --epochs must be >= 1 and --batch-size >= 2", file=sys.stderr)
        return 2
    if batch_size % multiple:
        print(f"multibn train: --batch-size must be a multiple of ghost BN's sub-batch size {multiple}, got "
              f"{batch_size}", file=sys.stderr)
        return 2
    try:
        datasets = {s: task.data(s, args.data) for s in (seeds if task.uses_seed_for_data() else seeds[:1])}
    except (ValueError, OSError, ImportError) as e:
        print(f"multibn train: {e}", file=sys.stderr)
        return 2
    if args.quick:
        datasets = {s: d.subset(n_train, n_test) for s, d in datasets.items()}
    first = next(iter(datasets.values()))
    model = task.model(variants[0], args.lr, args.dtype, args.optimizer)
    conv = model.convention
    print(f"multibn train --task {task.name}{'' if args.variant == 'bn' else ' --variant ' + args.variant}: "
          f"{task.title}")
    skipped = {}
    for backend in backends:
        if (why := _unsupported(backend, task, variants, seeds[0], args)) is not None:
            skipped[backend] = why
            print(f"{backend}: skipped: {why}")
    backends = [b for b in backends if b not in skipped]
    if not backends:
        print("multibn train: no installed backend can train these networks", file=sys.stderr)
        return 2
    print(f"data: {first.name}: {len(first.x_train)} training, {len(first.x_test)} test examples")
    print(f"backends: {', '.join(backends)}; networks: {', '.join(_NAMES.get(v, v) for v in variants)}; "
          f"seeds: {', '.join(map(str, seeds))}; {epochs} epoch{'s' * (epochs != 1)}, batch {batch_size}, "
          f"{model.optimizer} lr {model.lr}, {model.dtype}")
    print(f"BN: multibn's layer of each framework, convention {conv.name!r} with momentum {conv.momentum} on the old "
          f"value, eps {conv.eps:g}; the same initial weights and batch order on every backend")
    if "renorm" in variants:
        print(f"renorm: batch renormalisation in every BN layer, r clipped to [{RENORM_CLIPPING['rmin']:.3g}, "
              f"{RENORM_CLIPPING['rmax']:g}], |d| <= {RENORM_CLIPPING['dmax']:g}, renorm_momentum {RENORM_MOMENTUM}")
    if "ghost" in variants:
        print(f"ghost: ghost batch norm in every BN layer, statistics per sub-batch of {GHOST_BATCH}; every batch cut "
              f"to a multiple of {GHOST_BATCH}")
    print(f"recomputed: the test {'accuracy' if model.loss == 'xent' else 'loss'} with every BN layer's statistics "
          "recomputed exactly over the training set (recompute_statistics) instead of the running averages\n")
    head = f"{'backend':<7} {'network':<8} {'seed':>4} {'epoch':>5} {'train loss':>10} {'test loss':>10} " \
           f"{'test acc':>9} {'recomputed':>10} {'sec':>6}"
    print(head)
    print("-" * len(head), flush=True)
    progress = progress_bar(True, None, "", unit="batch")  # one epoch's batches, on a terminal only
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for backend in backends:
        for variant in variants:
            for seed in seeds:
                data = datasets.get(seed, first)
                label = f"{backend:<7} {_NAMES.get(variant, variant):<8} {seed:>4}"

                def on_epoch(row: dict[str, Any], label: str = label) -> None:
                    progress.clear()
                    recomputed = row["test_acc_recomputed" if model.loss == "xent" else "test_loss_recomputed"]
                    print(f"{label} {row['epoch']:>5} {row['train_loss']:10.4f} {row['test_loss']:10.4f} "
                          f"{_fmt(row['test_acc'], '9.4f')} {_fmt(recomputed)} {row['seconds']:6.1f}", flush=True)

                def on_batch(epoch: int, done: int, total: int, label: str = label) -> None:
                    if done == 1:  # a new epoch: the bar starts again
                        progress.set_description_str(f"  {label} epoch {epoch}/{epochs}", refresh=False)
                        progress.reset(total)
                    progress.update()

                try:
                    trainer = make_trainer(backend, task, variant, seed, args.lr, args.dtype, args.optimizer)
                    epochs_out = train_run(trainer, data, epochs, batch_size, seed, on_epoch, on_batch, multiple)
                except FloatingPointError as e:
                    progress.close()
                    print(f"multibn train: {backend}, {variant}, seed {seed}: {e} (try a smaller --lr)",
                          file=sys.stderr)
                    return 1
                runs.append({"backend": backend, "variant": variant, "seed": seed, "epochs": epochs_out})
    progress.close()
    _summary(task, runs)
    worst, where = divergence(runs)
    if where is None:
        print("\nlargest divergence between backends: - (one backend)")
    else:
        lo, hi = where["values"]
        print(f"\nlargest divergence between backends: {worst:.3g} ({where['metric']}, epoch {where['epoch']}, "
              f"{_NAMES.get(where['variant'], where['variant'])}, seed {where['seed']}: "
              f"{where['backends'][0]} {lo:.6g} vs {where['backends'][1]} {hi:.6g})")
    print(f"total time {time.perf_counter() - start:.0f} s")
    config = {"backends": backends, "skipped": skipped, "variant": args.variant, "epochs": epochs,
              "batch_size": batch_size, "optimizer": model.optimizer,
              "lr": model.lr, "dtype": model.dtype, "seeds": seeds, "quick": bool(args.quick),
              "convention": {"name": conv.name, "momentum": conv.momentum, "momentum_weighs": conv.momentum_weighs,
                             "eps": conv.eps}}
    if "renorm" in variants:
        config["renorm"] = {"clipping": dict(RENORM_CLIPPING), "renorm_momentum": RENORM_MOMENTUM}
    if "ghost" in variants:
        config["virtual_batch_size"] = GHOST_BATCH
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(task, first.name, runs, config), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        from .plot import write_plot

        try:
            write_plot(args.plot, task, first.name, runs, worst if where is not None else None, args.variant,
                       batch_size)
        except ImportError as e:
            print(f"multibn train: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0
