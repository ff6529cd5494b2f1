"""The fixed-seed battery that ``multibn check`` runs, and :func:`check_case`: one case on every backend against
the float64 reference and pairwise."""

from __future__ import annotations

from collections.abc import Sequence

from .cases import UNSUPPORTED, Case, make_case, unsupported
from .compare import Row, compare_runs, rows_of
from .runs import Run, backend_run, reference_run
from .variants import reference_variant_run


def battery(conventions: Sequence[str], *, quick: bool) -> list[Case]:
    """The fixed-seed cases, per convention. The quick battery shares shapes between cases (JAX compiles each
    operation once per shape and dtype) and alternates float16 and bfloat16 between conventions."""
    cases = []
    for k, name in enumerate(conventions):
        s = 1000 * (k + 1)
        # the convention's default axis: (6, 3, 4, 4) is NCHW with 3 channels, or NHWC with 4 (flax, keras)
        cases.append(make_case("f32 rank4 3T+E", name, "float32", [(6, 3, 4, 4)] * 3 + [(2, 3, 4, 4)],
                               training=[True, True, True, False], seed=s + 1, offsets=[0.0, 3.0, 30.0, 1.0]))
        cases.append(make_case("f64 offset1e4 rank3 axis-1 2T+E", name, "float64", [(8, 5, 4), (5, 5, 4), (3, 5, 4)],
                               training=[True, True, False], axis=-1, seed=s + 2, offsets=1e4, spread=1e-2))
        if not quick or k % 2 == 0:
            cases.append(make_case("f16 rank2 2T+E", name, "float16", [(16, 3), (8, 3), (4, 3)],
                                   training=[True, True, False], axis=1, seed=s + 3, offsets=[0.0, 10.0, 100.0],
                                   spread=2.0))
        if not quick or k % 2 == 1:
            cases.append(make_case("bf16 rank5 axis0 T+E", name, "bfloat16", [(3, 4, 2, 3, 2), (3, 2, 2, 1, 2)],
                                   training=[True, False], axis=0, seed=s + 4, offsets=[0.0, 1.0, 1e3]))
        cases += [
            make_case("f32 constant+NaN eps0 2T+E", name, "float32", [(5, 4, 3)] * 3, training=[True, True, False],
                      axis=1, seed=s + 5, offsets=[0.0, 20.0, 0.0, 5.0], constant=[1], eps=0.0,
                      specials=[(1, 7, float("nan"))]),
            make_case("f32 NaN/inf in eval T+E", name, "float32", [(5, 4, 3)] * 2, training=[True, False], axis=1,
                      seed=s + 12, specials=[(1, 1, float("nan")), (1, 4, float("inf"))]),
            make_case("f32 one value per channel", name, "float32", [(1, 4, 1), (5, 4, 3)], axis=1, seed=s + 6),
        ]
        if not quick:
            cases += [
                make_case("f32 large n offset1e3", name, "float32", [(32, 4, 8, 8)] * 2 + [(8, 4, 8, 8)],
                          training=[True, True, False], axis=1, seed=s + 7, offsets=[0.0, 1e3, 10.0, 1e2]),
                make_case("f32 empty batch 3T", name, "float32", [(4, 3, 2), (0, 3, 2), (4, 3, 2)], axis=1,
                          seed=s + 8),
                make_case("f64 momentum0.5 eps0.1 4T+E", name, "float64", [(3, 2, 5)] * 4 + [(1, 2, 5)],
                          training=[True] * 4 + [False], axis=-2, seed=s + 9, momentum=0.5, eps=0.1),
                make_case("f32 stateless", name, "float32", [(4, 3, 3)] * 2, axis=1, seed=s + 10, stateful=False),
                make_case("f32 inf channel", name, "float32", [(6, 3)] * 2 + [(2, 3)], training=[True, True, False],
                          axis=1, seed=s + 11, specials=[(0, 4, float("-inf"))]),
            ]
    return cases



def check_case(
    case: Case, backends: Sequence[str], *, pairwise: bool = True
) -> tuple[list[Row], dict[str, tuple[str, str]]]:
    """Every backend against the reference (and pairwise). Returns the rows and, for each backend that cannot run
    the case, ``(what, reason)`` from :data:`UNSUPPORTED`."""
    ref = reference_variant_run(case) if case.variant else reference_run(case)
    rows: list[Row] = []
    runs: dict[str, Run] = {}
    skipped: dict[str, tuple[str, str]] = {}
    for name in backends:
        why = unsupported(case, name)
        if why is not None:
            skipped[name] = (why, UNSUPPORTED[(name, why)][2])
            continue
        runs[name] = backend_run(case, name)
        rows += rows_of(name, case, compare_runs(runs[name], ref, ref.bounds))
    if pairwise:
        names = list(runs)
        doubled = [{q: 2 * v for q, v in b.items()} for b in ref.bounds]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                comps = compare_runs(runs[a], runs[b], doubled)
                rows += rows_of(f"{a}~{b}", case, comps)
    return rows, skipped
