"""Hostile paths and schema versions.

Paths: readers list a recording's folder, never follow the manifest's segment paths,
so a manifest entry pointing outside (``../../etc/passwd``, an absolute path) is
never read, and ``doctor`` reports it. A weight blob path outside the recording
(``../x.zst``, absolute, a symlink that escapes) is refused with a RecordingError. A
symlinked table folder, rank folder or segment file that escapes the recording is
refused when the recording is opened (links that stay inside are fine).

Versions: the manifest's ``schema_version`` is the recording's version. Versions
start at 1: a newer one is refused ("recording too new", upgrade replay); 0, a
negative number or a non-integer is a corrupt manifest. "Older" data within v1 means
segments written before a column was added (here: rollouts without
``engine_config`` and ``num_cached_tokens``, the columns added last): they open, the
missing columns read as NULL. Segments with columns this version does not know
(written by a newer writer) open too, the extra columns kept.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from replay import Recorder, open_recording
from replay.cli.main import main as cli_main
from replay.store.doctor import doctor
from replay.errors import RecordingError
from replay.schema import SCHEMA_KEY, SCHEMAS, segment_path

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def rec_dir(tmp_path):
    root = tmp_path / "rec"
    with Recorder(root, strict=True) as rec:
        for step in range(3):
            rec.rollout(step=step, request_id=f"r{step}", prompt_ids=[1], output_ids=[2, 3], logprobs=[-1.0, -2.0])
        rec.weights(version=0, step=0, state_dict={"w": np.arange(4, dtype=np.float32)})
    return root


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _save(root, man):
    (root / "manifest.json").write_text(json.dumps(man))


def _outside_segment(tmp_path):
    """A valid rollouts segment outside the recording, holding 5 rows."""
    out = tmp_path / "outside" / "part-00000.arrow"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f, ipc.new_file(f, SCHEMAS["rollouts"]) as w:
        w.write_table(pa.Table.from_pylist(
            [dict(step=9, request_id=f"evil{i}", rank=0, time_ns=0, prompt_ids=[1], output_ids=[1], logprobs=[-1.0])
             for i in range(5)], schema=SCHEMAS["rollouts"]))
    return out


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "../outside/part-00000.arrow",
                                  "rollouts/rank-0000/../../../outside/part-00000.arrow"])
def test_manifest_segment_outside_is_never_read(rec_dir, tmp_path, faults, path):
    _outside_segment(tmp_path)
    man = _manifest(rec_dir)
    man["ranks"]["0"]["segments"].setdefault("rollouts", []).append({"path": path, "rows": 5, "sha256": "0" * 64})
    _save(rec_dir, man)
    with pytest.raises(RecordingError, match="outside the recording") as e:
        open_recording(rec_dir)  # refused, never read: the evil rows are not answered from
    assert e.value.title == "damaged recording" and "replay doctor" in str(e.value)
    rep = doctor(rec_dir, repair=False)
    assert not rep["ok"]
    assert any(p["path"] == path and "outside the recording" in p["reason"] for p in rep["problems"]), rep
    faults.add(faults=1)


@pytest.mark.parametrize("blob", ["../x.zst", "/tmp/x.zst", "weights/blobs/../../../x.zst", "..\\x.zst", "C:\\x.zst"])
def test_weight_blob_outside_is_refused(rec_dir, faults, blob, relist):
    seg = segment_path(rec_dir, "weights", 0, 0, open_=False)
    table = ipc.open_file(str(seg)).read_all()
    table = table.set_column(table.schema.get_field_index("blob"), "blob", pa.array([blob] * table.num_rows))
    with open(seg, "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    relist(seg)
    with open_recording(rec_dir) as rec, pytest.raises(RecordingError, match="outside the recording"):
        rec.load_weights(0, framework="numpy")
    rep = doctor(rec_dir, repair=False)
    assert any("outside the recording" in p["reason"] for p in rep["problems"]), rep
    faults.add(faults=1)


def test_weight_blob_symlink_escaping_is_refused(rec_dir, tmp_path, faults):
    blob = next((rec_dir / "weights" / "blobs").glob("*.zst"))
    moved = tmp_path / "elsewhere.zst"
    shutil.move(blob, moved)
    blob.symlink_to(moved)  # same bytes, outside the recording
    with open_recording(rec_dir) as rec, pytest.raises(RecordingError, match="symlink escapes"):
        rec.load_weights(0, framework="numpy")
    faults.add(faults=1)


@pytest.mark.parametrize("where", ["table", "rank", "segment"])
def test_symlinks_escaping_the_recording_are_refused(rec_dir, tmp_path, faults, capsys, where):
    outside = tmp_path / "outside"
    if where == "table":
        shutil.move(rec_dir / "rollouts", outside)
        (rec_dir / "rollouts").symlink_to(outside, target_is_directory=True)
    elif where == "rank":
        shutil.move(rec_dir / "rollouts" / "rank-0000", outside)
        (rec_dir / "rollouts" / "rank-0000").symlink_to(outside, target_is_directory=True)
    else:
        seg = _outside_segment(tmp_path)
        (rec_dir / "rollouts" / "rank-0000" / "part-00007.arrow").symlink_to(seg)
    with pytest.raises(RecordingError, match="outside the recording") as e:
        open_recording(rec_dir)
    assert e.value.title == "path outside recording"
    assert cli_main(["info", str(rec_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("replay: path outside recording: ") and len(err.strip().splitlines()) == 1
    faults.add(faults=1)


def test_symlink_inside_the_recording_is_followed(rec_dir):
    rank = rec_dir / "rollouts" / "rank-0000"
    shutil.move(rank, rec_dir / "rollouts-store")
    rank.symlink_to(rec_dir / "rollouts-store", target_is_directory=True)
    with open_recording(rec_dir) as rec:
        assert rec.sql("SELECT count(*) FROM rollouts").fetchall()[0][0] == 3


@pytest.mark.parametrize("version,title", [(2, "recording too new"), (99, "recording too new"),
                                           (0, "corrupt manifest"), (-1, "corrupt manifest"),
                                           (True, "corrupt manifest"), ("1", "corrupt manifest"),
                                           (1.5, "corrupt manifest"), (None, "corrupt manifest")])
def test_schema_versions_outside_what_this_replay_reads(rec_dir, faults, capsys, version, title):
    man = _manifest(rec_dir)
    man["schema_version"] = version
    _save(rec_dir, man)
    with pytest.raises(RecordingError) as e:
        open_recording(rec_dir)
    assert e.value.title == title
    if title == "recording too new":
        assert f"schema_version {version}" in str(e.value) and "upgrade replay" in str(e.value)
    assert cli_main(["info", str(rec_dir)]) == 1
    assert capsys.readouterr().err.startswith(f"replay: {title}: ")
    faults.add(faults=1)


def _rewrite(seg, change, relist):
    table = ipc.open_file(str(seg)).read_all()
    table = change(table)
    with open(seg, "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    relist(seg)


def test_older_segments_without_later_columns_open(rec_dir, faults, relist):
    seg = segment_path(rec_dir, "rollouts", 0, 0, open_=False)
    _rewrite(seg, lambda t: t.drop_columns(["engine_config", "num_cached_tokens"]), relist)
    with open_recording(rec_dir) as rec:
        rows = rec.sql("SELECT count(*), count(engine_config), count(num_cached_tokens) FROM rollouts").fetchall()
        assert rows == [(3, 0, 0)]
        assert rec.sql("SELECT count(*) FROM tokens").fetchall()[0][0] == 6
        assert rec.info()["status"] == "complete"
    faults.add(faults=1)


def test_segments_with_extra_columns_open(rec_dir, faults, relist):
    seg = segment_path(rec_dir, "rollouts", 0, 0, open_=False)

    def newer(t):
        t = t.append_column("novel", pa.array([f"x{i}" for i in range(t.num_rows)]))
        return t.replace_schema_metadata({**t.schema.metadata, SCHEMA_KEY: b"2"})
    _rewrite(seg, newer, relist)
    with open_recording(rec_dir) as rec:
        assert sorted(r[0] for r in rec.sql("SELECT novel FROM rollouts").fetchall()) == ["x0", "x1", "x2"]
        assert rec.sql("SELECT count(*) FROM sequences").fetchall()[0][0] == 3
    faults.add(faults=1)


def test_a_recording_path_that_is_not_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for p in (f, tmp_path / "missing", tmp_path):
        with pytest.raises(RecordingError):
            open_recording(p)
    assert cli_main(["info", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("replay: not a recording: ")
