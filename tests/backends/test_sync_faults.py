"""Synchronised BN with ranks that disagree (issue 21, item 5), on torch.distributed's gloo with 2 and 3
processes: every rank gets a ValueError naming what differs and each rank's value, before any collective of the
batch norm itself runs (the descriptor each rank gathers first, :meth:`multibn.plan.Plan._sync_spec`); a rank
that never calls, or dies, makes the others raise within the group's timeout. Each test bounds its processes'
time and kills any left."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path

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


def _run(case: str, world: int, tmp_path: Path, deadline_s: float = 120.0) -> list[dict]:
    """Start ``world`` ranks of ``case``, wait at most ``deadline_s`` for them, kill any left; each rank's result
    (None for a rank that wrote none)."""
    torch = need("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=fault_worker, args=(r, world, case, str(tmp_path / "store"), str(tmp_path),
                                                    GROUP_TIMEOUT_S), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    try:
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert not any(p.is_alive() for p in procs)
    files = [tmp_path / f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


@pytest.mark.parametrize(("case", "world"), [(c, 2) for c in EXPECTED] + [("channels", 3), ("convention", 3)])
def test_ranks_that_disagree_all_get_a_value_error_naming_what_differs(case: str, world: int,
                                                                       tmp_path: Path) -> None:
    field, values = EXPECTED[case]
    results = _run(case, world, tmp_path)
    every = [values[0]] * (world - 1) + [values[1]]
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no result (it hung or crashed)"
        assert res["error"] == "ValueError", (r, res)
        msg = res["message"]
        assert re.search(r"^sync: the replicas disagree on .*" + field, msg), msg
        for i, v in enumerate(every):
            assert f"replica {i} has {v}" in msg, (i, v, msg)


def test_ranks_that_agree_raise_nothing(tmp_path: Path) -> None:
    assert _run("agree", 3, tmp_path) == [{"error": None, "message": "", "seconds": pytest.approx(0, abs=60)}] * 3


@pytest.mark.parametrize(("case", "world"), [("absent", 2), ("absent", 3), ("dies", 2)])
def test_a_rank_that_never_calls_makes_the_others_raise_within_the_group_timeout(case: str, world: int,
                                                                                tmp_path: Path) -> None:
    results = _run(case, world, tmp_path, deadline_s=GROUP_TIMEOUT_S * 6 + 60)
    for r, res in enumerate(results[:-1]):
        assert res is not None, f"rank {r} wrote no result: it did not raise within the group's timeout"
        assert res["error"] is not None, (r, res)
        assert res["seconds"] < GROUP_TIMEOUT_S * 3, (r, res)
