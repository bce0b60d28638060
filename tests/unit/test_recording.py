"""open_recording: errors, info, weights, damaged segments, and the stream reader."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from replay import Recorder, open_recording
from replay.errors import BadInput, RecordingError, ReplayError
from replay.store.segments import read_stream
from replay.schema import SCHEMAS, segment_path


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "small"
    with Recorder(root, run_config={"model": "tiny", "engine": "reference"}, rank=0, strict=True) as rec:
        rec.event("run_start")
        for step in range(3):
            rec.rollout(step=step, request_id=f"r{step}", prompt_ids=[1, 2], output_ids=[3] * (step + 1),
                        logprobs=[-1.0] * (step + 1), token_versions=[step] * (step + 1), reward=1.0)
            rec.trainer(step=step, request_id=f"r{step}", logprobs=[-1.0] * (step + 1), weight_version=step)
            rec.metrics(step=step, values={"loss": 0.5})
        rec.weights(version=0, step=0, state_dict={"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        rec.weights(version=1, step=1, state_dict={"w": np.ones((2, 3), np.float32)}, delta=True)
        rec.weights(version=2, step=2, sha256="ab" * 32, path="/ckpt/step2")
    return root


def test_info_summarises_the_recording(small):
    with open_recording(small) as rec:
        info = rec.info()
    assert info["status"] == "complete" and info["run_id"] == "small" and info["schema_version"] == 1
    assert info["steps"] == {"count": 3, "min": 0, "max": 2}
    assert (info["rollouts"], info["tokens"], info["trainer_rows"], info["rejects"]) == (3, 6, 3, 0)
    assert info["weight_versions"] == 3 and info["metric_rows"] == 3 and info["events"] == 1
    assert info["run_config"] == {"model": "tiny", "engine": "reference"}
    assert info["ranks"] == [{"rank": 0, "status": "complete", "writer_alive": False,
                              "closed_segments": 5, "open_segments": 0}]
    on_disk = sum(p.stat().st_size for p in small.rglob("*") if p.is_file())
    assert info["bytes_on_disk"] == on_disk > 0
    json.dumps(info)  # JSON-ready


def test_load_weights_full_and_delta_versions(small):
    with open_recording(small) as rec:
        w0 = rec.load_weights(0, framework="numpy")
        w1 = rec.load_weights(1, framework="numpy")
        t1 = rec.load_weights(1)  # torch by default
        np.testing.assert_array_equal(w0["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
        np.testing.assert_array_equal(w1["w"], np.ones((2, 3), np.float32))
        assert type(t1["w"]).__module__.startswith("torch") and float(t1["w"].sum()) == 6.0
        with pytest.raises(RecordingError, match=r"weight version 7 .*versions recorded: 0, 1, 2"):
            rec.load_weights(7)
        with pytest.raises(RecordingError, match=r"version 2 .*hash only.*/ckpt/step2"):
            rec.load_weights(2)


@pytest.mark.parametrize("content, title", [
    (None, "not a recording"),
    ("{not json", "corrupt manifest"),
    ('{"run_id": "x"}', "corrupt manifest"),
    ('{"schema_version": 99, "ranks": {}}', "recording too new"),
])
def test_open_refuses_what_is_not_a_readable_recording(tmp_path, content, title):
    root = tmp_path / "bad"
    root.mkdir()
    if content is not None:
        (root / "manifest.json").write_text(content)
    with pytest.raises(RecordingError) as e:
        open_recording(root)
    assert e.value.title == title and str(root) in str(e.value)
    if title == "recording too new":
        assert "99" in str(e.value) and "upgrade" in str(e.value)


def test_open_refuses_a_missing_path_and_a_file(tmp_path):
    with pytest.raises(RecordingError, match="does not exist"):
        open_recording(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RecordingError, match="not a folder"):
        open_recording(tmp_path / "f")


def test_names_must_be_sql_identifiers(small):
    with pytest.raises(BadInput, match="not a plain SQL identifier"):
        open_recording([small], names=["a-b"])
    with pytest.raises(BadInput, match="unique"):
        open_recording([small, small], names=["a", "A"])
    with pytest.raises(BadInput, match="reserved"):
        open_recording([small], names=["main"])


def test_sql_errors_and_closed_recordings(small):
    rec = open_recording(small)
    with pytest.raises(ReplayError) as e:
        rec.sql("SELECT nope FROM rollouts")
    assert e.value.title == "sql error" and "nope" in str(e.value) and "\n" not in str(e.value)
    rec.sql("CREATE TABLE scratch AS SELECT 41 + 1 AS x")  # statements run at once
    assert rec.sql("SELECT x FROM scratch").fetchall() == [(42,)]
    rec.close()
    rec.close()
    with pytest.raises(RecordingError, match="closed"):
        rec.sql("SELECT 1")


def test_a_torn_closed_segment_is_a_clear_error(small):
    seg = segment_path(small, "trainer", 0, 0, open_=False)
    seg.write_bytes(seg.read_bytes()[:100])
    with pytest.raises(RecordingError) as e:
        open_recording(small)
    assert e.value.title == "damaged recording" and "trainer/rank-0000/part-00000.arrow" in str(e.value)
    assert "replay doctor" in str(e.value)


def test_a_torn_closed_segment_with_its_stream_reads_the_stream(small):
    seg = segment_path(small, "trainer", 0, 0, open_=False)
    table = ipc.open_file(str(seg)).read_all()
    with open(seg.with_suffix(".arrows"), "wb") as f:
        w = ipc.new_stream(f, table.schema)
        w.write_table(table)
        w.close()
    seg.write_bytes(seg.read_bytes()[:100])
    with open_recording(small) as rec:
        assert rec.sql("SELECT count(*) FROM trainer").fetchall() == [(3,)]
        assert any("trainer/rank-0000/part-00000.arrow has 100 bytes" in w and "stream" in w
                   for w in rec.info()["warnings"])


def _stream_bytes(n_batches: int) -> tuple[bytes, list[int]]:
    sch = SCHEMAS["metrics"]
    sink = pa.BufferOutputStream()
    w = ipc.new_stream(sink, sch)
    ends = []
    for i in range(n_batches):
        w.write_table(pa.Table.from_pylist([dict(step=i, name="m", value=float(i), rank=0, time_ns=i)], schema=sch))
        ends.append(sink.tell())
    return sink.getvalue().to_pybytes(), ends


def test_read_stream_keeps_complete_batches_and_counts_the_torn_tail(tmp_path):
    data, ends = _stream_bytes(4)
    p = tmp_path / "s.arrows"
    p.write_bytes(data[: ends[2] + 10])  # three batches and ten bytes of the fourth
    c = read_stream(p)
    assert c.rows == 3 and c.good_bytes == ends[2] and c.skipped_bytes == 10 and c.error
    p.write_bytes(data)  # whole, no end marker: a clean end
    c = read_stream(p)
    assert c.rows == 4 and c.skipped_bytes == 0 and c.error is None
    p.write_bytes(data[:ends[1]] + os.urandom(64))  # garbage after two batches
    c = read_stream(p)
    assert c.rows == 2 and c.skipped_bytes == 64
    p.write_bytes(data[:20])  # a torn header
    c = read_stream(p)
    assert c.schema is None and c.rows == 0 and c.skipped_bytes == 20
    p.write_bytes(b"")
    c = read_stream(p)
    assert c.schema is None and c.rows == 0 and c.error is None


def _open_or_clear_error(root):
    """Open, run every view, and read info; the only error allowed is a RecordingError."""
    from replay.store.doctor import doctor
    try:
        with open_recording(root) as rec:
            for view in ("tokens", "sequences", "step_metrics", "events", "weights"):
                rec.sql(f"SELECT * FROM {view}").fetchall()
            rec.info()
    except RecordingError as e:
        assert e.title and "\n" not in e.msg
    try:
        rep = doctor(root, repair=False)
        assert isinstance(rep["problems"], list)
    except RecordingError:
        pass


def test_damaged_files_give_a_clear_error_or_a_partial_read(small, tmp_path):
    import shutil
    rng = np.random.default_rng(0)
    seg = segment_path(small, "rollouts", 0, 0, open_=False)
    data = seg.read_bytes()
    cases = {
        "random closed": lambda r: segment_path(r, "rollouts", 0, 0, open_=False).write_bytes(
            rng.bytes(len(data))),
        "random stream": lambda r: segment_path(r, "trainer", 0, 1, open_=True).write_bytes(rng.bytes(300)),
        "empty closed": lambda r: segment_path(r, "events", 0, 0, open_=False).write_bytes(b""),
        "wrong table": lambda r: shutil.copy(segment_path(r, "metrics", 0, 0, open_=False),
                                             segment_path(r, "rollouts", 0, 5, open_=False)),
        "ranks a list": lambda r: (r / "manifest.json").write_text('{"schema_version": 1, "ranks": [1]}'),
        "rank not an object": lambda r: (r / "manifest.json").write_text(
            '{"schema_version": 1, "ranks": {"0": 3}}'),
        "folder as segment": lambda r: segment_path(r, "topk", 0, 0, open_=False).mkdir(parents=True),
    }
    for cut in range(0, len(data), max(1, len(data) // 12)):
        cases[f"cut at {cut}"] = lambda r, cut=cut: segment_path(r, "rollouts", 0, 0, open_=False).write_bytes(
            data[:cut])
    for name, damage in cases.items():
        root = tmp_path / name.replace(" ", "_")
        shutil.copytree(small, root)
        damage(root)
        _open_or_clear_error(root)


def test_every_truncation_of_a_stream_reads_a_prefix(tmp_path):
    data, ends = _stream_bytes(5)
    p = tmp_path / "s.arrows"
    last = 0
    for cut in range(0, len(data) + 1, 11):
        p.write_bytes(data[:cut])
        c = read_stream(p)
        assert c.rows == sum(1 for e in ends if e <= cut) and c.rows >= last
        assert c.good_bytes + c.skipped_bytes == cut
        last = c.rows


@pytest.mark.parametrize("bad", [123, None, b"bytes", [1, 2]])
def test_open_recording_refuses_what_is_not_a_path(bad):
    from replay import BadInput, open_recording

    with pytest.raises(BadInput, match="path"):
        open_recording(bad)


def test_a_stream_closed_and_listed_between_the_listing_and_the_manifest_read(small):
    """A live writer closes a segment while a reader opens: the reader listed only the stream,
    then read a manifest that lists the closed file. Not damage: the closed file is read."""
    from replay.store.manifest import manifest_or_error
    from replay.store.segments import Part, scan_parts
    from replay.store.selection import listed_and_intact, select_parts
    from replay.read.views import scan_table
    parts = scan_parts(small)
    seg = parts["trainer"][0].file
    as_listed = {t: ([Part(t, p.rank, p.part, None, p.file.with_suffix(".arrows")) for p in ps]
                     if t == "trainer" else ps) for t, ps in parts.items()}
    man = manifest_or_error(small)
    sel = select_parts(man, as_listed)
    assert sel.damage == [] and sel.parts["trainer"][0].stream is not None
    scan = scan_table("trainer", sel.parts["trainer"], {},
                      admit=lambda p, path: listed_and_intact(man, p, path))
    assert scan.dataset.count_rows() == 3 and scan.files == [seg]
