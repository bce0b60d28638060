"""The recorder across processes: kill -9, two ranks at once, a disk that refuses writes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from replay.store.manifest import writer_alive
from replay.schema import SCHEMAS


def read_segments(root: Path, table: str, rank: int = 0) -> pa.Table:
    """Rows of every segment: .arrow files, and .arrows streams (complete batches) without a file."""
    parts = []
    for p in sorted((root / table / f"rank-{rank:04d}").glob("part-*.arrow*")):
        if p.suffix == ".arrow":
            parts.append(pa.ipc.open_file(str(p)).read_all())
        elif not p.with_suffix(".arrow").exists():
            reader = pa.ipc.open_stream(str(p))
            batches = []
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError):
                    break  # a batch cut by the kill
            parts.append(pa.Table.from_batches(batches, schema=SCHEMAS[table]))
    return pa.concat_tables(parts) if parts else SCHEMAS[table].empty_table()


def run_script(tmp_path: Path, body: str, *args: str, **popen) -> subprocess.Popen:
    script = tmp_path / f"child_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


ROLLOUT = "dict(prompt_ids=list(range(16)), output_ids=list(range(100, 164)), logprobs=[-0.5] * 64)"


def test_kill_9_keeps_every_flushed_rollout(tmp_path):
    root = tmp_path / "run"
    child = run_script(tmp_path, f"""
        import sys
        from replay import Recorder
        rec = Recorder(sys.argv[1], flush_interval_s=0.01, batch_rows=5)
        step = 0
        while True:
            for i in range(12):
                rec.rollout(step=step, request_id=f"s{{step}}-{{i}}", **{ROLLOUT})
            rec.event("step_end", step=step)
            rec.flush()
            print(step, flush=True)
            step += 1
    """, str(root))
    flushed = -1
    try:
        while flushed < 6:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            flushed = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    streams = list((root / "rollouts" / "rank-0000").glob("*.arrows"))
    assert streams and not list((root / "rollouts" / "rank-0000").glob("*.arrow"))
    got = set(read_segments(root, "rollouts").column("request_id").to_pylist())
    want = {f"s{s}-{i}" for s in range(flushed + 1) for i in range(12)}
    assert want <= got
    assert set(read_segments(root, "events").column("step").to_pylist()) >= set(range(flushed + 1))
    man = json.loads((root / "manifest.json").read_text())
    assert man["ranks"]["0"]["status"] == "recording"
    assert not writer_alive(root, 0)


RANK_CHILD = f"""
    import sys
    from replay import Recorder
    path, rank = sys.argv[1], int(sys.argv[2])
    with Recorder(path, run_config={{"world": 2}}, rank=rank, segment_bytes=6000) as rec:
        for step in range(10):
            rec.event("step_start", step=step)
            for i in range(6):
                rec.rollout(step=step, request_id=f"rank{{rank}}-s{{step}}-{{i}}", **{ROLLOUT})
            rec.metrics(step=step, values={{"reward": float(rank)}})
            rec.flush()
    print("done", flush=True)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_two_ranks_record_into_one_path_at_once(tmp_path, attempt):
    root = tmp_path / f"run-{attempt}"
    kids = [run_script(tmp_path, RANK_CHILD, str(root), str(rank)) for rank in (0, 1)]
    for k in kids:
        out, err = k.communicate(timeout=120)
        assert k.returncode == 0 and out.strip() == "done", err
    man = json.loads((root / "manifest.json").read_text())
    assert set(man["ranks"]) == {"0", "1"} and man["status"] == "complete"
    assert man["run_config"] == {"world": 2} and man["run_id"] == root.name
    for rank in (0, 1):
        entry = man["ranks"][str(rank)]
        assert entry["status"] == "complete" and entry["counts"]["rollouts"] == 60
        listed = entry["segments"]["rollouts"]
        on_disk = sorted(p.relative_to(root).as_posix()
                         for p in (root / "rollouts" / f"rank-{rank:04d}").iterdir())
        assert sorted(s["path"] for s in listed) == on_disk and len(on_disk) > 1
        for s in listed:
            assert hashlib.sha256((root / s["path"]).read_bytes()).hexdigest() == s["sha256"]
        t = read_segments(root, "rollouts", rank)
        assert t.num_rows == 60 and set(t.column("rank").to_pylist()) == {rank}
        assert all(r.startswith(f"rank{rank}-") for r in t.column("request_id").to_pylist())
        assert read_segments(root, "metrics", rank).column("value").to_pylist() == [float(rank)] * 10
    assert not list(root.rglob("*.arrows"))


FULL_DISK_CHILD = f"""
    import json, resource, signal, sys
    from replay import Recorder, RecordingError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    strict = sys.argv[2] == "strict"
    raised = None
    rec = Recorder(sys.argv[1], strict=strict, batch_rows=10)
    try:
        for step in range(30):
            for i in range(10):
                rec.rollout(step=step, request_id=f"s{{step}}-{{i}}", **{ROLLOUT})
            rec.flush()
    except RecordingError as e:
        raised = type(e).__name__
    try:
        rec.close()
    except RecordingError as e:
        raised = raised or type(e).__name__
    print(json.dumps({{"stats": rec.stats(), "raised": raised}}), flush=True)
"""


def test_full_disk_never_raises_in_lenient_mode(tmp_path):
    root = tmp_path / "run"
    child = run_script(tmp_path, FULL_DISK_CHILD, str(root), "lenient")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    res = json.loads(out)
    stats = res["stats"]
    assert res["raised"] is None
    assert stats["errors"] > 0 and stats["dropped_rows"] > 0
    assert stats["rows"]["rollouts"] + stats["dropped_rows"] == 300
    assert "File too large" in err or "EFBIG" in err or "errno 27" in err.lower()
    kept = read_segments(root, "rollouts")
    assert kept.num_rows == stats["rows"]["rollouts"] > 0  # everything counted as written is readable


def test_full_disk_raises_on_the_next_call_in_strict_mode(tmp_path):
    child = run_script(tmp_path, FULL_DISK_CHILD, str(tmp_path / "run"), "strict")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    res = json.loads(out)
    assert res["raised"] == "RecordingError" and res["stats"]["errors"] > 0


def test_another_process_adds_a_rank_while_rank_0_records(tmp_path):
    """A second process opens rank 1 of a path whose rank 0 is live; both keep their rows."""
    from replay import Recorder

    root = tmp_path / "run"
    with Recorder(root, rank=0) as rec:
        rec.rollout(step=0, request_id="parent", **eval(ROLLOUT))
        kid = run_script(tmp_path, RANK_CHILD, str(root), "1")
        out, err = kid.communicate(timeout=120)
        assert kid.returncode == 0, err
        rec.rollout(step=1, request_id="parent-after", **eval(ROLLOUT))
    assert read_segments(root, "rollouts", 0).column("request_id").to_pylist() == ["parent", "parent-after"]
    assert read_segments(root, "rollouts", 1).num_rows == 60
    assert os.path.exists(root / "rank-0001.lock")
