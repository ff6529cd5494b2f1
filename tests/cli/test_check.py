"""``multibn check --quick --json``: run in a subprocess, the JSON schema and the exit status (every installed
backend, in the full environment; JAX at XLA's default optimisation, which the rest of the suite leaves out)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import default_xla_env

pytestmark = pytest.mark.commands  # the commands run once, in the full environment (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"backend", "convention", "case", "quantity", "max_abs_err", "max_rel_err", "tol", "ok"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    path = tmp_path_factory.mktemp("check") / "check.json"
    proc = subprocess.run([sys.executable, "-m", "multibn", "check", "--quick", "--json", str(path)], cwd=ROOT,
                          env=default_xla_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=600)
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_json_schema(quick: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, data = quick
    assert set(data) >= {"versions", "results"}
    assert {"python", "numpy", "multibn"} <= set(data["versions"])
    assert all(isinstance(v, str) for v in data["versions"].values())
    assert data["results"], "no results"
    backends, conventions = set(), set()
    for row in data["results"]:
        assert set(row) >= ROW_KEYS, row
        assert isinstance(row["ok"], bool)
        for k in ("backend", "convention", "case", "quantity"):
            assert isinstance(row[k], str) and row[k]
        for k in ("max_abs_err", "max_rel_err", "tol"):
            v = row[k]
            assert isinstance(v, (int, float)) or v in ("inf", "nan"), (k, v)
            if isinstance(v, float):
                assert not math.isnan(v)
        backends.add(row["backend"].split(":")[0].split("~")[0])
        conventions.add(row["convention"])
    import multibn

    assert set(multibn.available_backends()) <= backends  # every installed backend was checked
    assert {"torch", "torch_cma", "mxnet", "gluon", "d2l", "flax", "keras"} <= conventions
    assert any(r["backend"].endswith(":native") for r in data["results"]), "no native comparison"
    assert any("~" in r["backend"] for r in data["results"]) or len(multibn.available_backends()) < 2


def test_exit_status_and_table(quick: tuple[subprocess.CompletedProcess, dict]) -> None:
    proc, data = quick
    failed = [r for r in data["results"] if not r["ok"]]
    assert proc.returncode == (1 if failed else 0), proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["backend", "convention", "quantity"]
    assert lines[-1].endswith("PASS" if not failed else "FAIL")
    assert f"{len(data['results'])} comparisons" in lines[-1]
    assert f"{len(failed)} failed" in lines[-1]


def test_quick_battery_passes(quick: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, data = quick
    failed = [(r["backend"], r["convention"], r["case"], r["quantity"]) for r in data["results"] if not r["ok"]]
    assert not failed, failed


def test_unknown_backend_is_an_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "multibn", "check", "--backends", "numpy,tensorflow"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown backend tensorflow" in proc.stderr
