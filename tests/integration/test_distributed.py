"""Recordings beyond one process: ranks written by separate processes, read back by
plain pyarrow (no replay import), and opened through pyarrow.fs filesystems."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest

from replay import open_recording
from replay.errors import RecordingError
from replay.schema import SCHEMAS

RANKS, STEPS, PER_STEP = 4, 5, 6

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from replay import Recorder

    root, rank = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(rank)
    # small segments and batches: several closed segments per rank and table
    with Recorder(root, run_config={"ranks": 4}, rank=rank, segment_bytes=4096, batch_rows=4) as rec:
        for step in range(5):
            rec.event("step_start", step=step)
            for i in range(6):
                rid = f"s{step}-k{rank}-r{i}"
                n = int(rng.integers(1, 40))
                lp = -rng.exponential(0.5, n).astype(np.float32)
                rec.rollout(step=step, request_id=rid, prompt_ids=rng.integers(0, 50, 3, dtype=np.int32),
                            output_ids=rng.integers(0, 50, n, dtype=np.int32), logprobs=lp,
                            token_versions=np.full(n, max(0, step - rank % 2), np.int64),
                            reward=float(i % 2))
                if i == 5:
                    continue  # never scored
                if i == 0:  # scored twice: the later scoring counts
                    rec.trainer(step=step, request_id=rid, logprobs=np.full(n, -9.0, np.float32),
                                weight_version=step)
                    rec.flush()
                rec.trainer(step=step, request_id=rid, weight_version=step,
                            logprobs=np.minimum(lp + rng.normal(0, 0.3, n).astype(np.float32), 0),
                            entropy=rng.uniform(0, 2, n).astype(np.float32))
            rec.metrics(step=step, values={"loss": 0.1 * step})
            rec.event("step_end", step=step)
""")

# Reads the recording with pyarrow alone, as another engine's worker would.
READER = textwrap.dedent("""
    import json, math, sys
    from collections import defaultdict
    from pathlib import Path
    import pyarrow.dataset as ds

    root = Path(sys.argv[1])

    def table(name, columns):
        files = sorted(str(p) for p in (root / name).glob("rank-*/part-*.arrow"))
        return ds.dataset(files, format="ipc").to_table(columns=columns).to_pylist()

    rollouts = table("rollouts", ["step", "request_id", "output_ids", "logprobs", "reward"])
    trainer = table("trainer", ["step", "request_id", "weight_version", "rank", "time_ns", "logprobs"])
    latest = {}

    def newer(t):  # newest weights, then lowest rank, then that rank's latest row
        return (t["weight_version"] is not None, t["weight_version"] or 0, -t["rank"], t["time_ns"])

    for t in trainer:
        key = (t["step"], t["request_id"])
        if key not in latest or newer(t) > newer(latest[key]):
            latest[key] = t
    steps = defaultdict(lambda: {"n_sequences": 0, "reward": 0.0, "n_tokens": 0, "abs": 0.0, "kl": 0.0})
    for r in rollouts:
        s = steps[r["step"]]
        s["n_sequences"] += 1
        s["reward"] += r["reward"]
        t = latest.get((r["step"], r["request_id"]))
        if t is None:
            continue
        for lr, lt in zip(r["logprobs"], t["logprobs"]):
            x = float(lt) - float(lr)
            s["n_tokens"] += 1
            s["abs"] += abs(x)
            s["kl"] += math.exp(x) - 1 - x
    out = {"rollouts": len(rollouts), "trainer_rows": len(trainer),
           "tokens": sum(len(r["output_ids"]) for r in rollouts),
           "steps": {str(k): {"n_sequences": v["n_sequences"], "reward": v["reward"] / v["n_sequences"],
                              "n_tokens": v["n_tokens"], "mean_abs_log_ratio": v["abs"] / v["n_tokens"],
                              "kl_new_old": v["kl"] / v["n_tokens"]} for k, v in steps.items()},
           "replay_imported": any(m == "replay" or m.startswith("replay.") for m in sys.modules)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory) -> Path:
    """A recording whose ranks 0..3 were written at the same time by four processes."""
    root = tmp_path_factory.mktemp("shared") / "run"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(k)], stderr=subprocess.PIPE, text=True)
             for k in range(RANKS)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return root


def _metrics(rec) -> dict[int, dict]:
    rel = rec.sql("SELECT * FROM step_metrics ORDER BY step")
    return {row[0]: dict(zip(rel.columns, row)) for row in rel.fetchall()}


def test_ranks_from_separate_processes_form_one_recording(multi_rank):
    with open_recording(multi_rank) as rec:
        info = rec.info()
        per_rank = rec.sql("SELECT rank, count(*) FROM rollouts GROUP BY rank ORDER BY rank").fetchall()
    assert info["status"] == "complete" and [r["rank"] for r in info["ranks"]] == list(range(RANKS))
    assert all(r["closed_segments"] > 3 for r in info["ranks"])  # small segments rotated
    assert per_rank == [(k, STEPS * PER_STEP) for k in range(RANKS)]


def test_plain_pyarrow_reader_agrees_with_open_recording(multi_rank):
    p = subprocess.run([sys.executable, "-c", READER, str(multi_rank)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["replay_imported"] is False
    with open_recording(multi_rank) as rec:
        info = rec.info()
        metrics = _metrics(rec)
    assert (got["rollouts"], got["trainer_rows"], got["tokens"]) == \
        (info["rollouts"], info["trainer_rows"], info["tokens"])
    assert got["trainer_rows"] == RANKS * STEPS * (PER_STEP - 1 + 1)  # one unscored, one scored twice
    assert sorted(int(s) for s in got["steps"]) == sorted(metrics) == list(range(STEPS))
    for s, want in got["steps"].items():
        row = metrics[int(s)]
        assert row["n_sequences"] == want["n_sequences"] and row["n_tokens"] == want["n_tokens"]
        for k in ("reward", "mean_abs_log_ratio", "kl_new_old"):
            assert row[k] == pytest.approx(want[k], rel=1e-9), (s, k)


def _same_as_local(rec, local_info, local_metrics):
    info = rec.info()
    for k in ("rollouts", "tokens", "trainer_rows", "events", "metric_rows", "steps", "status", "run_id"):
        assert info[k] == local_info[k], k
    assert [r["rank"] for r in info["ranks"]] == list(range(RANKS))
    assert all(r["writer_alive"] is None for r in info["ranks"])
    got = _metrics(rec)
    assert sorted(got) == sorted(local_metrics)
    for s, row in got.items():
        for k, v in row.items():
            assert v == pytest.approx(local_metrics[s][k], rel=1e-9), (s, k)
    assert rec.sql("SELECT count(*) FROM tokens WHERE step = 2 AND request_id = 's2-k1-r0'").fetchall() == \
        [(local_tokens(local_info, rec),)]


def local_tokens(local_info, rec) -> int:
    with open_recording(local_info["path"]) as loc:
        return loc.sql("SELECT count(*) FROM tokens WHERE step = 2 AND request_id = 's2-k1-r0'").fetchall()[0][0]


@pytest.fixture(scope="module")
def local_view(multi_rank):
    with open_recording(multi_rank) as rec:
        return rec.info(), _metrics(rec)


def test_open_through_local_and_subtree_filesystems(multi_rank, local_view):
    with open_recording(multi_rank, filesystem=pafs.LocalFileSystem()) as rec:
        _same_as_local(rec, *local_view)
        assert rec.info()["bytes_on_disk"] == local_view[0]["bytes_on_disk"]
    sub = pafs.SubTreeFileSystem(str(multi_rank.parent), pafs.LocalFileSystem())
    with open_recording("run", filesystem=sub) as rec:
        assert rec.names == ["run"]
        _same_as_local(rec, *local_view)
    with open_recording(multi_rank.as_uri()) as rec:  # a file:// URI goes through pyarrow.fs too
        _same_as_local(rec, *local_view)


def _to_memory(root: Path, dest: str):
    """``root`` copied into a fresh fsspec in-memory filesystem, wrapped for pyarrow."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = MemoryFileSystem()
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    for p in sorted(root.rglob("*")):
        if p.is_file():
            mem.pipe(f"{dest}/{p.relative_to(root).as_posix()}", p.read_bytes())
    assert fsspec is not None
    return mem, PyFileSystem(FSSpecHandler(mem))


def test_open_through_fsspec_memory_filesystem_with_an_open_segment(multi_rank, local_view):
    mem, fs = _to_memory(multi_rank, "/bucket/run")
    with open_recording("/bucket/run", filesystem=fs) as rec:
        _same_as_local(rec, *local_view)
    # a node still recording: rank 7's open stream (two complete batches and a torn tail)
    sch = SCHEMAS["rollouts"]
    rows = [dict(step=9, request_id=f"live-{i}", rank=7, time_ns=i + 1, prompt_ids=[1], output_ids=[1, 2, 3],
                 logprobs=[-1.0, -1.0, -1.0]) for i in range(3)]
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, sch) as w:
        w.write_batch(pa.RecordBatch.from_pylist(rows[:2], schema=sch))
        w.write_batch(pa.RecordBatch.from_pylist(rows[2:], schema=sch))
    data = sink.getvalue().to_pybytes()
    mem.pipe("/bucket/run/rollouts/rank-0007/part-00000.arrows", data[:-20])  # last batch torn
    with open_recording("/bucket/run", filesystem=fs) as rec:
        info = rec.info()
        assert info["rollouts"] == local_view[0]["rollouts"] + 2
        assert info["open_segments"] == 1 and info["rows_in_open_segments"] == 2
        assert rec.sql("SELECT count(*) FROM tokens WHERE step = 9").fetchall() == [(6,)]
        assert any("rank-0007" in w for w in info["warnings"])


def test_missing_remote_recording_is_a_clear_error(tmp_path):
    with pytest.raises(RecordingError, match="does not exist"):
        open_recording("nowhere", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordingError, match="no manifest.json"):
        open_recording("empty", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))


def test_recordings_of_two_nodes_merge_per_node_results(multi_rank, local_view):
    """DuckDB on each node, then a merge: per-node sums of (n_tokens * mean) add up."""
    per_node = []
    for k in range(RANKS):  # each "node" sees only its own rank
        with open_recording(multi_rank) as rec:
            per_node += rec.sql(
                "SELECT step, count(*) AS n, sum(abs(log_ratio)) AS s FROM tokens "
                "WHERE rank = ? AND lp_trainer IS NOT NULL GROUP BY step", [k]).fetchall()
    merged: dict[int, list[float]] = {}
    for step, n, s in per_node:
        acc = merged.setdefault(step, [0, 0.0])
        acc[0] += n
        acc[1] += s
    metrics = local_view[1]
    for step, (n, s) in merged.items():
        assert n == metrics[step]["n_tokens"]
        assert s / n == pytest.approx(metrics[step]["mean_abs_log_ratio"], rel=1e-9)
    assert not math.isnan(sum(s for _, _, s in per_node))
