"""Synchronised BN with ranks that disagree (issue 21, item 5), on torch.distributed's gloo with 2 and 3
processes: every rank gets a ValueError naming what differs and each rank's value, before any collective of the
batch norm itself runs (the descriptor each rank gathers first, :meth:`multibn.plan.Plan._sync_spec`); a rank
that never calls, or dies, makes the others raise within the group's timeout. All groups start at once (the
disagreements in one group per world size, run in turn; each timeout case in its own), their time is bounded and
any process left is killed."""

from __future__ import annotations

import json
import multiprocessing
import re
import time

import pytest

from tests.backends.sync_fault_workers import fault_worker
from tests.helpers import need

pytestmark = pytest.mark.torch

GROUP_TIMEOUT_S = 5.0
#: what each case's error names: the descriptor field and every rank's value (the last rank differs)
EXPECTED = {
    "channels": (r"the channel count of x", ["3", "5"]),
    "dtype": (r"the dtype of x", ["float32", "float64"]),
    "momentum": (r"the convention's momentum", ["0.1", "0.2"]),
    "eps": (r"the convention's eps", ["1e-05", "0.001"]),
    # torch against gluon: momentum (0.1 against 0.9), then the rules that differ, in one message
    "convention": (r"the convention's momentum: .*; the convention's rules",
                   ["momentum_weighs='new', unbiased_running_var=True",
                    "momentum_weighs='old', unbiased_running_var=False"]),
    "axis": (r"the channel axis", ["1", "2"]),
    "rank": (r"the rank of x", ["3", "2"]),
    "mask": (r"whether a mask is given", ["False", "True"]),
}


DISAGREE = [(c, 2) for c in EXPECTED] + [("channels", 3), ("convention", 3)]
TIMEOUTS = [("absent", 2), ("absent", 3), ("dies", 2)]


def _groups() -> list[tuple[int, tuple[str, ...]]]:
    """The process groups to start, as ``(world, cases)``: the disagreements and the agreeing call in one group per
    world size (run in turn), each timeout case in a group of its own."""
    by_world: dict[int, list[str]] = {}
    for case, world in [*DISAGREE, ("agree", 3)]:
        by_world.setdefault(world, []).append(case)
    return [(w, tuple(cs)) for w, cs in by_world.items()] + [(w, (c,)) for c, w in TIMEOUTS]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], list[dict | None]]:
    """Every group started at once, waited for at most the longest case's deadline (a timeout case: six group
    timeouts and a minute), any process left killed; each case's per-rank results (None for a rank that wrote
    none)."""
    torch = need("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = multiprocessing.get_context("spawn")
    launched = []
    for i, (world, cases) in enumerate(_groups()):
        out = tmp_path_factory.mktemp(f"group{i}")
        procs = [ctx.Process(target=fault_worker, args=(r, world, cases, str(out / "store"), str(out),
                                                        GROUP_TIMEOUT_S), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        launched.append((world, cases, out, procs))
    end = time.monotonic() + GROUP_TIMEOUT_S * 6 + 60
    procs = [p for *_, ps in launched for p in ps]
    try:
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert not any(p.is_alive() for p in procs)
    found = {}
    for world, cases, out, _ in launched:
        for case in cases:
            files = [out / f"{case}-rank{r}.json" for r in range(world)]
            found[case, world] = [json.loads(f.read_text()) if f.exists() else None for f in files]
    return found


@pytest.mark.parametrize(("case", "world"), DISAGREE)
def test_ranks_that_disagree_all_get_a_value_error_naming_what_differs(case: str, world: int, results) -> None:
    field, values = EXPECTED[case]
    every = [values[0]] * (world - 1) + [values[1]]
    for r, res in enumerate(results[case, world]):
        assert res is not None, f"rank {r} wrote no result (it hung or crashed)"
        assert res["error"] == "ValueError", (r, res)
        msg = res["message"]
        assert re.search(r"^sync: the replicas disagree on .*" + field, msg), msg
        for i, v in enumerate(every):
            assert f"replica {i} has {v}" in msg, (i, v, msg)


def test_ranks_that_agree_raise_nothing(results) -> None:
    assert results["agree", 3] == [{"error": None, "message": "", "seconds": pytest.approx(0, abs=60)}] * 3


@pytest.mark.parametrize(("case", "world"), TIMEOUTS)
def test_a_rank_that_never_calls_makes_the_others_raise_within_the_group_timeout(case: str, world: int,
                                                                                results) -> None:
    for r, res in enumerate(results[case, world][:-1]):
        assert res is not None, f"rank {r} wrote no result: it did not raise within the group's timeout"
        assert res["error"] is not None, (r, res)
        assert res["seconds"] < GROUP_TIMEOUT_S * 3, (r, res)
