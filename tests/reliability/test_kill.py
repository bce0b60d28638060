"""SIGKILL of a writer at random moments: every flushed batch survives, every recording opens.

Each trial forks a fresh writer (see :mod:`faultkit`) that records one of three
scenarios — tiny segments rotating all the time (stream -> file, manifest update),
a weight version stored as an XOR delta every step, and every table followed by a
close — and kills it with SIGKILL after a random delay. Then the recording must open
(salvaging the dead writer), hold every row of every step the writer reported as
flushed, exactly once, with weight versions that load bit for bit; ``replay info``
must succeed, and a second open must see the same rows.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from faultkit import SCENARIOS, ForkServer, read_progress, request_id, weights_of
from replay import Recorder, open_recording
from replay.cli.main import main as cli_main
from replay.store.doctor import doctor

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

KILLS = 50            # trials go on (the scenarios in turn) until this many SIGKILLs hit a live writer
MAX_TRIALS = 100      # ... or this many trials
MIN_DELAY_S = 0.01    # a kill lands uniformly in [MIN_DELAY_S, max delay] after the fork
# max delay per scenario: "mixed" closes after a few steps, so its kills also land in close
MAX_DELAY_S = {"rotate": 0.3, "weights": 0.3, "mixed": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("forkserver") / "server.log")
    yield srv
    srv.close()


def _counts(rec) -> dict:
    return {t: rec.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("rollouts", "trainer", "topk", "metrics", "events", "weights")}


def check_recording(root: Path, scenario: str, last: int | None, closed: bool, total: int) -> dict:
    """Assert what a killed (or finished) writer must have left; returns the row counts."""
    sc = SCENARIOS[scenario]
    flushed = -1 if last is None else last
    with open_recording(root, salvage=True) as rec:
        ids = [r[0] for r in rec.sql("SELECT request_id FROM rollouts").fetchall()]
        assert len(ids) == len(set(ids)), f"duplicate rollouts in {root}"
        want = {request_id(s, i) for s in range(flushed + 1) for i in range(sc["per_step"])}
        missing = want - set(ids)
        assert not missing, f"{len(missing)} flushed rollouts lost, e.g. {sorted(missing)[:3]}"
        ends = {r[0] for r in rec.sql("SELECT step FROM events WHERE kind = 'step_end'").fetchall()}
        assert set(range(flushed + 1)) <= ends
        seqs = [r[0] for r in rec.sql("SELECT seq FROM events").fetchall()]
        assert len(seqs) == len(set(seqs)), "an event was recorded twice"
        if sc["trainer"]:
            tr = {r[0] for r in rec.sql("SELECT request_id FROM trainer").fetchall()}
            assert want <= tr
            topk = rec.sql("SELECT count(*) FROM topk").fetchall()[0][0]
            assert topk >= len(want) * sc["tokens"]
            steps = {r[0] for r in rec.sql("SELECT step FROM metrics WHERE name = 'loss'").fetchall()}
            assert set(range(flushed + 1)) <= steps
        if sc["weights_every"]:
            for v in range(0, flushed + 1, sc["weights_every"]):
                got = rec.load_weights(v, framework="numpy")
                exp = weights_of(v)
                assert set(got) == set(exp) and all(np.array_equal(got[k], exp[k]) for k in exp)
        info = rec.info()
        counts = _counts(rec)
    if closed:
        assert info["status"] == "complete"
        assert counts["rollouts"] == total * sc["per_step"]
    else:
        assert info["status"] in ("salvaged", "complete"), info["status"]
    return counts


def test_sigkill_at_random_moments_loses_no_flushed_batch(server, tmp_path, faults, capsys):
    rng = random.Random(20261126)
    names = list(SCENARIOS)
    kills = finished = before_start = in_close = 0
    t0 = time.monotonic()
    trial = -1
    while kills < KILLS:
        trial += 1
        assert trial < MAX_TRIALS, f"only {kills} of {trial} trials killed a live writer"
        scenario = names[trial % len(names)]
        root = tmp_path / f"t{trial:03d}-{scenario}"
        progress = tmp_path / f"t{trial:03d}.progress"
        pid = server.start(root=str(root), scenario=scenario, seed=trial, progress=str(progress))
        time.sleep(rng.uniform(MIN_DELAY_S, MAX_DELAY_S[scenario]))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = server.wait(30)
        assert code in (0, -signal.SIGKILL), f"trial {trial}: the writer failed on its own (exit {code})"
        total, last, closed = read_progress(progress)
        if not (root / "manifest.json").exists():
            before_start += 1  # killed before the recording existed: nothing was given yet
            assert last is None
            continue
        if code == -signal.SIGKILL:
            kills += 1
            in_close += int(last is not None and last == total - 1 and not closed)
        else:
            finished += 1
            assert closed
        first = check_recording(root, scenario, last, closed, total)
        capsys.readouterr()
        assert cli_main(["info", str(root), "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["status"] in ("salvaged", "complete") and out["rollouts"] == first["rollouts"]
        assert check_recording(root, scenario, last, closed, total) == first  # reopening changes nothing
        rep = doctor(root, repair=False)  # every segment listed, every sha256 and blob right
        assert rep["ok"], (trial, rep["problems"])
        if trial % 10 == 9:  # a salvaged rank goes on with mode="append"
            with Recorder(root, mode="append", flush_interval_s=0.01) as rec:
                rec.rollout(step=10 ** 6, request_id="after", prompt_ids=[1], output_ids=[2], logprobs=[-1.0])
            with open_recording(root) as rec:
                assert _counts(rec)["rollouts"] == first["rollouts"] + 1
                assert rec.info()["status"] == "complete"
    faults.add(trials=trial + 1, faults=kills)
    print(f"kill trials: {trial + 1}, SIGKILLs: {kills}, finished before the kill: {finished}, "
          f"killed after the last flush (in close): {in_close}, "
          f"killed before the recording existed: {before_start}, {time.monotonic() - t0:.1f} s")


READER = """
import sys
from replay import open_recording
print("ready", flush=True)
root = sys.stdin.readline().strip()
with open_recording(root, salvage=True) as rec:
    rec.sql("SELECT count(*) FROM rollouts").fetchall()
print("done", flush=True)
"""
READER_TRIALS = 8


def test_sigkill_of_a_reader_in_the_middle_of_a_salvage(server, tmp_path, faults):
    """The reader that salvages a dead writer is killed at a random moment: the next
    reader finishes the salvage, every flushed row is there once, doctor finds nothing."""
    import shutil
    import subprocess
    import sys

    pristine = tmp_path / "pristine"
    progress = tmp_path / "pristine.progress"
    pid = server.start(root=str(pristine), scenario="weights", seed=7, progress=str(progress))  # streams stay open
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    assert server.wait(30) == -signal.SIGKILL
    total, last, _ = read_progress(progress)
    print(f"salvage trials over {last} flushed steps")
    assert last is not None and list(pristine.rglob("*.arrows"))
    readers = [subprocess.Popen([sys.executable, "-c", READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(READER_TRIALS)]
    rng = random.Random(7)
    kills = 0
    try:
        for k, proc in enumerate(readers):
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            root = tmp_path / f"r{k:02d}"
            shutil.copytree(pristine, root)
            proc.stdin.write(f"{root}\n")
            proc.stdin.flush()
            time.sleep(rng.uniform(0.0, 0.15))
            proc.kill()
            kills += int(proc.wait(30) == -signal.SIGKILL and proc.stdout.read() != "done\n")
            check_recording(root, "weights", last, False, total)
            rep = doctor(root, repair=False)
            assert rep["ok"], rep["problems"]
    finally:
        for proc in readers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    faults.add(trials=READER_TRIALS, faults=kills)
    assert kills >= READER_TRIALS // 3, "most readers must be killed before they finished"
