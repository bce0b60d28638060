"""The core stays light and headless: importing it loads no torch, vllm, transformers or textual."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "textual", "vllm", "transformers")
LIGHT_MODULES = ("replay", "replay.recorder", "replay.recording", "replay.schema", "replay.weights",
                 "replay.metrics", "replay.fixes", "replay.cli", "replay.doctor", "replay.salvage",
                 "replay._views", "replay._format", "replay.manifest", "replay.errors")
IMPORT_RE = re.compile(r"^\s*(?:from|import)\s+(textual|tui)\b", re.M)


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_import_leaves_heavy_packages_unloaded(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {module} loaded {r.stdout.strip()}"


def test_cli_help_loads_no_heavy_package():
    code = ("import sys, contextlib, io\nfrom replay.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_no_core_file_imports_textual_or_tui():
    offenders = []
    for path in sorted((REPO / "replay").rglob("*.py")):
        for m in IMPORT_RE.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(REPO)}: {m.group(0).strip()}")
    assert offenders == []


def test_the_import_check_itself_catches_offenders():
    assert IMPORT_RE.search("x = 1\nfrom textual.app import App\n")
    assert IMPORT_RE.search("    import tui.app")
    assert not IMPORT_RE.search("# the tui imports replay\nimport tuition\n")
