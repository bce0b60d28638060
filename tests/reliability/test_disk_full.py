"""A disk that refuses writes: the run goes on (lenient) or is told at once (strict).

The writer runs in a child process that, after a first phase of rows that fit, limits
the size of every file it writes with ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so a write
past the limit fails with EFBIG, as a full disk fails with ENOSPC). Rows, weight
blobs, segment rotations and manifest updates then fail. Lenient mode: the training
loop runs to its end and exits 0, ``stats()`` counts the errors and the lost rows, the
log says what failed, and everything of the first phase reads back on reopen. Strict
mode: the next call raises :class:`~replay.errors.RecordingError`.

Where the test process may mount a small tmpfs (root, or a user namespace), the same
runs go to a truly full disk (ENOSPC), and the full disk stays full while the
recording is reopened: reading must not need free space.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from replay import open_recording

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent("""
    import json, logging, resource, signal, sys
    import numpy as np
    from replay import Recorder
    from replay.errors import ReplayError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    rng = np.random.default_rng(0)
    rec = Recorder(root, strict=mode == "strict", segment_bytes=8192, flush_interval_s=0.01, batch_rows=4)
    for step in range(5):  # phase 1: everything fits
        for i in range(4):
            rec.rollout(step=step, request_id=f"a{step}-{i}", prompt_ids=[1, 2, 3],
                        output_ids=rng.integers(0, 50, 16), logprobs=-rng.random(16))
        rec.metrics(step=step, values={"loss": step / 10})
        rec.flush()
    rec.weights(version=0, step=0, state_dict={"w": np.arange(64, dtype=np.float32)})
    rec.flush()
    print(json.dumps({"phase1": rec.stats()["rows"]}), flush=True)
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    raised, done = None, 0
    for step in range(5, 25):  # phase 2: every batch and blob is past the limit
        try:
            rec.rollout(step=step, request_id=f"b{step}", prompt_ids=[1],
                        output_ids=rng.integers(0, 2**31 - 1, 8192), logprobs=-rng.random(8192))
            if step % 5 == 0:
                rec.weights(version=step, step=step,
                            state_dict={"w": rng.standard_normal(20000).astype(np.float32)}, delta=True)
            rec.event("step_end", step=step)
            rec.flush()
        except ReplayError as e:
            raised = {"type": type(e).__name__, "title": e.title, "msg": str(e), "step": step}
            break
        done += 1
    stats = rec.stats()
    close_error = None
    try:
        rec.close()
    except ReplayError as e:
        close_error = str(e)
    print(json.dumps({"done": done, "raised": raised, "stats": stats, "close_error": close_error}),
          flush=True)
""")


def run_child(tmp_path, mode: str, limit: int, root=None):
    root = root or tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run([sys.executable, str(script), str(root), mode, str(limit)],
                       capture_output=True, text=True, timeout=90)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return r, root, lines


def check_phase1(root):
    """Everything written before the disk filled up reads back."""
    with open_recording(root, salvage=True) as rec:
        ids = {r[0] for r in rec.sql("SELECT request_id FROM rollouts").fetchall()}
        assert {f"a{s}-{i}" for s in range(5) for i in range(4)} <= ids
        assert rec.sql("SELECT count(*) FROM metrics").fetchall()[0][0] >= 5
        assert np.array_equal(rec.load_weights(0, framework="numpy")["w"], np.arange(64, dtype=np.float32))
        info = rec.info()
    assert info["status"] in ("complete", "salvaged")
    return info


@pytest.mark.parametrize("limit", [16384, 700], ids=["segments-and-blobs-fail", "manifest-fails-too"])
def test_lenient_run_goes_on_and_keeps_what_it_wrote(tmp_path, faults, limit):
    r, root, lines = run_child(tmp_path, "lenient", limit)
    assert r.returncode == 0, r.stderr[-3000:]
    phase1, end = lines
    assert end["done"] == 20 and end["raised"] is None and end["close_error"] is None
    st = end["stats"]
    assert st["errors"] > 0, st
    assert st["dropped_rows"] > 0, st
    assert "File too large" in r.stderr  # the log says what failed ...
    assert "goes on with what it can" in r.stderr or "the run goes on" in r.stderr  # ... and that the run goes on
    info = check_phase1(root)
    faults.add(trials=1, faults=st["errors"])
    if limit == 700:  # the manifest could not be updated on close: the reader salvages the rank
        assert info["status"] == "salvaged"


def test_strict_run_is_told_by_the_next_call(tmp_path, faults):
    r, root, lines = run_child(tmp_path, "strict", 16384)
    assert r.returncode == 0, r.stderr[-3000:]
    end = lines[-1]
    raised = end["raised"]
    assert raised is not None and raised["type"] == "RecordingError", end
    assert raised["title"] == "recording failed" and "File too large" in raised["msg"]
    assert raised["step"] <= 6, "the failure is reported by the next call, not much later"
    check_phase1(root)
    faults.add(trials=1, faults=max(1, end["stats"]["errors"]))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); RLIMIT_FSIZE tests cover it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_a_full_disk(tmp_path, tiny_disk, faults, mode):
    r, root, lines = run_child(tmp_path, mode, 0, root=tiny_disk / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    end = lines[-1]
    if mode == "lenient":
        assert end["done"] == 20 and end["raised"] is None and end["close_error"] is None
        assert end["stats"]["errors"] > 0
        assert "No space left on device" in r.stderr
    else:
        assert end["raised"] is not None and end["raised"]["type"] == "RecordingError", end
        assert "No space left on device" in end["raised"]["msg"]
    st = os.statvfs(tiny_disk)
    assert st.f_bavail * st.f_frsize < 64 << 10, "the disk is still (nearly) full while we read"
    check_phase1(root)
    faults.add(trials=1, faults=max(1, end["stats"]["errors"]))
