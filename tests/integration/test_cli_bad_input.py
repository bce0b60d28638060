"""Every command, given bad input, answers with a one-line error and exit code 1 or 2: no
traceback, no value silently replaced, the recording unchanged."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from replay import Recorder


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "run"
    with Recorder(root, run_config={"model": "nowhere"}) as r:
        for step in range(3):
            r.rollout(step=step, request_id=f"q{step}", prompt_ids=[1, 2], output_ids=[3, 4],
                      logprobs=[-0.5, -0.25], token_versions=[step, step])
            r.trainer(step=step, request_id=f"q{step}", weight_version=step, logprobs=[-0.4, -0.3])
    return root


def _cases(rec: Path, tmp: Path) -> list[list[str]]:
    r = str(rec)
    missing = str(tmp / "missing")
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "afile").write_text("x")
    cases = [
        ["info", missing], ["info", str(tmp / "empty")], ["info", str(tmp / "afile")],
        ["sql", r, ""], ["sql", r, "-- only a comment"], ["sql", r, "   "], ["sql", r, "SELEC 1"],
        ["sql", r, "SELECT nope FROM rollouts"], ["sql", r, "SELECT 1; SELECT 2", "--format", "json"],
        ["sql", r, "SELECT 1", "--max-rows", "-1"], ["sql", r, "SELECT 1", "--out", str(tmp / "x.txt")],
        ["sql", r, "SELECT 1", "--out", str(rec / "leak.parquet")],
        ["sql", r, "SELECT 1", "--out", str(tmp / "nofolder" / "x.parquet")],
        ["sql", r, "SELECT 1; SELECT 2", "--out", str(tmp / "two.parquet")],
        ["sql", r, f"COPY rollouts TO '{tmp / 'leak.csv'}'"], ["sql", r, "INSTALL httpfs"],
        ["sql", r], ["sql", r, "SELECT 1", "--file", missing],
        ["doctor", missing], ["doctor", str(tmp / "empty")],
        ["rerun", r, "--step", "3-1"], ["rerun", r, "--step", "1-"], ["rerun", r, "--step", "-1"],
        ["rerun", r, "--step", "x"], ["rerun", r, "--step", "1", "--device", "foo"],
        ["rerun", r, "--step", "1", "--jobs", "0"], ["rerun", r, "--step", "1", "--batch", "0"],
        ["rerun", r, "--step", "1"],  # no engine config, no model: says which
        ["bisect", r, "--threshold", "nan"], ["bisect", r, "--threshold", "-1"],
        ["bisect", r, "--threshold", "inf"], ["bisect", r, "--by", "tokens", "--tol", "nan"],
        ["bisect", r, "--by", "tokens", "--tol", "-1"], ["bisect", r, "--by", "fixes", "--step", "-1"],
        ["bisect", r, "--by", "fixes", "--step", "1"],
        ["diagnose", r, "--step", "-1"], ["diagnose", r, "--window", "3-1"],
        ["diagnose", r, "--device", "foo"],
        ["tui", missing], ["tui", "--against", r],
        ["import", "jsonl", missing, str(tmp / "out")],
        ["nosuchcommand"],
    ]
    try:
        import torch
        if not torch.cuda.is_available():
            cases.append(["rerun", r, "--step", "1", "--device", "cuda"])
    except ImportError:
        pass
    return cases


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def test_every_command_refuses_bad_input_in_one_line(rec, tmp_path):
    before = _hashes(rec)
    cases = _cases(rec, tmp_path)
    # one interpreter for all cases (each runs replay.cli.main.main in a fresh argv), so the matrix is cheap
    code = ("import sys, json, io, contextlib\n"
            "from replay.cli.main import main\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            rc = main(argv)\n"
            "        except SystemExit as e:\n"
            "            rc = e.code\n"
            "        except BaseException as e:\n"
            "            import traceback; traceback.print_exc(file=err); rc = 'raised'\n"
            "    out.append([argv, rc, err.getvalue()])\n"
            "print(json.dumps(out))\n")
    import json
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    bad = []
    for argv, rc, err in json.loads(res.stdout.splitlines()[-1]):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        msgs = [ln for ln in lines if not ln.startswith("usage:") and not ln.startswith("  ") and
                not ln.startswith("replay: warning:")]
        ok = (rc in (1, 2) and "Traceback" not in err and len(msgs) == 1
              and msgs[0].split(":")[0].startswith("replay"))
        if not ok:
            bad.append((argv, rc, err[-600:]))
    assert not bad, "\n\n".join(f"{a}: exit {rc}\n{e}" for a, rc, e in bad)
    assert _hashes(rec) == before
    assert not (rec / "leak.parquet").exists() and not (tmp_path / "leak.csv").exists()
