"""The commands refuse what they cannot do before doing any work: an empty or unrunnable backend selection,
an output path in a missing directory, an unknown backend in ``demo``; and their tables explain themselves."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multibn.cli import main

pytestmark = pytest.mark.commands  # the commands run once, in the full environment (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def _multibn(*argv: str, extra_path: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (extra_path, str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "multibn", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(("flag", "value", "what"), [("--backends", "", "backend"), ("--backends", " , ", "backend"),
                                                     ("--conventions", ",", "convention")])
def test_check_empty_selection_fails(flag, value, what, capsys):
    assert main(["check", "--quick", flag, value]) == 2
    out, err = capsys.readouterr()
    assert f"selects no {what}" in err and "PASS" not in out


def test_check_asked_for_backend_that_cannot_import_fails(tmp_path):
    """A broken install (here a fake ``mxnet`` that raises on import) must not give '0 comparisons -> PASS'."""
    fake = tmp_path / "mxnet"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libmxnet.so: cannot open shared object file')\n")
    proc = _multibn("check", "--quick", "--backends", "mxnet", extra_path=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "backend mxnet was asked for but cannot run here" in proc.stderr and "libmxnet.so" in proc.stderr
    assert "PASS" not in proc.stdout


def test_check_default_selection_still_skips_missing_backends(tmp_path):
    """Without --backends, a backend that is not installed is listed under 'not run', not an error."""
    fake = tmp_path / "mxnet"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no mxnet here')\n")
    proc = _multibn("check", "--quick", "--no-native", "--conventions", "d2l", extra_path=str(tmp_path))
    assert "mxnet: backend not installed here" in proc.stdout and "cannot run here" not in proc.stderr
    assert proc.returncode in (0, 1)  # 1 only for a known bug of the installed jax (tests/cli/test_check.py)
    assert any(line.startswith("numpy ") for line in proc.stdout.splitlines())


@pytest.mark.parametrize(("argv", "flag"), [
    (["check", "--quick", "--json"], "--json"),
    (["train", "--quick", "--task", "placement", "--json"], "--json"),
    (["train", "--quick", "--task", "placement", "--plot"], "--plot"),
    (["bench", "--quick", "--json"], "--json"),
    (["bench", "--quick", "--plot"], "--plot"),
])
def test_output_into_a_missing_directory_fails_before_any_work(argv, flag, tmp_path, capsys):
    target = str(tmp_path / "no" / "such" / "dir" / "out.x")
    t0 = time.monotonic()
    assert main([*argv, target]) == 2
    assert time.monotonic() - t0 < 10  # refused up front, not after the run
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"{flag} {target}" in err and "does not exist" in err, err
    assert out == ""


def test_output_that_is_a_directory_fails(tmp_path, capsys):
    assert main(["check", "--quick", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_demo_validates_backends_before_the_table(capsys):
    assert main(["demo", "--backends", "torch,jaxx"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown backend jaxx" in err
    assert main(["demo", "--backends", ","]) == 2


def test_check_table_explains_tol_inf(capsys):
    assert main(["check", "--quick", "--backends", "numpy", "--conventions", "mxnet", "--no-native"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[-3:-2] == ["inf"] for line in out.splitlines()), "no tol inf row to explain"
    assert "tol inf: the error bound is infinite" in out


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_top_level_help_is_user_text(capsys):
    top = _help(["--help"], capsys)
    assert "Each subcommand lives" not in top and "add_arguments" not in top
    assert "With no command, runs the demo" in top
    bench = _help(["bench", "--help"], capsys)
    assert "--device {cpu,gpu}" in bench and "where the arrays live" in bench


def test_bench_table_marks_keras_ratios_as_from_their_own_process():
    from multibn.cli.bench.report import table

    rec = dict(case="small", dtype="float32", backend="torch", runs=7, iqr_ms=0.1, ratio_to_roofline=2.0)
    rows = [dict(rec, impl="native", median_ms=1.0, ratio_to_native=1.0),
            dict(rec, impl="keras", median_ms=3.0, ratio_to_native=2.5, native_ms_in_subprocess=1.2)]
    text = table([dict(r, **{"pass": "fwd"}) for r in rows])
    keras_line = next(line for line in text.splitlines() if " keras " in line)
    assert keras_line.endswith("*")
    assert "native BN and roofline timed beside them there" in text


def test_bench_unknown_backend_is_a_usage_error(capsys):
    """Like the other commands' bad selections: exit 2, one ``multibn bench: error:`` line, nothing run."""
    assert main(["bench", "--backends", "foo", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("multibn bench: error: ") and "unknown backend" in err and "foo" in err
    assert err.count("\n") == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("argv", "desc"), [
    (["check", "--quick", "--backends", "numpy", "--conventions", "d2l", "--no-native"], "multibn check"),
    (["bench", "--backends", "numpy", "--cases", "nc_8x4", "--passes", "fwd", "--reps", "2", "--warmup", "1",
      "--keras", "no"], "multibn bench"),
    (["train", "--task", "placement", "--quick", "--epochs", "1", "--no-bn", "--backend", "numpy"], "epoch 1/1"),
])
def test_progress_bar_on_a_terminal_only(argv, desc, monkeypatch, capsys):
    """The commands' progress (the one tqdm bar of multibn.progress) shows on stderr when it is a terminal, and
    nothing is written there when it is not."""
    assert main(argv) == 0
    assert desc not in capsys.readouterr().err
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    assert desc in terminal.getvalue() and "\r" in terminal.getvalue()
