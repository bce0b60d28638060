"""Salvage: writers killed with SIGKILL mid-run leave recordings that still open whole."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from replay import open_recording
from replay.store.doctor import doctor
from replay.store.manifest import read_manifest, writer_alive
from replay.store.segments import read_stream

# A training process: rank `rank` records `steps` steps of 4 rollouts (token counts 1..4)
# and their trainer scores, flushing after each step, then queues one more rollout it
# never flushes and waits to be killed.
CHILD = r"""
import sys, time
from replay import Recorder
root, rank, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rec = Recorder(root, run_config={"model": "tiny"}, rank=rank, batch_rows=100000,
               batch_tokens=10**9, flush_interval_s=1000)
for step in range(steps):
    for i in range(4):
        n = i + 1
        rid = f"r{rank}-{step}-{i}"
        rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2], output_ids=[10 + i] * n,
                    logprobs=[-0.5] * n, token_versions=[step] * n, reward=float(i))
        rec.trainer(step=step, request_id=rid, logprobs=[-0.25] * n, weight_version=step)
    rec.event("step_end", step=step)
    rec.flush()
    print(f"flushed {step}", flush=True)
rec.rollout(step=steps, request_id="never-flushed", prompt_ids=[1], output_ids=[1], logprobs=[-1.0])
print("ready", flush=True)
time.sleep(120)
"""


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(root: Path, rank: int, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(rank), str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_ready(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait for the writer's "ready" line (a thread reads, so nothing blocks past the timeout)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")] + [lines.put("")],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line.strip() == "ready":
            return
        if not line:
            raise AssertionError(f"writer exited early: {proc.stderr.read()}")
    raise AssertionError("writer not ready in time")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()


def _killed_run(root: Path, ranks=(0,), steps: int = 3) -> None:
    procs = [_start(root, r, steps) for r in ranks]
    try:
        for p in procs:
            _wait_ready(p)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    for r in ranks:
        assert not writer_alive(root, r)


def test_reading_a_dead_writer_in_place_writes_nothing(tmp_path):
    """info, sql and the Python API read a killed writer's open segments as they are: every
    flushed row, the dead writer named, and not one byte of the recording changed."""
    import hashlib

    root = tmp_path / "run"
    _killed_run(root, steps=3)

    def hashes():
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    before = hashes()
    with open_recording(root) as rec:
        info = rec.info()
        assert (info["rollouts"], info["trainer_rows"], info["tokens"]) == (12, 12, 30)
        assert info["status"] == "recording" and info["salvage"] is None
        assert any("writer is gone" in w and "replay doctor" in w for w in info["warnings"])
    for argv in (["info", str(root), "--format", "json"], ["sql", str(root), "SELECT count(*) FROM rollouts"]):
        out = subprocess.run([sys.executable, "-m", "replay", *argv], capture_output=True, text=True,
                             env=_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        assert "writer is gone" in out.stderr or "writer is gone" in out.stdout
    assert hashes() == before
    assert read_manifest(root)["status"] == "recording" and list(root.glob("*/rank-0000/*.arrows"))


def test_sigkilled_writer_is_salvaged_with_every_flushed_batch(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, steps=3)
    streams = sorted(root.glob("*/rank-0000/*.arrows"))
    assert streams and not list(root.glob("*/rank-0000/*.arrow"))
    assert read_manifest(root)["status"] == "recording"
    with open_recording(root, salvage=True) as rec:
        info = rec.info()
        assert info["status"] == "salvaged" and rec.salvaged
        assert info["salvage"]["ranks"] == [0] and info["salvage"]["in_memory"] is False
        assert info["salvage"]["streams"] == len(streams) and info["salvage"]["skipped_bytes"] == 0
        assert (info["rollouts"], info["trainer_rows"], info["tokens"]) == (12, 12, 30)
        assert rec.sql("SELECT count(*) FROM rollouts WHERE request_id = 'never-flushed'").fetchall() == [(0,)]
        assert rec.sql("SELECT step, n_tokens, mean_abs_log_ratio FROM step_metrics ORDER BY step"
                       ).fetchall() == [(s, 10, 0.25) for s in range(3)]
    man = read_manifest(root)
    entry = man["ranks"]["0"]
    assert man["status"] == "salvaged" and entry["status"] == "salvaged"
    assert {t: [s["rows"] for s in v] for t, v in entry["segments"].items()} == \
        {"rollouts": [12], "trainer": [12], "events": [3]}
    assert not list(root.glob("**/*.arrows"))
    report = doctor(root, repair=False)
    assert report["ok"] and report["counts"]["closed_segments"] == 3, report
    # a second open finds nothing more to do
    with open_recording(root, salvage=True) as rec:
        assert rec.info()["salvage"] is None and rec.info()["status"] == "salvaged"


def test_torn_tail_is_skipped_and_counted(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, steps=2)
    stream = root / "rollouts" / "rank-0000" / "part-00000.arrows"
    with open(stream, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x40\x00\x00\x00" + b"\x00" * 20)  # a batch header cut short
    with open_recording(root, salvage=True) as rec:
        info = rec.info()
        assert info["rollouts"] == 8 and info["salvage"]["skipped_bytes"] == 28


def test_replay_info_prints_status_salvaged(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, steps=1)
    out = subprocess.run([sys.executable, "-m", "replay", "info", str(root), "--salvage", "--format", "json"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["status"] == "salvaged" and info["rollouts"] == 4
    out = subprocess.run([sys.executable, "-m", "replay", "info", str(root), "--salvage"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0 and any(line.split() == ["status", "salvaged"] for line in out.stdout.splitlines())


def test_two_ranks_from_two_processes_are_both_counted(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, ranks=(0, 1), steps=2)
    with open_recording(root, salvage=True) as rec:
        assert rec.sql("SELECT rank, count(*), sum(token_id) FROM tokens GROUP BY rank ORDER BY rank"
                       ).fetchall() == [(0, 20, 2 * (10 + 22 + 36 + 52)), (1, 20, 2 * (10 + 22 + 36 + 52))]
        assert sorted(r["rank"] for r in rec.info()["ranks"]) == [0, 1]
        assert rec.info()["salvage"]["ranks"] == [0, 1]
    assert {k: v["status"] for k, v in read_manifest(root)["ranks"].items()} == {"0": "salvaged", "1": "salvaged"}


def test_a_live_writer_is_read_not_salvaged(tmp_path):
    root = tmp_path / "run"
    proc = _start(root, 0, 2)
    try:
        _wait_ready(proc)
        with open_recording(root, salvage=True) as rec:
            info = rec.info()
            assert info["status"] == "recording" and info["salvage"] is None
            assert info["rollouts"] == 8 and info["open_segments"] == 3
        assert list(root.glob("rollouts/rank-0000/*.arrows"))
        assert read_manifest(root)["ranks"]["0"]["status"] == "recording"
    finally:
        _kill(proc)


def test_salvage_false_leaves_the_folder_alone(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, steps=1)
    before = sorted(p.name for p in root.rglob("*"))
    with open_recording(root, salvage=False) as rec:
        info = rec.info()
        assert info["status"] == "recording" and info["rollouts"] == 4
        assert any("writer is gone" in w for w in info["warnings"])
    assert sorted(p.name for p in root.rglob("*")) == before


@contextlib.contextmanager
def _read_only(path: Path):
    """Make ``path`` unwritable, even for root (immutable flag), or skip."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)


def test_read_only_folder_is_salvaged_in_memory(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, steps=2)
    stream = root / "trainer" / "rank-0000" / "part-00000.arrows"
    with open(stream, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10")  # a continuation marker, then a cut length
    with _read_only(root):
        with open_recording(root, salvage=True) as rec:
            info = rec.info()
            assert info["status"] == "salvaged" and info["salvage"]["in_memory"] is True
            assert "read-only" in info["salvage"]["reason"]
            assert info["salvage"]["rows"] == 8 + 8 + 2 and info["salvage"]["skipped_bytes"] == 5
            assert rec.sql("SELECT count(*) FROM tokens WHERE lp_trainer IS NOT NULL").fetchall() == [(20,)]
        assert read_manifest(root)["status"] == "recording"
        assert read_stream(stream).rows == 8


STREAMER = r"""
import sys, time
from replay import Recorder
rec = Recorder(sys.argv[1], rank=0, segment_bytes=4000, flush_interval_s=1000, batch_rows=100000)
step = 0
while True:
    for i in range(3):
        rec.rollout(step=step, request_id=f"{step}-{i}", prompt_ids=[1], output_ids=[i] * 8, logprobs=[-1.0] * 8)
    rec.flush()
    if step == 0:
        print("ready", flush=True)
    step += 1
    time.sleep(0.005)
"""


def test_refresh_follows_a_writer_that_rotates_segments(tmp_path):
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STREAMER, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    seen = []
    try:
        _wait_ready(proc)
        with open_recording(root, salvage=True) as rec:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                rec.refresh()
                n, = rec.sql("SELECT count(*) FROM tokens").fetchall()[0]
                steps, = rec.sql("SELECT count(DISTINCT step) FROM rollouts").fetchall()[0]
                assert n == 24 * steps  # whole steps only: a flush writes one batch
                seen.append(n)
    finally:
        _kill(proc)
    assert seen == sorted(seen) and seen[-1] > seen[0]
    assert len(list(root.glob("rollouts/rank-0000/*.arrow"))) >= 2  # it did rotate meanwhile
    with open_recording(root, salvage=True) as rec:
        n, = rec.sql("SELECT count(*) FROM tokens").fetchall()[0]
        assert rec.info()["status"] == "salvaged" and n >= seen[-1] and n % 24 == 0


def test_doctor_salvages_a_killed_writer(tmp_path):
    root = tmp_path / "run"
    _killed_run(root, ranks=(0, 1), steps=1)
    report = doctor(root, repair=False)
    assert not report["ok"] and report["problems"][0]["path"] == "rank-0000, rank-0001"
    assert report["status"] == "recording" and list(root.glob("**/*.arrows"))
    report = doctor(root)
    assert report["ok"] and report["status"] == "salvaged" and report["counts"]["salvaged_ranks"] == 2
    assert "salvaged 18 rows in 6 batches" in report["problems"][0]["reason"]  # 2 x (4 + 4 + 1 event)
    assert not list(root.glob("**/*.arrows"))
    assert doctor(root, repair=False)["problems"] == []


def test_doctor_removes_temporary_files_of_interrupted_writes(tmp_path, capsys):
    """``*.tmp`` files (an atomic replace never reached) are reported, kept while a writer is
    alive, and removed by repair once none is; the recording's rows are untouched."""
    from replay import Recorder
    from replay.cli.main import main as cli_main

    root = tmp_path / "run"
    with Recorder(root, rank=0) as rec:
        rec.event("run_start", step=0)
    leftovers = [root / "manifest.json.4242.tmp", root / "events" / "rank-0000" / ".seg-000001.arrow.tmp"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    with Recorder(root, rank=1, mode="append"):
        live = doctor(root)
        assert live["ok"] and live["notes"] == [] and live["counts"]["tmp_files"] == 2
        assert all(p.exists() for p in leftovers)
    report = doctor(root, repair=False)
    assert report["ok"] and report["problems"] == [] and sorted(n["path"] for n in report["notes"]) == sorted(
        p.relative_to(root).as_posix() for p in leftovers)
    assert "interrupted write (7 bytes" in report["notes"][0]["reason"] and all(p.exists() for p in leftovers)
    assert cli_main(["doctor", str(root), "--no-repair"]) == 0
    assert "no problems found" in capsys.readouterr().out
    report = doctor(root)
    assert report["ok"] and all(n["repaired"] for n in report["notes"]) and len(report["notes"]) == 2
    assert not any(p.exists() for p in leftovers)
    assert doctor(root, repair=False)["notes"] == []
    with open_recording(root, salvage=True) as rec:
        assert rec.sql("SELECT count(*) FROM events").fetchall()[0][0] == 1


REPLAY_CHILD = r"""
import sys, time
from replay import Recorder
from replay.rerun.replayer import REPLAY_RANK
rec = Recorder(sys.argv[1], rank=REPLAY_RANK, mode="append", flush_interval_s=1000)
for i in range(3):
    rec.replay(step=0, request_id=f"r0-0-{i}", engine_config="cfg", config="{}", engine="reference",
               mode="score", replay_id="x", logprobs=[-0.5] * (i + 1), output_ids=[10 + i] * (i + 1))
rec.flush()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_replay_writer_does_not_change_the_runs_status(tmp_path):
    """A replayer appending replays to a finished run (its own writer rank) leaves the run
    ``complete`` while it writes, and when it is killed: its flushed rows are salvaged and
    read, its rank alone says ``salvaged``."""
    from replay.rerun.replayer import REPLAY_RANK

    from replay import Recorder

    root2 = tmp_path / "done"
    with Recorder(root2, run_config={"model": "tiny"}) as rec:
        rec.rollout(step=0, request_id="r0-0-0", prompt_ids=[1], output_ids=[10], logprobs=[-0.5])
    proc = subprocess.Popen([sys.executable, "-c", REPLAY_CHILD, str(root2)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_ready(proc)
        assert writer_alive(root2, REPLAY_RANK) and read_manifest(root2)["status"] == "complete"
        with open_recording(root2, salvage=True) as rec:
            assert rec.info()["status"] == "complete"
    finally:
        _kill(proc)
    with open_recording(root2, salvage=True) as rec:
        assert rec.info()["status"] == "complete"
        assert rec.sql("SELECT count(*) FROM replays").fetchall()[0][0] == 3
    ranks = read_manifest(root2)["ranks"]
    assert [r["status"] for k, r in sorted(ranks.items())] == ["complete", "salvaged"]
