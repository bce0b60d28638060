"""Damaged files made by the real recorder: truncated, bytes flipped, ranges zeroed.

Hypothesis picks a file of a real recording — a closed segment, an open stream of a
killed writer, ``manifest.json``, a weight blob (full or XOR delta) — and a damage.
A probe process (:func:`faultkit.probe`) then runs ``doctor`` (read-only), opens the
recording (salvaging), counts every table and view, asks ``info`` and loads every
weight version. The outcome must be a clear :class:`~replay.errors.ReplayError` or a
read (with a salvage report counting what was skipped); never another exception, a
crash of the probe process, or a hang (each probe has a deadline). Damage to a closed
segment or a weight blob must moreover be *noticed*: by an error, or by ``doctor``
(the manifest keeps each segment's sha256; blobs are content-addressed).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultkit import LineProcess
from replay import Recorder

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

PROBE_TIMEOUT_S = 20  # a probe slower than this is a hang
EXAMPLES = 32         # per kind of file
VERSIONS = [0, 1, 2]


def _write(rec: Recorder, steps: range) -> None:
    rng = np.random.default_rng(steps.start)
    for step in steps:
        rec.event("step_start", step=step)
        for i in range(3):
            rid = f"s{step}-{i}"
            rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2, 3], output_ids=rng.integers(0, 500, 10),
                        logprobs=-rng.random(10), token_versions=[step] * 10, reward=float(i))
            rec.trainer(step=step, request_id=rid, logprobs=-rng.random(10), weight_version=step)
            rec.topk(step=step, request_id=rid, source="engine", ids=rng.integers(0, 500, (10, 2)),
                     logprobs=-rng.random((10, 2)))
        rec.metrics(step=step, values={"loss": step * 0.1})
        rec.flush()


def _weights(v: int) -> dict:
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    w[v] += 1
    return {"w": w}


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_corrupt import _write
    from replay import Recorder
    rec = Recorder(sys.argv[1], batch_rows=4, flush_interval_s=0.01)  # every table left open
    _write(rec, range(4))
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two real recordings: ``closed`` (complete, with weight blobs) and ``killed``
    (its writer SIGKILLed, open streams left), and the files hypothesis may damage."""
    base = tmp_path_factory.mktemp("pristine")
    closed = base / "closed"
    with Recorder(closed, segment_bytes=3000, batch_rows=4) as rec:
        _write(rec, range(4))
        for v in VERSIONS:
            rec.weights(version=v, step=v, state_dict=_weights(v), delta=v > 0)
    killed = base / "killed"
    r = subprocess.run([sys.executable, "-c", KILLED, str(killed), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    files = {
        "segment": sorted(p.relative_to(base) for p in closed.rglob("*.arrow")),
        "stream": sorted(p.relative_to(base) for p in killed.rglob("*.arrows")),
        "manifest": [Path("closed/manifest.json"), Path("killed/manifest.json")],
        "blob": sorted(p.relative_to(base) for p in closed.glob("weights/blobs/*.zst")),
    }
    assert all(files.values()) and len(files["stream"]) == 5, files
    assert any(".xor-" in p.name for p in files["blob"])
    from faultkit import probe
    with tempfile.TemporaryDirectory() as d:  # what the undamaged killed recording reads as
        shutil.copytree(killed, Path(d) / "killed")
        intact = probe(str(Path(d) / "killed"), [])
    return base, files, intact["counts"]


@pytest.fixture(scope="module")
def prober(tmp_path_factory):
    proc = LineProcess("probe_server", tmp_path_factory.mktemp("probe") / "probe.log")
    holder = {"proc": proc}
    yield holder
    holder["proc"].close()


def run_probe(prober, root: Path) -> dict:
    proc = prober["proc"]
    proc.send({"root": str(root), "versions": VERSIONS})
    try:
        line = proc.readline(PROBE_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as e:
        # restart it for the next example, then fail this one
        log = proc.log_path
        proc.proc.kill()
        proc.close()
        prober["proc"] = LineProcess("probe_server", log.with_name(log.name + ".1"))
        pytest.fail(f"the probe hung or crashed on {root}: {e}")
    import json
    return json.loads(line)


def damage(data: bytes, kind: str, at: float, span: float, mask: int) -> bytes:
    """``data`` truncated at, flipped at, or zeroed from the fraction ``at`` of its length."""
    i = min(int(at * len(data)), max(0, len(data) - 1))
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
    n = max(1, int(span * len(data)))
    return data[:i] + b"\0" * len(data[i:i + n]) + data[i + n:]


DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "zero"]), st.floats(0, 1), st.floats(0, 0.5),
                   st.integers(1, 255))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _is_error(x) -> bool:
    return isinstance(x, list) and x[0] in ("ReplayError", "RecordingError", "BadInput")


def check_damage(pristine, prober, faults, kind: str, which: int, how: tuple) -> None:
    base, files, intact = pristine
    rel = files[kind][which % len(files[kind])]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / rel.parts[0]
        shutil.copytree(base / rel.parts[0], root)
        target = Path(d) / rel
        before = target.read_bytes()
        after = damage(before, *how)
        target.write_bytes(after)
        out = run_probe(prober, root)
    assert "unexpected" not in out, f"{rel} {how[0]}: not a ReplayError:\n{out['unexpected']}"
    assert out["open"] == "ok" or _is_error(out["open"]), out
    assert "error" not in out["doctor"] or out["doctor"]["error"][0] in ("ReplayError", "RecordingError"), out
    query_errors = [c for c in out.get("counts", {}).values() if isinstance(c, list)]
    for err in query_errors:  # a damaged segment met by a query: DuckDB says which view failed
        assert err[0] == "duckdb.Error" and "\n" not in err[2].strip() and "failed" in err[2], err
    for v, res in out["weights"].items():
        assert res == "ok" or _is_error(res), (v, res)
    faults.add(trials=1, faults=int(after != before))
    if after == before:
        return
    noticed = (out["open"] != "ok" or query_errors or "error" in out["doctor"] or not out["doctor"]["ok"]
               or any(r != "ok" for r in out["weights"].values()))
    if kind in ("segment", "blob"):
        assert noticed, f"damage to {rel} ({how}) went unnoticed: {out}"
    if kind == "stream" and out["open"] == "ok":
        salvage = out["salvage"]
        assert salvage is not None and salvage["streams"] >= 1, out
        if how[0] == "truncate":  # a prefix of the stream: never more rows than it had
            assert all(out["counts"][t] <= intact[t] for t in ("events", "rollouts", "trainer")), out


@SETTINGS
@given(which=st.integers(0, 1000), how=DAMAGE)
def test_damaged_closed_segment(pristine, prober, faults, which, how):
    check_damage(pristine, prober, faults, "segment", which, how)


@SETTINGS
@given(which=st.integers(0, 1000), how=DAMAGE)
def test_damaged_open_stream_of_a_killed_writer(pristine, prober, faults, which, how):
    check_damage(pristine, prober, faults, "stream", which, how)


@SETTINGS
@given(which=st.integers(0, 1), how=DAMAGE)
def test_damaged_manifest(pristine, prober, faults, which, how):
    check_damage(pristine, prober, faults, "manifest", which, how)


@SETTINGS
@given(which=st.integers(0, 1000), how=DAMAGE)
def test_damaged_weight_blob(pristine, prober, faults, which, how):
    check_damage(pristine, prober, faults, "blob", which, how)
