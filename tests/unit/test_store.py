"""The on-disk format has one reader: a local folder and a filesystem given to pyarrow read the
same bytes the same way (torn tails, manifests), and a salvage closes a stream exactly as the
writer does."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest

from replay import Recorder, open_recording
from replay.errors import RecordingError
from replay.schema import SCHEMAS
from replay.store.files import Files
from replay.store.manifest import read_manifest
from replay.store.segments import read_stream, stream_to_file

TORN = b"\xff\xff\xff\xff\x40\x00\x00\x00" + b"\x00" * 20  # a batch header cut short: 28 bytes


def _rows(n: int, step: int = 0) -> list[dict]:
    return [dict(step=step, request_id=f"r{i}", rank=0, time_ns=i + 1, prompt_ids=[1], output_ids=[1, 2],
                 logprobs=[-1.0, -1.0]) for i in range(n)]


def _torn_stream(path) -> bytes:
    sch = SCHEMAS["rollouts"]
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, sch, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        for k in range(2):
            w.write_batch(pa.RecordBatch.from_pylist(_rows(3, k), schema=sch))
    data = sink.getvalue().to_pybytes()[:-8] + TORN   # no end marker: the writer died mid-batch
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_a_torn_tail_reads_the_same_locally_and_through_a_filesystem(tmp_path):
    path = tmp_path / "part-00000.arrows"
    data = _torn_stream(path)
    local = read_stream(path)
    through = read_stream(str(path), Files(pafs.LocalFileSystem()))
    sub = read_stream("part-00000.arrows", Files(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())))
    for c in (local, through, sub):
        assert (c.rows, len(c.batches), c.size) == (6, 2, len(data))
        assert c.skipped_bytes == len(TORN), c   # only the torn bytes, not the whole file
        assert c.error is not None and c.schema.equals(SCHEMAS["rollouts"])


def _recording(tmp_path):
    root = tmp_path / "run"
    with Recorder(root, run_config={"model": "tiny"}) as rec:
        for r in _rows(4):
            rec.rollout(step=0, request_id=r["request_id"], prompt_ids=[1], output_ids=[1, 2], logprobs=[-1.0, -1.0])
    return root


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_a_schema_version_refused_locally_is_refused_through_a_filesystem(tmp_path, version):
    root = _recording(tmp_path)
    man = json.loads((root / "manifest.json").read_text())
    man["schema_version"] = version
    (root / "manifest.json").write_text(json.dumps(man))
    errors = []
    for kw in ({}, {"filesystem": pafs.LocalFileSystem()}):
        with pytest.raises(RecordingError) as e:
            open_recording(str(root), **kw)
        errors.append(e.value)
    assert [e.title for e in errors] == ["corrupt manifest"] * 2
    assert "schema_version" in errors[0].msg and "schema_version" in errors[1].msg
    assert "replay doctor" in errors[0].msg      # a local folder can be repaired here ...
    assert "replay doctor" not in errors[1].msg  # ... a remote one is read only


def test_a_recording_reads_the_same_through_a_filesystem(tmp_path):
    root = _recording(tmp_path)
    _torn_stream(root / "rollouts" / "rank-0003" / "part-00000.arrows")  # a writer still streaming
    q = "SELECT count(*), sum(n_tokens) FROM sequences"
    with open_recording(root) as a, open_recording(str(root), filesystem=pafs.LocalFileSystem()) as b:
        assert a.sql(q).fetchall() == b.sql(q).fetchall() == [(10, 20)]
        ia, ib = a.info(), b.info()
        assert ia["bytes_on_disk"] == ib["bytes_on_disk"] > 0
        assert ia["open_segments"] == ib["open_segments"] == 1
        assert ia["rows_in_open_segments"] == ib["rows_in_open_segments"] == 6


def test_a_salvage_closes_a_stream_as_the_writer_does(tmp_path):
    """The salvaged file has the bytes the writer's own close gives the same stream."""
    root = _recording(tmp_path)
    stream = root / "rollouts" / "rank-0001" / "part-00000.arrows"
    _torn_stream(stream)
    copy = tmp_path / "copy.arrows"
    shutil.copy(stream, copy)
    expected = stream_to_file(copy, tmp_path / "copy.arrow", warn=False)
    with open_recording(root, salvage=True) as rec:
        assert rec.info()["salvage"]["ranks"] == [1] and rec.info()["salvage"]["skipped_bytes"] == len(TORN)
        assert rec.sql("SELECT count(*) FROM rollouts").fetchall() == [(10,)]
    entry = read_manifest(root)["ranks"]["1"]["segments"]["rollouts"][0]
    assert entry == {"path": "rollouts/rank-0001/part-00000.arrow", **expected}
    assert (root / entry["path"]).read_bytes() == (tmp_path / "copy.arrow").read_bytes()
    assert not stream.exists()
