"""The static checks configured in pyproject.toml, run by the suite: ruff's lint rules over the
tree, mypy over the core package, and import-linter's contracts (the core never imports the
terminal UI; only the command line imports the command line; the recorder stays light inside
a trainer)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_ruff_finds_nothing():
    r = _run(str(BIN / "ruff"), "check", "replay", "tui", "tests", "benchmarks", "examples")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_finds_nothing_in_the_core():
    r = _run(str(BIN / "mypy"))
    assert r.returncode == 0 and r.stdout.startswith("Success"), r.stdout[-4000:] + r.stderr[-2000:]


def test_the_import_contracts_hold():
    r = _run(str(BIN / "lint-imports"))
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_import_contracts_catch_an_offender(tmp_path):
    """The contract is live: a core module importing the TUI breaks it."""
    import shutil
    shutil.copytree(REPO / "replay", tmp_path / "replay", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tui", tmp_path / "tui", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "replay" / "schema.py").write_text((REPO / "replay" / "schema.py").read_text()
                                                   + "\nimport tui.app  # an offender\n")
    r = subprocess.run([str(BIN / "lint-imports")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": str(BIN)})
    assert r.returncode != 0 and "BROKEN" in r.stdout and "replay.schema -> tui.app" in r.stdout, r.stdout[-3000:]
