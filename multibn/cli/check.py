"""``multibn check``: the fixed-seed conformance battery of :mod:`multibn.conformance`, every installed backend and
convention against the float64 reference and against the frameworks' own batch norms.

Each case is a sequence of training steps, then eval steps, run through :func:`multibn.batch_norm` (gradients by
the framework's autodiff; :func:`multibn.batch_norm_vjp` on NumPy). After every step ``y``, ``dx``, ``dgamma``,
``dbeta``, the running mean and variance and ``num_batches_tracked`` are compared with the reference within the
per-element error bound of :func:`multibn.conformance.reference.step_bounds`; NaN and inf must sit at the same
places. Backends are also compared pairwise, and each framework's native BN with multibn's result on that
framework. This module parses the arguments, shows progress and prints the table. Importing it imports no
framework.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata

import numpy as np

from ..conformance import (
    Row,
    battery,
    check_case,
    compare_native,
    finish_keras,
    jax_x64,
    native_battery,
    start_keras,
    variant_battery,
)
from ..conformance import reference as R
from ..conventions import CONVENTIONS
from ..progress import progress_bar
from .usage import BACKENDS, UsageError, check_outputs, parse_list, unavailable, usage_error


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("multibn", "numpy", "torch", "jax", "jaxlib", "mxnet", "flax", "keras", "array-api-compat"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["jax_enable_x64"] = str(jax_x64())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: every installed backend)")
    parser.add_argument("--conventions", default=None,
                        help=f"comma-separated subset of {','.join(CONVENTIONS)} (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="the smaller battery (under a minute)")
    parser.add_argument("--no-native", action="store_true", help="skip the comparisons with the frameworks' own BN")


def run(args: argparse.Namespace) -> int:
    try:
        conventions = parse_list(args.conventions, tuple(CONVENTIONS), "convention")
        asked = parse_list(args.backends, BACKENDS, "backend")
    except UsageError as e:
        return usage_error("check", e)
    bad_output = check_outputs("check", json=args.json)
    if bad_output is not None:
        return bad_output
    if args.backends is not None:  # asked for by name: each must run, or the check would pass without them
        missing = unavailable(asked)
        if missing:
            for b, why in missing.items():
                print(f"multibn check: error: backend {b} was asked for but cannot run here: {why}", file=sys.stderr)
            return 1
    return _run(args, conventions, asked)


def _run(args: argparse.Namespace, conventions: list[str], asked: list[str]) -> int:
    import importlib.util
    import shutil

    from ..backends import available_backends

    t0 = time.monotonic()
    cases = battery(conventions, quick=args.quick) + variant_battery(conventions)
    present = [b for b in asked if importlib.util.find_spec(b) is not None]
    natives = [] if args.no_native else native_battery(present, conventions, quick=args.quick)
    # Keras picks its backend at import: each Keras run is a subprocess, started first (it has the longest way to
    # go) and collected at the end.
    workdir = tempfile.mkdtemp(prefix="multibn-check-")
    keras_jobs = {id(n): start_keras(n.case, n.backend, workdir) for n in natives if n.requires == ("keras",)}
    have = available_backends()  # imports the frameworks
    backends = [b for b in asked if b in have]
    missing = [b for b in asked if b not in have]
    natives = [n for n in natives if n.backend in backends]
    progress = progress_bar(True, len(cases) + len(natives), "multibn check", unit="case")
    rows: list[Row] = []
    not_run: dict[tuple[str, str], str] = {}
    try:
        for case in cases:
            progress.set_postfix_str(f"{case.conv_name} {case.name}")
            r, skipped = check_case(case, backends)
            rows += r
            for b, (what, why) in skipped.items():
                not_run[(b, what)] = why
            progress.update()
        for nat in natives:
            progress.set_postfix_str(f"{nat.backend} {nat.label}")
            try:
                job = keras_jobs.pop(id(nat), None)
                native_run = finish_keras(*job, len(nat.case.steps)) if job is not None else None
                rows += compare_native(nat, native_run)
            except ImportError as e:
                not_run[(nat.backend, nat.label)] = f"not installed: {e}"
            progress.update()
    finally:
        progress.close()
        for proc, _ in keras_jobs.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    _print_table(rows, conventions, backends)
    failed = [r for r in rows if not r.ok]
    if not_run or missing:
        print("\nnot run:")
        for b in missing:
            print(f"  {b}: backend not installed here")
        for (b, what), why in sorted(not_run.items()):
            print(f"  {b} {what}: {why}")
    if failed:
        print("\nfailures:")
        for r in failed:
            print(f"  {r.backend} {r.convention} [{r.case}] {r.quantity}: {r.detail}")
    elapsed = time.monotonic() - t0
    passed = bool(rows) and not failed  # nothing compared is not a pass
    if not rows:
        print("\nno comparison ran: none of the selected backends can run here", file=sys.stderr)
    print(f"\n{len(rows)} comparisons ({len(cases)} cases x {len(backends)} backends + pairwise, "
          f"{len(natives)} native): "
          f"{len(rows) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f}s "
          f"-> {'PASS' if passed else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "results": [r.as_json() for r in rows],
                       "not_run": [{"backend": b, "what": w, "reason": why} for (b, w), why in not_run.items()]
                       + [{"backend": b, "what": "backend", "reason": "not installed"} for b in missing]},
                      f, indent=1)
    return 0 if passed else 1


def _print_table(rows: list[Row], conventions: Sequence[str], backends: Sequence[str]) -> None:
    """One line per backend x convention x quantity (cases folded: the worst error, the largest bound); then the
    backend pairs, then the native BNs (``<backend>:native``: the framework's own BN against multibn on it)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:  # backend pairs: one line per pair and quantity, every convention folded in
        groups.setdefault((r.backend, "(all)" if "~" in r.backend else r.convention, r.quantity), []).append(r)
    order = {q: i for i, q in enumerate((*R.QUANTITIES, "raises"))}
    border = {b: i for i, b in enumerate(backends)}

    def key(k: tuple[str, str, str]) -> tuple:
        b, c, q = k
        return ("native" in b, "~" in b, border.get(b.split(":")[0].split("~")[0], 99), b,
                conventions.index(c) if c in conventions else 99, c, order.get(q, 99))

    header = (f"{'backend':<14} {'convention':<24} {'quantity':<20} {'cases':>5} {'max_abs_err':>11} "
              f"{'max_rel_err':>11} {'tol':>9} {'err/tol':>8}  result")
    print(header)
    print("-" * len(header))
    for k in sorted(groups, key=key):
        rs = groups[k]
        ok = all(r.ok for r in rs)
        print(f"{k[0]:<14} {k[1]:<24} {k[2]:<20} {len(rs):>5} {max(r.max_abs_err for r in rs):>11.3g} "
              f"{max(r.max_rel_err for r in rs):>11.3g} {max(r.tol for r in rs):>9.2g} "
              f"{max(r.err_to_tol for r in rs):>8.2g}  {'PASS' if ok else 'FAIL'}")
    if any(not np.isfinite(r.tol) for r in rows):
        print("tol inf: the error bound is infinite where 1/sqrt(var + eps) is (a constant channel with eps 0) or "
              "the input holds NaN/inf; such a row checks that NaN and inf sit at the same places, and its error "
              "columns show how far the finite values are apart (mxnet dgamma under fix_gamma: exactly 0)")
