"""The README's examples run as written, and the documentation the code cites is in the repository."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need, require

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SEMANTICS = ROOT / "docs" / "semantics.md"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end >= 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of ``text`` whose info string is ``lang`` ("" for a bare fence)."""
    blocks, current, inside = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == lang:
                    blocks.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))


LAYER_BLOCKS = _blocks(_section("Layers"), "python")


def test_layers_section_has_one_example_per_framework():
    assert [re.search(r"multibn\.layers\.(\w+)", b).group(1) for b in LAYER_BLOCKS] == ["torch", "gluon", "jax"]
    assert "convert_sync_batchnorm" in LAYER_BLOCKS[0]


@pytest.mark.parametrize("block", LAYER_BLOCKS, ids=["torch", "gluon", "jax"])
def test_layers_examples_run(block, tmp_path):
    require(re.search(r"multibn\.layers\.(\w+)", block).group(1).replace("gluon", "mxnet"))
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=60)  # each takes a few seconds
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_port_example_runs_as_written(tmp_path):
    """The two commands of "Porting a model" on a fresh directory give the table the README shows."""
    require("mxnet")
    require("torch")
    block = next(b for b in _blocks(_section("Porting a model"), "") if "stem_checkpoint.py" in b)
    commands = [(i, line[2:]) for i, line in enumerate(block.splitlines()) if line.startswith("$ ")]
    assert [c.split()[0] for _, c in commands] == [".venvs/full/bin/python", ".venvs/full/bin/multibn"]
    lines = block.splitlines()
    for n, (i, command) in enumerate(commands):
        argv = shlex.split(command)
        argv = ([sys.executable, str(ROOT / argv[1])] if n == 0 else [sys.executable, "-m", "multibn", *argv[1:]])
        proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shown = lines[i + 1: commands[n + 1][0] if n + 1 < len(commands) else len(lines)]
        assert proc.stdout.splitlines() == shown
    torch = need("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))
    net.load_state_dict(torch.load(tmp_path / "stem.pt", weights_only=True))  # strict, as the README says


def _citations() -> list[tuple[str, str]]:
    """(file, section) for every ``docs/semantics.md`` §N citation in the code, tests and README."""
    out = []
    for path in [ROOT / "README.md", *ROOT.glob("multibn/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"docs/semantics\.md`{0,2}\)?,? (?:\(?§|sections? )([\d.]+(?:-\d+)?)", text):
            out.append((str(path.relative_to(ROOT)), m.group(1)))
    return out


def test_semantics_citations_resolve():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", SEMANTICS.read_text(encoding="utf-8"), flags=re.M))
    cites = _citations()
    assert len(cites) >= 5
    for where, section in cites:
        for part in section.split("-"):
            assert part.rstrip(".") in headings, (where, section, sorted(headings))


def test_no_citation_of_files_outside_the_repository():
    """The repository stands alone: nothing cites notes kept outside it (docs/semantics.md is the project's own)."""
    offenders = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("multibn/**/*.py"),
                 *ROOT.glob("tests/**/*.py")]:
        if path.name == "test_readme.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "shared/" in text or "semantics notes" in text or "bn-semantics" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_variants_example_runs(tmp_path):
    (block,) = _blocks(_section("Batch renormalisation and ghost batch norm"), "python")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
