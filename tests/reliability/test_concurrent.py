"""Readers while four writer processes append: no reader error, counts only ever grow.

Four processes record ranks 0-3 of one recording with tiny segments (rotations and
manifest updates all the time). Meanwhile one reader keeps a recording open and
refreshes it, another opens it afresh each time, and a third runs ``replay sql`` as
a separate process. Every count any of them sees is at least the one it saw before;
no reader fails; no live writer is salvaged; at the end every row is there.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from replay import open_recording

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

WRITERS = 4
STEPS = 40
PER_STEP = 5

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from replay import Recorder
    root, rank, steps, per_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(rank)
    with Recorder(root, rank=rank, segment_bytes=4096, batch_rows=4, flush_interval_s=0.01) as rec:
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        for step in range(steps):
            rec.event("step_start", step=step)
            for i in range(per_step):
                rid = f"k{rank}-s{step}-{i}"
                rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2], output_ids=rng.integers(0, 99, 12),
                            logprobs=-rng.random(12))
                rec.trainer(step=step, request_id=rid, logprobs=-rng.random(12))
            rec.flush()
            time.sleep(0.05)
""")

QUERIES = {
    "rollouts": "SELECT count(*) FROM rollouts",
    "events": "SELECT count(*) FROM events",
    "tokens": "SELECT count(*) FROM tokens",
    "scored": "SELECT count(lp_trainer) FROM tokens",
}


class Monotonic:
    """Counts seen by one reader; each must be >= the last one."""

    def __init__(self, name: str):
        self.name, self.last, self.reads = name, {}, 0

    def see(self, counts: dict) -> None:
        for k, v in counts.items():
            assert v >= self.last.get(k, 0), f"{self.name}: {k} went from {self.last[k]} to {v}"
        self.last = counts
        self.reads += 1


def _counts(rec) -> dict:
    return {k: rec.sql(q).fetchall()[0][0] for k, q in QUERIES.items()}


def test_readers_during_four_writers(tmp_path, faults):
    root = tmp_path / "shared"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(r), str(STEPS), str(PER_STEP)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(WRITERS)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        errors: list[str] = []
        stop = threading.Event()
        cli = Monotonic("replay sql")

        def cli_reader() -> None:
            while not stop.is_set():
                r = subprocess.run([str(Path(sys.executable).parent / "replay"), "sql", str(root),
                                    "SELECT count(*) FROM rollouts", "--format", "json"],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    errors.append(f"replay sql exit {r.returncode}: {r.stderr.strip()}")
                    return
                try:
                    cli.see({"rollouts": json.loads(r.stdout)["rows"][0][0]})
                except AssertionError as e:
                    errors.append(str(e))
                    return

        t = threading.Thread(target=cli_reader)
        t.start()
        kept, fresh = Monotonic("refresh"), Monotonic("fresh open")
        with open_recording(root) as rec:
            while any(p.poll() is None for p in procs) or kept.reads < 3:
                rec.refresh()
                kept.see(_counts(rec))
                with open_recording(root) as again:
                    fresh.see(_counts(again))
                    assert not again.salvaged, "a live writer was salvaged"
        stop.set()
        t.join(120)
        assert not errors, errors
        for p in procs:
            assert p.wait(30) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with open_recording(root) as rec:
        final = _counts(rec)
        info = rec.info()
    assert info["status"] == "complete" and len(info["ranks"]) == WRITERS
    assert final["rollouts"] == WRITERS * STEPS * PER_STEP
    assert final["scored"] == final["tokens"] == WRITERS * STEPS * PER_STEP * 12
    for m in (kept, fresh, cli):
        assert m.reads >= 3, f"{m.name} read only {m.reads} times while the writers ran"
        assert m.last["rollouts"] <= final["rollouts"]
    rotations = sum(r["closed_segments"] for r in info["ranks"])  # each one raced the readers
    faults.add(trials=kept.reads + fresh.reads + cli.reads, faults=rotations)
    print(f"reads: refresh {kept.reads}, fresh {fresh.reads}, replay sql {cli.reads}; "
          f"segments closed meanwhile: {rotations}")


KILLED = textwrap.dedent("""
    import os, signal, sys
    from replay import Recorder
    rec = Recorder(sys.argv[1], segment_bytes=4096, batch_rows=4, flush_interval_s=0.01)
    for step in range(30):
        for i in range(5):
            rec.rollout(step=step, request_id=f"s{step}-{i}", prompt_ids=[1], output_ids=[1, 2, 3],
                        logprobs=[-1.0, -1.0, -1.0])
        rec.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")

OPENER = textwrap.dedent("""
    import json, sys
    from replay import open_recording
    print("ready", flush=True)  # imported: waiting for the signal to open
    sys.stdin.readline()  # open together
    with open_recording(sys.argv[1], salvage=True) as rec:
        n = rec.sql("SELECT count(*), count(DISTINCT request_id) FROM rollouts").fetchall()[0]
        print(json.dumps({"rows": n[0], "distinct": n[1], "status": rec.info()["status"]}))
""")


def test_readers_salvaging_one_dead_writer_at_once(tmp_path, faults):
    """Four processes open a killed writer's recording at the same moment: one salvages,
    all read every flushed row once, and the manifest lists each closed segment once."""
    root = tmp_path / "dead"
    r = subprocess.run([sys.executable, "-c", KILLED, str(root)], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:  # each has imported replay and waits: the opens that follow are concurrent
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert all(o == {"rows": 150, "distinct": 150, "status": "salvaged"} for o in outs), outs
    man = json.loads((root / "manifest.json").read_text())
    paths = [s["path"] for segs in man["ranks"]["0"]["segments"].values() for s in segs]
    assert len(paths) == len(set(paths)) and not list(root.rglob("*.arrows"))
    faults.add(trials=4, faults=1)
