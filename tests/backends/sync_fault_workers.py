"""The workers of tests/backends/test_sync_faults.py: torch.distributed (gloo) ranks that disagree on what a
synchronised batch_norm call must share, or one that never calls. Each rank writes what it raised (type, message,
seconds it took) to ``out/rank<r>.json`` before leaving the process group."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

#: What rank ``r`` passes, per case: the rank that differs is the last one.
CASES = ("channels", "dtype", "momentum", "eps", "convention", "axis", "rank", "mask", "agree")


def _call(case: str, rank: int, world: int) -> None:
    import torch

    import multibn

    odd = rank == world - 1  # the rank that differs
    channels, dtype, kw = 3, torch.float32, {}
    shape = (4, channels, 2)
    if case == "channels" and odd:
        shape = (4, 5, 2)
    if case == "dtype" and odd:
        dtype = torch.float64
    if case == "momentum" and odd:
        kw["momentum"] = 0.2
    if case == "eps" and odd:
        kw["eps"] = 1e-3
    if case == "convention" and odd:
        kw["convention"] = "gluon"
    if case == "axis":
        shape, kw["axis"] = (4, 3, 3), (2 if odd else 1)
    if case == "rank" and odd:
        shape = (4, channels)
    if case == "mask" and odd:
        kw["mask"] = torch.tensor([True, True, False, True]).reshape(4, 1, 1)
    x = torch.randn(*shape, dtype=dtype)
    c = shape[kw.get("axis", 1)]
    state = multibn.init_state(c, backend="torch", dtype="float64" if dtype == torch.float64 else "float32")
    before = state.running_mean.clone()
    try:
        multibn.batch_norm(x, None, None, state, sync=True, **kw)
    finally:
        assert torch.equal(state.running_mean, before)  # the caller's state is never written in place


def fault_worker(rank: int, world: int, cases: tuple[str, ...], store: str, out: str, timeout_s: float) -> None:
    """One rank running ``cases`` in turn in one process group (a disagreement raises before any collective of the
    batch norm, so the group stays usable for the next case); ``"absent"`` (alone): the last rank joins the group
    but never calls (it sleeps past the group's timeout), ``"dies"`` (alone): the last rank exits at once without
    calling. Writes ``out/<case>-rank<r>.json`` per case."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    odd = rank == world - 1
    faults = ("absent", "dies")
    try:
        for case in cases:
            result: dict[str, object] = {"error": None, "message": "", "seconds": 0.0}
            if case == "absent" and odd:
                time.sleep(timeout_s * 3)
            elif case == "dies" and odd:
                os._exit(0)
            else:
                start = time.monotonic()
                try:
                    _call("agree" if case in faults else case, rank, world)
                except Exception as e:
                    result = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
                result["seconds"] = time.monotonic() - start
            with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        if not set(cases) & set(faults):  # leaving a group a peer abandoned may block: the test kills those
            dist.destroy_process_group()
