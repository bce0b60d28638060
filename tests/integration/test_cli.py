"""The `replay` command line: info, sql, doctor; formats, exit codes, one-line errors."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.ipc as pa_ipc
import pytest

from replay import Recorder, __version__
from replay.cli.main import COMMANDS, build_parser, main
from replay.schema import segment_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "run-a"
    with Recorder(root, run_config={"model": "tiny", "steps": 2}, rank=0, strict=True) as rec:
        for step in range(2):
            for i in range(3):
                n = 2 + i
                rec.rollout(step=step, request_id=f"s{step}r{i}", prompt_ids=[1, 2, 3],
                            output_ids=list(range(n)), logprobs=[-0.5] * n, token_versions=[step] * n,
                            reward=float(i))
                rec.trainer(step=step, request_id=f"s{step}r{i}", logprobs=[-0.25] * n, weight_version=step)
        rec.weights(version=0, step=0, state_dict={"w": np.ones(4, np.float32)})
    return root


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _proc(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "replay", *argv], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


# ---------------------------------------------------------------- info

def test_info_in_three_formats(run, capsys):
    code, out, _ = _cli(capsys, "info", str(run), "--format", "json")
    info = json.loads(out)
    assert code == 0 and info["status"] == "complete" and info["rollouts"] == 6 and info["tokens"] == 18
    assert info["steps"] == {"count": 2, "min": 0, "max": 1} and info["run_config"]["steps"] == 2
    code, out, _ = _cli(capsys, "info", str(run))
    lines = {ln.split("  ")[0].strip(): ln.split()[-1] for ln in out.splitlines() if ln.strip()}
    assert code == 0 and lines["status"] == "complete" and lines["tokens"] == "18" and lines["run_id"] == "run-a"
    assert "ranks:" in out
    code, out, _ = _cli(capsys, "info", str(run), "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and rows[0] == ["key", "value"]
    kv = dict(rows[1:])
    assert kv["tokens"] == "18" and kv["steps.max"] == "1" and kv["ranks.0.status"] == "complete"


# ---------------------------------------------------------------- sql

def test_sql_in_three_formats(run, capsys):
    q = "SELECT step, n_sequences, n_tokens, mean_abs_log_ratio FROM step_metrics ORDER BY step"
    code, out, _ = _cli(capsys, "sql", str(run), q, "--format", "json")
    res = json.loads(out)
    assert code == 0 and res["columns"] == ["step", "n_sequences", "n_tokens", "mean_abs_log_ratio"]
    assert res["types"][0] == "BIGINT" and res["rows"] == [[0, 3, 9, 0.25], [1, 3, 9, 0.25]]
    code, out, _ = _cli(capsys, "sql", str(run), q, "--format", "csv")
    assert code == 0 and out.splitlines() == ["step,n_sequences,n_tokens,mean_abs_log_ratio",
                                              "0,3,9,0.25", "1,3,9,0.25"]
    code, out, _ = _cli(capsys, "sql", str(run), q)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["step", "n_sequences", "n_tokens", "mean_abs_log_ratio"]
    assert lines[2].split() == ["0", "3", "9", "0.25"] and lines[-1] == "(2 rows)"
    assert len({len(ln) for ln in lines[:4]}) == 1  # aligned


def test_sql_table_cuts_long_lists_and_rows(run, capsys):
    code, out, _ = _cli(capsys, "sql", str(run), "SELECT range(100) AS xs, request_id FROM rollouts",
                        "--max-rows", "4")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 + 4 + 1 and "… +94" in lines[2] and "more rows" in lines[-1]
    code, out, _ = _cli(capsys, "sql", str(run), "SELECT output_ids FROM rollouts WHERE request_id = 's0r2'",
                        "--format", "csv")
    assert out.splitlines()[1] == '"[0, 1, 2, 3]"'
    code, out, _ = _cli(capsys, "sql", str(run), "SELECT 'nan'::DOUBLE AS x, NULL AS y", "--format", "json")
    assert json.loads(out)["rows"] == [["nan", None]]


def test_sql_over_several_recordings_and_from_a_file(run, tmp_path, capsys):
    other = tmp_path / "run-b"
    with Recorder(other, rank=0) as rec:
        rec.rollout(step=0, request_id="x", prompt_ids=[1], output_ids=[1], logprobs=[-1.0])
    q = "SELECT (SELECT count(*) FROM run_a.tokens), (SELECT count(*) FROM run_b.tokens)"
    code, out, _ = _cli(capsys, "sql", str(run), str(other), q, "--format", "csv")
    assert code == 0 and out.splitlines()[1] == "18,1"
    qf = tmp_path / "q.sql"
    qf.write_text("SELECT count(*) AS n FROM a.rollouts, b.rollouts")
    code, out, _ = _cli(capsys, "sql", str(run), str(other), "--file", str(qf), "--names", "a,b",
                        "--format", "json")
    assert code == 0 and json.loads(out)["rows"] == [[6]]
    code, out, _ = _cli(capsys, "sql", str(run), "--format", "csv", str(other), q)  # options in between
    assert code == 0 and out.splitlines()[1] == "18,1"


# ---------------------------------------------------------------- doctor

def test_doctor_on_a_healthy_recording(run, capsys):
    for fmt in ("json", "table", "csv"):
        code, out, _ = _cli(capsys, "doctor", str(run), "--format", fmt)
        assert code == 0, out
        if fmt == "json":
            rep = json.loads(out)
            assert rep["ok"] and rep["problems"] == [] and rep["counts"]["closed_segments"] == 3
            assert rep["counts"]["rows"] == 13 and rep["counts"]["weight_blobs"] == 1
        elif fmt == "table":
            assert "no problems found" in out
        else:
            assert out.splitlines() == ["path,reason,repaired"]


def test_doctor_finds_and_repairs_damage(run, capsys):
    seg = segment_path(run, "trainer", 0, 0, open_=False)
    seg.write_bytes(seg.read_bytes()[:-40])  # torn closed segment
    roll = segment_path(run, "rollouts", 0, 0, open_=False)
    data = bytearray(roll.read_bytes())
    blob = next((run / "weights" / "blobs").glob("*.zst"))
    blob.write_bytes(blob.read_bytes()[:-8])  # corrupt weight blob
    code, out, _ = _cli(capsys, "doctor", str(run), "--no-repair", "--format", "json")
    rep = json.loads(out)
    assert code == 1 and not rep["ok"]
    reasons = {p["path"]: p["reason"] for p in rep["problems"]}
    assert "not a readable Arrow file" in reasons["trainer/rank-0000/part-00000.arrow"]
    assert any("weight version 0" in r for r in reasons.values())
    assert seg.exists()
    code, out, _ = _cli(capsys, "doctor", str(run), "--format", "json")
    rep = json.loads(out)
    fixed = [p for p in rep["problems"] if p["repaired"]]
    assert code == 1 and fixed and fixed[0]["path"] == "trainer/rank-0000/part-00000.arrow"
    assert not seg.exists() and seg.with_name(seg.name + ".corrupt").exists()
    assert [p for p in rep["problems"] if not p["repaired"]][0]["path"].startswith("weights/blobs/")
    code, out, _ = _cli(capsys, "sql", str(run), "SELECT count(*) FROM trainer", "--format", "csv")
    assert code == 0 and out.splitlines()[1] == "0"  # opens again; the torn segment is set aside
    # a closed segment changed after it was closed
    data[-30] ^= 0xFF
    roll.write_bytes(bytes(data))
    code, out, _ = _cli(capsys, "doctor", str(run), "--no-repair", "--format", "json")
    reasons = {p["path"]: p["reason"] for p in json.loads(out)["problems"]}
    assert "rollouts/rank-0000/part-00000.arrow" in reasons


# ---------------------------------------------------------------- exit codes and errors

@pytest.mark.slow  # seven subprocesses
def test_exit_codes_and_one_line_errors(run, tmp_path):
    ok = _proc("sql", str(run), "SELECT 1 AS one", "--format", "csv")
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["one", "1"] and ok.stderr == ""
    bad_sql = _proc("sql", str(run), "SELECT nope FROM rollouts")
    assert bad_sql.returncode == 1 and bad_sql.stdout == ""
    assert bad_sql.stderr.startswith("replay: sql error: ") and bad_sql.stderr.count("\n") == 1
    assert "Traceback" not in bad_sql.stderr
    usage = _proc("sql", str(run))
    assert usage.returncode == 2 and "query" in usage.stderr
    assert _proc("info", str(run), "--format", "xml").returncode == 2
    assert _proc("frobnicate").returncode == 2
    missing = _proc("info", str(tmp_path / "nope"))
    assert missing.returncode == 1 and missing.stderr.strip() == \
        f"replay: not a recording: {tmp_path / 'nope'} does not exist"
    version = _proc("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"replay {__version__} (recording schema v1)"


def test_corrupt_manifest_and_newer_schema_exit_1_with_a_reason(run, tmp_path):
    man = run / "manifest.json"
    good = man.read_text()
    man.write_text(good[: len(good) // 2])
    r = _proc("info", str(run))
    assert r.returncode == 1 and r.stderr.startswith("replay: corrupt manifest: ") and r.stderr.count("\n") == 1
    newer = json.loads(good)
    newer["schema_version"] = 2
    man.write_text(json.dumps(newer))
    for argv in (("info", str(run)), ("sql", str(run), "SELECT 1"), ("doctor", str(run))):
        r = _proc(*argv)
        assert r.returncode == 1 and r.stderr.startswith("replay: recording too new: "), r.stderr
        assert "schema_version 2" in r.stderr and "upgrade" in r.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("replay")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not installed)")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("replay ")


def test_optional_commands_are_listed_and_a_missing_one_fails_alone(run, capsys, monkeypatch):
    sub_help = build_parser(["info"]).format_help()
    for name in ("info", "sql", "doctor", *COMMANDS):
        assert name in sub_help
    monkeypatch.setitem(COMMANDS, "ghost", ("replay.no_such_module", "a command whose module is gone"))
    code, out, err = _cli(capsys, "ghost", "--anything")
    assert code == 1 and err.startswith("replay: command unavailable: ") and "replay.no_such_module" in err
    assert "ghost" in build_parser(["info"]).format_help()
    code, out, _ = _cli(capsys, "info", str(run), "--format", "json")
    assert code == 0 and json.loads(out)["rollouts"] == 6


def test_doctor_closes_streams_a_finished_writer_left(run, capsys):
    seg = segment_path(run, "rollouts", 0, 0, open_=False)
    stream = segment_path(run, "rollouts", 0, 1, open_=True)
    table = pa_ipc.open_file(str(seg)).read_all()
    with open(stream, "wb") as f:
        w = pa_ipc.new_stream(f, table.schema)
        w.write_table(table.slice(0, 2))
    code, out, _ = _cli(capsys, "doctor", str(run), "--no-repair", "--format", "json")
    rep = json.loads(out)
    assert code == 1 and rep["problems"][0]["path"] == "rollouts/rank-0000/part-00001.arrows"
    code, out, _ = _cli(capsys, "doctor", str(run), "--format", "json")
    rep = json.loads(out)
    assert code == 0 and rep["problems"][0]["repaired"] and not stream.exists()
    assert stream.with_suffix(".arrow").exists()
    code, out, _ = _cli(capsys, "doctor", str(run), "--no-repair", "--format", "json")
    rep = json.loads(out)
    assert code == 0 and rep["problems"] == [] and rep["status"] == "complete" and rep["counts"]["rows"] == 15
