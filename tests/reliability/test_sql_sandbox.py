"""A query over a recording reads the recording's views and nothing else: no file written or read,
no database attached, no extension installed or loaded, the settings locked — through the command
line, the Python API (connection and cursors) and the TUI's query path — and the recording's files
are byte for byte what they were."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from replay import Recorder, open_recording
from replay.errors import ReplayError

ESCAPES = [
    "COPY (SELECT 1) TO '{root}/manifest.json' (FORMAT csv)",
    "COPY rollouts TO '{root}/../leak.parquet' (FORMAT parquet)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "ATTACH '{root}/../other.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
]


@pytest.fixture
def recording(tmp_path) -> Path:
    root = tmp_path / "rec"
    with Recorder(root, run_config={"model": "x"}) as rec:
        for i in range(3):
            rec.rollout(step=0, request_id=f"r{i}", prompt_ids=[1, 2], output_ids=[3, 4], logprobs=[-0.5, -0.1])
            rec.trainer(step=0, request_id=f"r{i}", weight_version=0, logprobs=[-0.4, -0.2])
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("query", ESCAPES)
def test_python_api_refuses_every_escape(recording, query):
    before = _hashes(recording)
    with open_recording(recording) as rec:
        with pytest.raises(ReplayError) as err:
            rec.sql(query.format(root=recording))
        assert "disabled by configuration" in str(err.value) or "locked" in str(err.value) \
            or "extension" in str(err.value).lower()
        cur = rec.cursor()   # another thread's cursor: the same locked database
        with pytest.raises(duckdb.Error):
            cur.sql(query.format(root=recording)).fetchall()
        assert rec.sql("SELECT count(*) FROM tokens").fetchall() == [(6,)]
        rec.refresh()       # re-registering the views still works under the lock
        assert rec.sql("SELECT count(*) FROM sequences").fetchall() == [(3,)]
    assert _hashes(recording) == before
    assert not (recording.parent / "leak.parquet").exists() and not (recording.parent / "other.db").exists()


@pytest.mark.parametrize("query", ESCAPES[:3] + ESCAPES[5:7])
def test_command_line_refuses_with_one_line(recording, query):
    before = _hashes(recording)
    proc = subprocess.run([sys.executable, "-m", "replay", "sql", str(recording), query.format(root=recording)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("replay: sql error:") and "tables and views only" in line[0]
    assert _hashes(recording) == before


def test_tui_query_path_is_the_same_sandbox(recording):
    from tui.data import Workspace

    ws = Workspace(recording)
    try:
        with pytest.raises(ReplayError, match="disabled by configuration.*reads its tables and views only"):
            ws.run_sql(f"COPY (SELECT 1) TO '{recording}/manifest.json' (FORMAT csv)")
        cols, rows, _, _, _ = ws.run_sql("SELECT count(*) AS n FROM run.tokens")
        assert cols == ["n"] and rows == [(6,)]
    finally:
        ws.close()


def _tiny(root: Path) -> Path:
    with Recorder(root) as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[2, 3], logprobs=[-0.5, -0.25])
        rec.trainer(step=0, request_id="a", weight_version=0, logprobs=[-0.5, -0.5])
    return root


@pytest.mark.parametrize("name", ["order", "select", "group", "full", "from"])
def test_a_folder_named_like_an_sql_keyword_is_a_recording_like_any_other(tmp_path, name):
    root = _tiny(tmp_path / name)
    with open_recording(root) as r:
        assert r.names == [name] and r.info()["tokens"] == 2
        assert r.sql(f'SELECT n_tokens FROM "{name}".step_metrics').fetchall() == [(2,)]
    for argv in (["info", str(root)], ["sql", str(root), "SELECT n_tokens FROM step_metrics"]):
        out = subprocess.run([sys.executable, "-m", "replay", *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_two_keyword_folders_in_one_query(tmp_path):
    a, b = _tiny(tmp_path / "order"), _tiny(tmp_path / "select")
    out = subprocess.run([sys.executable, "-m", "replay", "sql", str(a), str(b), "--format", "csv",
                          'SELECT x.n_tokens + y.n_tokens FROM "order".step_metrics x JOIN "select".step_metrics y '
                          "USING (step)"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[1] == "4", out.stderr


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_out_exports_the_result_outside_the_recording(recording, tmp_path, suffix):
    """``--out`` is the one way a query writes: the file holds exactly the query's rows (lists
    kept, as JSON text in CSV), the recording is unchanged, and a target inside it is refused."""
    import csv
    import json

    import pyarrow.parquet as pq

    from replay.cli.main import main

    before = _hashes(recording)
    out = tmp_path / f"res{suffix}"
    q = "SELECT request_id, output_ids, logprobs FROM rollouts ORDER BY request_id"
    assert main(["sql", str(recording), q, "--out", str(out)]) == 0
    with open_recording(recording) as r:
        want = [list(row) for row in r.sql(q).fetchall()]
    if suffix == ".parquet":
        got = [list(r.values()) for r in pq.read_table(out).to_pylist()]
    elif suffix == ".csv":
        rows = list(csv.reader(out.open()))
        assert rows[0] == ["request_id", "output_ids", "logprobs"]
        got = [[a, json.loads(b), json.loads(c)] for a, b, c in rows[1:]]
    elif suffix == ".json":
        got = [list(r.values()) for r in json.loads(out.read_text())]
    else:
        got = [list(json.loads(line).values()) for line in out.read_text().splitlines()]
    assert got == [[a, b, pytest.approx(c)] for a, b, c in want] and len(got) == 3
    assert main(["sql", str(recording), q, "--out", str(recording / f"leak{suffix}")]) == 1
    assert not (recording / f"leak{suffix}").exists() and _hashes(recording) == before
