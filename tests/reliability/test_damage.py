"""Damaged recordings: every read command answers from intact data with the damage named, or
refuses, naming the segment and ``replay doctor``; reading writes nothing; ``doctor`` then
repairs to a consistent recording (exit 0 on every later run), and the rows lost are the
rows of the damaged segments only.

The recordings come from a loop written here (several segments per table, two ranks, a
weight version), not from the demo.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from replay import Recorder, open_recording
from replay.store.doctor import doctor
from replay.errors import RecordingError
from replay.store.manifest import listed_segments

STEPS, PER_STEP = 6, 4


def _write(root: Path) -> None:
    rng = np.random.default_rng(7)
    for rank in (0, 1):
        with Recorder(root, rank=rank, run_id="damage", run_config={"model": "tiny", "seed": 7},
                      segment_bytes=1500, batch_rows=PER_STEP) as rec:
            if rank == 0:
                rec.weights(version=0, step=0, state_dict={"w": np.arange(16, dtype=np.float32)})
            for step in range(STEPS):
                for i in range(PER_STEP):
                    rid = f"r{rank}-s{step}-{i}"
                    rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2, 3],
                                output_ids=rng.integers(0, 100, 6), logprobs=-rng.random(6),
                                token_versions=[0] * 6)
                    rec.trainer(step=step, request_id=rid, weight_version=0, logprobs=-rng.random(6))
                rec.flush()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage") / "run"
    _write(root)
    return root


@pytest.fixture
def rec(pristine, tmp_path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _counts(root: Path) -> dict[str, int]:
    with open_recording(root) as r:
        return {t: r.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("rollouts", "trainer")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``replay ARGS`` through the command line's own entry point, in this process (what a
    subprocess would print and return, without its start-up cost)."""
    import contextlib
    import io

    from replay.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(["replay", *args], code, out.getvalue(), err.getvalue())


def _listed(root: Path, table: str) -> list[tuple[str, int]]:
    man = json.loads((root / "manifest.json").read_text())
    return sorted((p, e["rows"]) for p, e in listed_segments(man).items() if p.startswith(table + "/"))


def _read_commands(root: Path) -> list[subprocess.CompletedProcess]:
    return [_cli("info", str(root), "--format", "json"),
            _cli("sql", str(root), "SELECT count(*) FROM rollouts", "--format", "csv")]


def _refused(root: Path, named: str) -> None:
    """Every read command refuses, naming the damage and doctor, and writes nothing."""
    before = _hashes(root)
    with pytest.raises(RecordingError) as e:
        open_recording(root)
    assert e.value.title in ("damaged recording", "corrupt manifest"), e.value
    assert named in str(e.value) and "replay doctor" in str(e.value), e.value
    for r in _read_commands(root):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr, r.stderr
    assert _hashes(root) == before, "a read command changed the recording"


def _repaired(root: Path) -> dict:
    """doctor repairs to a recording that opens cleanly, and says so on every later run."""
    r = _cli("doctor", str(root), "--format", "json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    assert rep["ok"] and all(p["repaired"] for p in rep["problems"]), rep
    again = doctor(root, repair=False)
    assert again["ok"] and not again["problems"], again["problems"]
    assert _cli("doctor", str(root)).returncode == 0
    with open_recording(root) as r2:
        assert not r2.info()["warnings"], r2.info()["warnings"]
    return rep


TOTAL = {"rollouts": 2 * STEPS * PER_STEP, "trainer": 2 * STEPS * PER_STEP}


def test_pristine_recording_has_several_segments_and_reads_whole(pristine):
    assert len(_listed(pristine, "rollouts")) >= 4  # so one damaged segment is a part, not the whole
    assert _counts(pristine) == TOTAL
    assert doctor(pristine, repair=False)["ok"]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_listed_segment_is_refused_then_set_aside(rec, faults, how):
    rel, rows = _listed(rec, "rollouts")[1]
    path = rec / rel
    data = bytearray(path.read_bytes())
    if how == "flip":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:
        path.unlink()
    _refused(rec, rel)
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == rows
    assert [p["path"] for p in rep["problems"] if p.get("rows_lost")] == [rel]
    assert _counts(rec) == {"rollouts": TOTAL["rollouts"] - rows, "trainer": TOTAL["trainer"]}
    if how != "delete":
        assert path.with_name(path.name + ".corrupt").exists()  # set aside, not deleted
    faults.add(faults=1)


def test_a_copied_segment_is_not_read_twice_and_doctor_sets_the_copy_aside(rec, faults):
    rel, _ = _listed(rec, "rollouts")[0]
    copy = (rec / rel).with_name("part-00099.arrow")
    shutil.copy(rec / rel, copy)
    before = _hashes(rec)
    with open_recording(rec) as r:   # answered from the listed segments only, the copy named
        assert r.sql("SELECT count(*) FROM rollouts").fetchall()[0][0] == TOTAL["rollouts"]
        warnings = r.info()["warnings"]
    assert any("part-00099.arrow" in w and "does not list" in w for w in warnings), warnings
    info = _cli("info", str(rec), "--format", "json")
    assert info.returncode == 0 and json.loads(info.stdout)["rollouts"] == TOTAL["rollouts"]
    sql = _cli("sql", str(rec), "SELECT count(*) FROM rollouts", "--format", "csv")
    assert sql.returncode == 0 and sql.stdout.splitlines()[1] == str(TOTAL["rollouts"])
    assert "part-00099.arrow" in sql.stderr  # the warning reaches the user of the command line too
    assert _hashes(rec) == before
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == 0 and copy.with_name(copy.name + ".duplicate").exists()
    assert _counts(rec) == TOTAL
    faults.add(faults=1)


def test_a_new_unlisted_segment_is_adopted(rec, faults):
    """A readable closed file no entry lists and no listed segment equals (a close whose
    manifest update was lost): not read until doctor adopts it, then read once."""
    rel, rows = _listed(rec, "trainer")[-1]
    man = json.loads((rec / "manifest.json").read_text())
    for entry in man["ranks"].values():
        entry["segments"]["trainer"] = [s for s in entry["segments"]["trainer"] if s["path"] != rel]
    (rec / "manifest.json").write_text(json.dumps(man))
    assert _counts(rec)["trainer"] == TOTAL["trainer"] - rows
    rep = _repaired(rec)
    assert any(p["path"] == rel and "adopted" in p["reason"] for p in rep["problems"]), rep
    assert rep["counts"]["rows_lost"] == 0 and _counts(rec) == TOTAL
    faults.add(faults=1)


@pytest.mark.parametrize("how", ["cut", "empty", "replaced", "deleted"])
def test_a_lost_manifest_is_rebuilt_from_the_segments(rec, tmp_path, faults, how):
    path = rec / "manifest.json"
    if how == "cut":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "replaced":  # another run's manifest, well formed
        other = tmp_path / "other"
        with Recorder(other, run_id="other") as r:
            r.rollout(step=0, request_id="x", prompt_ids=[1], output_ids=[2], logprobs=[-1.0])
        shutil.copy(other / "manifest.json", path)
    else:
        path.unlink()
    _refused(rec, "manifest.json")
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == 0
    assert _counts(rec) == TOTAL
    with open_recording(rec) as r:
        assert r.run_config() == {"model": "tiny", "seed": 7}  # the header survives in run.json
        assert r.info()["run_id"] == "damage" and r.info()["status"] == "salvaged"
        w = r.load_weights(0, framework="numpy")["w"]
    assert np.array_equal(w, np.arange(16, dtype=np.float32))
    if how != "deleted":
        assert (rec / "manifest.json.corrupt").exists()
    faults.add(faults=1)


@pytest.mark.parametrize("where", ["../elsewhere/part-00000.arrow", "/etc/passwd"])
def test_an_entry_outside_the_folder_is_refused_then_dropped(rec, faults, where):
    man = json.loads((rec / "manifest.json").read_text())
    man["ranks"]["0"]["segments"]["rollouts"].append({"path": where, "rows": 5, "sha256": "0" * 64})
    (rec / "manifest.json").write_text(json.dumps(man))
    _refused(rec, where)
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == 0 and _counts(rec) == TOTAL
    faults.add(faults=1)


def test_check_only_reports_and_changes_nothing(rec, faults):
    rel, _ = _listed(rec, "trainer")[0]
    (rec / rel).write_bytes((rec / rel).read_bytes()[:-50])
    before = _hashes(rec)
    r = _cli("doctor", str(rec), "--no-repair", "--format", "json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert any(p["path"] == rel and not p["repaired"] for p in rep["problems"]), rep
    assert not any("replay doctor" in p["reason"] for p in rep["problems"]), rep  # no circular advice
    assert _hashes(rec) == before
    faults.add(faults=1)


def _stream_copy(seg: Path) -> Path:
    """The open-stream twin of a closed segment (what its writer had before closing it)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    table = ipc.open_file(str(seg)).read_all()
    stream = seg.with_suffix(".arrows")
    with pa.OSFile(str(stream), "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    return stream


def _unlist(root: Path, rel: str) -> None:
    man = json.loads((root / "manifest.json").read_text())
    for entry in man["ranks"].values():
        for t, segs in entry["segments"].items():
            entry["segments"][t] = [s for s in segs if s["path"] != rel]
    (root / "manifest.json").write_text(json.dumps(man))


def test_an_unreadable_unlisted_file_beside_its_stream_loses_nothing(rec, faults):
    """A close whose manifest update failed (disk full) leaves the stream and an unlisted file:
    readers read the stream; doctor keeps the stream's rows even when the file is bad."""
    rel, rows = _listed(rec, "rollouts")[1]
    seg = rec / rel
    _stream_copy(seg)
    _unlist(rec, rel)
    seg.write_bytes(seg.read_bytes()[:100])
    assert _counts(rec) == TOTAL   # the stream is read
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == 0 and _counts(rec) == TOTAL
    assert not seg.with_suffix(".arrows").exists() and rel in dict(_listed(rec, "rollouts"))
    faults.add(faults=1)


def test_a_wrong_row_count_in_the_manifest_is_corrected_not_set_aside(rec, faults):
    rel, rows = _listed(rec, "trainer")[0]
    man = json.loads((rec / "manifest.json").read_text())
    for entry in man["ranks"].values():
        for s in entry["segments"].get("trainer", []):
            if s["path"] == rel:
                s["rows"] = rows + 5
    (rec / "manifest.json").write_text(json.dumps(man))
    rep = _repaired(rec)
    assert any(p["path"] == rel and "entry corrected" in p["reason"] for p in rep["problems"]), rep
    assert rep["counts"]["rows_lost"] == 0 and rep["counts"]["set_aside"] == 0
    assert dict(_listed(rec, "trainer"))[rel] == rows and _counts(rec) == TOTAL
    faults.add(faults=1)


def test_a_dead_writers_changed_file_is_replaced_by_its_stream(rec, faults):
    """The writer died after listing a file and before deleting its stream, and the file was then
    replaced by another valid segment: the salvage keeps the stream's rows, not the impostor."""
    (a, rows), (b, _) = _listed(rec, "rollouts")[:2]
    _stream_copy(rec / a)
    shutil.copy(rec / b, rec / a)          # readable, but not the bytes the manifest lists
    man = json.loads((rec / "manifest.json").read_text())
    man["ranks"]["0"]["status"] = "recording"   # its writer never closed (and holds no lock)
    (rec / "manifest.json").write_text(json.dumps(man))
    rep = _repaired(rec)
    assert rep["counts"]["rows_lost"] == 0
    assert _counts(rec) == TOTAL
    with open_recording(rec) as r:
        assert r.sql("SELECT count(*) - count(DISTINCT request_id) FROM rollouts").fetchall() == [(0,)]
    faults.add(faults=1)
