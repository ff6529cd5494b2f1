"""``multibn demo``: the same four training steps and one eval step on every installed backend, per convention.

The data ships with the package (``multibn/data/demo.npz``: four NCHW batches of shape (16, 8, 6, 6)). The
NumPy backend in float64 is the yardstick; every backend runs float32 and the table shows its largest
relative difference from the yardstick (``max|got - ref| / max|ref|``) in ``y``, the running statistics and the
gradients.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

import numpy as np

from ..api import batch_norm, batch_norm_vjp, init_state
from ..backends import available_backends, get_backend
from ..conventions import CONVENTIONS
from .usage import BACKENDS, UsageError, parse_list, unavailable, usage_error

DEMO_CONVENTIONS = ("torch", "torch_cma", "mxnet", "gluon", "flax", "keras")


def load_demo_data() -> dict[str, np.ndarray]:
    with resources.files("multibn.data").joinpath("demo.npz").open("rb") as f, np.load(f) as data:
        return {k: data[k] for k in data.files}


def run_steps(backend: str, convention: str, data: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Four training steps, one eval step and one training gradient; results as float64 NumPy arrays."""
    be = get_backend(backend)
    cast = {k: v.astype(dtype) for k, v in data.items()}
    state = init_state(cast["gamma"].shape[0], backend=backend, dtype=dtype)
    kw = dict(convention=convention, axis=1, backend=backend)
    for batch in cast["x"]:
        y, state = batch_norm(batch, cast["gamma"], cast["beta"], state, training=True, **kw)
    y_eval, _ = batch_norm(cast["x"][0], cast["gamma"], cast["beta"], state, training=False, **kw)
    dx, dgamma, _ = batch_norm_vjp(cast["x"][-1], cast["gamma"], cast["beta"], None, cast["dy"], **kw)
    out = {"y": y, "y_eval": y_eval, "running_mean": state.running_mean, "running_var": state.running_var,
           "dx": dx, "dgamma": dgamma}
    return {k: be.to_numpy(v).astype(np.float64) for k, v in out.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: every installed backend)")


def run(args: argparse.Namespace) -> int:
    try:  # every name checked before the first line of the table
        backends = parse_list(args.backends, BACKENDS, "backend") if args.backends is not None else None
    except UsageError as e:
        return usage_error("demo", e)
    if backends is None:
        backends = list(available_backends())
    for b, why in unavailable(backends).items():
        print(f"multibn demo: error: backend {b} cannot run here: {why}", file=sys.stderr)
        return 1
    data = load_demo_data()
    print(f"multibn demo: 4 training steps + eval on batches of shape {data['x'].shape[1:]} (shipped data),")
    print("float32 on each backend against the float64 NumPy run: max|got - ref| / max|ref| per quantity\n")
    quantities = ("y", "y_eval", "running_mean", "running_var", "dx", "dgamma")
    header = f"{'convention':<10} {'backend':<7} " + " ".join(f"{q:>12}" for q in quantities)
    print(header)
    print("-" * len(header))
    worst = 0.0
    for conv in DEMO_CONVENTIONS:
        ref = run_steps("numpy", conv, data, "float64")
        for name in backends:
            got = run_steps(name, conv, data, "float32")
            errs = [float(np.max(np.abs(got[q] - ref[q])) / max(np.max(np.abs(ref[q])), 1e-30)) for q in quantities]
            worst = max(worst, *errs)
            print(f"{conv:<10} {name:<7} " + " ".join(f"{e:12.2e}" for e in errs))
    print(f"\nlargest relative difference {worst:.2e} (float32 rounding). Conventions:")
    for c in DEMO_CONVENTIONS:
        print(f"  {c:<10} {CONVENTIONS[c].reproduces}")
    return 0
