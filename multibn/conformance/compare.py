"""Comparisons of two runs of a case, quantity by quantity, within per-element error bounds: a quantity passes when
every finite element lies within its bound and NaN and inf sit at the same places
(:func:`multibn.conformance.reference.compare`); one :class:`Row` per backend, case and quantity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference as R
from .cases import Case
from .runs import Run


@dataclass
class Row:
    backend: str
    convention: str
    case: str
    quantity: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    ok: bool
    err_to_tol: float = 0.0
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("max_abs_err", "max_rel_err", "tol", "err_to_tol"):
            d[k] = _json_float(d[k])
        return d


def _json_float(v: float) -> float | str:
    return v if np.isfinite(v) else str(v)


def _merge(rows: dict[str, R.Comparison], q: str, c: R.Comparison, where: str) -> None:
    old = rows.get(q)
    if c.detail and not c.ok:
        c = dataclasses.replace(c, detail=f"{where}: {c.detail}")
    if old is None:
        rows[q] = c
        return
    max_abs, scale = max(old.max_abs_err, c.max_abs_err), max(old.ref_scale, c.ref_scale)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)  # over all steps
    rows[q] = R.Comparison(max_abs, max_rel, max(old.tol, c.tol), max(old.err_to_tol, c.err_to_tol),
                           old.ok and c.ok, old.detail or c.detail, scale)


def compare_runs(
    got: Run, ref: Run, bounds: Sequence[dict[str, np.ndarray]], quantities: Sequence[str] = R.QUANTITIES, *,
    common_only: bool = False,
) -> dict[str, R.Comparison]:
    """Quantity -> the comparison of ``got`` with ``ref`` over all steps (``bounds``: per step, per quantity).

    A quantity on one side only fails, unless ``common_only`` (natives that lack one, e.g. F.batch_norm's
    ``num_batches_tracked``)."""
    out: dict[str, R.Comparison] = {}
    if (got.error is None) != (ref.error is None) or (got.error and got.error[0] != ref.error[0]):
        def say(r: Run, who: str) -> str:
            return f"{who} raised {type(r.error[1]).__name__} at step {r.error[0]}: {r.error[1]}" if r.error else (
                f"{who} ran all {len(r.steps)} steps")
        out["raises"] = R.Comparison(np.inf, np.inf, 0.0, np.inf, False, f"{say(got, 'got')}; {say(ref, 'expected')}")
        return out
    if ref.error is not None:
        same = type(got.error[1]) is type(ref.error[1])
        out["raises"] = R.Comparison(0.0, 0.0, 0.0, 0.0, same, "" if same else
                                     f"raised {type(got.error[1]).__name__}, expected {type(ref.error[1]).__name__}")
    for i, (g, r, b) in enumerate(zip(got.steps, ref.steps, bounds, strict=False)):
        where = f"step {i}"
        for q in quantities:
            if q not in r and q not in g:
                continue
            if (q in r) != (q in g):
                if common_only:
                    continue
                _merge(out, q, R.Comparison(np.inf, np.inf, 0.0, np.inf, False, "present on one side only"), where)
            elif q == "num_batches_tracked":
                d = abs(int(g[q]) - int(r[q]))
                _merge(out, q, R.Comparison(float(d), float(d) / max(abs(int(r[q])), 1), 0.0, float(d > 0), d == 0,
                                            f"got {g[q]}, expected {r[q]}" if d else ""), where)
            else:
                _merge(out, q, R.compare(g[q], r[q], b[q]), where)
    return out


def rows_of(backend: str, case: Case, comps: dict[str, R.Comparison]) -> list[Row]:
    return [Row(backend, case.conv_name, case.name, q, c.max_abs_err, c.max_rel_err, c.tol, c.ok, c.err_to_tol,
                c.detail) for q, c in comps.items()]
