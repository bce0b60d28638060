"""Recorder write path: real segment files read back with pyarrow."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from replay import Recorder, open_recording
from replay.store.segments import IPC_OPTIONS, stream_to_file
from replay.record.writer import BoundedQueue
from replay.errors import RecordingError, ReplayError
from replay.schema import SCHEMAS

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------- reading segments back

def read_stream(path: Path) -> pa.Table | None:
    """Every complete batch of an IPC stream (a torn tail is ignored)."""
    batches, schema = [], None
    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.open_stream(f)
        schema = reader.schema
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                break
    return pa.Table.from_batches(batches, schema=schema)


def read_table(root: Path, table: str, rank: int = 0) -> pa.Table:
    """All rows of ``table`` for ``rank``: closed files, and open streams where no file exists."""
    d = root / table / f"rank-{rank:04d}"
    parts = []
    for p in sorted(d.glob("part-*.arrow*")):
        if p.suffix == ".arrows" and p.with_suffix(".arrow").exists():
            continue
        parts.append(pa.ipc.open_file(str(p)).read_all() if p.suffix == ".arrow" else read_stream(p))
    if not parts:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(parts)


def rollout_kwargs(i: int, step: int = 0, n: int = 5, form: str = "list") -> dict:
    ids = list(range(10 + i, 10 + i + n))
    lps = [-0.5 - 0.01 * j for j in range(n)]
    vers = [step] * n
    prompt = [1, 2, 3, i]
    if form == "numpy":
        ids, lps, vers, prompt = np.array(ids), np.array(lps, np.float32), np.array(vers), np.array(prompt)
    elif form == "torch":
        ids, lps, vers, prompt = (torch.tensor(ids), torch.tensor(lps), torch.tensor(vers),
                                  torch.tensor(prompt))
    return dict(step=step, request_id=f"r{i}", group_id=f"g{i // 2}", prompt_ids=prompt, output_ids=ids,
                logprobs=lps, token_versions=vers, reward=1.0, finish_reason="stop", temperature=0.7,
                top_p=0.9, top_k=-1, seed=11, logprobs_mode="raw_logprobs", engine="vllm-0.32.0",
                engine_config="cfg1", num_cached_tokens=2)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("form", ["list", "numpy", "torch"])
def test_round_trip_every_table(tmp_path, form):
    root = tmp_path / "run"
    with Recorder(root, run_config={"model": "tiny"}, rank=0) as rec:
        rec.event("weights_update_start", step=3, weight_version=4, mode="concurrent")
        for i in range(3):
            rec.rollout(**rollout_kwargs(i, step=3, form=form))
        lps = [-0.4, -0.3, -0.2, -0.1, -0.05]
        ent = [1.0, 2.0, 0.5, 0.1, 0.0]
        if form == "numpy":
            lps, ent = np.array(lps), np.array(ent, np.float32)
        elif form == "torch":
            lps, ent = torch.tensor(lps, dtype=torch.float64), torch.tensor(ent)
        rec.trainer(step=3, request_id="r0", weight_version=4, logprobs=lps, entropy=ent, advantage=0.3)
        ids = [[5, 6, 7], [8, 9, 10]]
        tlp = [[-0.1, -2.0, -3.0], [-0.2, -2.5, -4.0]]
        if form == "numpy":
            ids, tlp = np.array(ids, np.int64), np.array(tlp, np.float32)
        elif form == "torch":
            ids, tlp = torch.tensor(ids), torch.tensor(tlp, dtype=torch.float16)
        rec.topk(step=3, request_id="r0", source="engine", ids=ids, logprobs=tlp)
        rec.topk(step=3, request_id="r1", source="trainer", ids=ids, logprobs=tlp, positions=[3, 4])
        rec.metrics(step=3, values={"clip_rate": 0.01, "reward": np.float32(0.5)}, source="trainer")
        rec.weights(version=4, step=3, sha256="ab" * 32, path="/ckpt/v4")
    for table in ("events", "rollouts", "trainer", "topk", "metrics", "weights"):
        t = read_table(root, table)
        assert t.schema.equals(SCHEMAS[table], check_metadata=True), table
        assert (t.column("rank").to_numpy() == 0).all()
        assert (t.column("time_ns").to_numpy() > 1_600_000_000 * 10**9).all()
    ro = read_table(root, "rollouts").to_pylist()
    assert [r["request_id"] for r in ro] == ["r0", "r1", "r2"]
    assert ro[1]["output_ids"] == [11, 12, 13, 14, 15]
    assert ro[1]["prompt_ids"] == [1, 2, 3, 1]
    assert ro[1]["token_versions"] == [3] * 5
    np.testing.assert_allclose(ro[1]["logprobs"], [-0.5, -0.51, -0.52, -0.53, -0.54], rtol=1e-6)
    assert (ro[1]["reward"], ro[1]["finish_reason"], ro[1]["top_k"], ro[1]["seed"]) == (1.0, "stop", -1, 11)
    assert ro[1]["temperature"] == pytest.approx(0.7) and ro[1]["num_cached_tokens"] == 2
    tr = read_table(root, "trainer").to_pylist()[0]
    np.testing.assert_allclose(tr["logprobs"], [-0.4, -0.3, -0.2, -0.1, -0.05], rtol=1e-6)
    np.testing.assert_allclose(tr["entropy"], [1.0, 2.0, 0.5, 0.1, 0.0], rtol=1e-6)
    assert tr["advantage"] == pytest.approx(0.3) and tr["weight_version"] == 4
    tk = read_table(root, "topk").to_pylist()
    assert [(r["request_id"], r["source"], r["pos"]) for r in tk] == [
        ("r0", "engine", 0), ("r0", "engine", 1), ("r1", "trainer", 3), ("r1", "trainer", 4)]
    assert tk[1]["ids"] == [8, 9, 10]
    np.testing.assert_allclose(tk[3]["logprobs"], [-0.2, -2.5, -4.0], rtol=1e-3)
    ev = read_table(root, "events").to_pylist()[0]
    assert (ev["kind"], ev["step"], ev["weight_version"], ev["seq"]) == ("weights_update_start", 3, 4, 0)
    assert json.loads(ev["detail"]) == {"mode": "concurrent"}
    me = {r["name"]: r["value"] for r in read_table(root, "metrics").to_pylist()}
    assert me == {"clip_rate": 0.01, "reward": 0.5}
    we = read_table(root, "weights").to_pylist()[0]
    assert (we["version"], we["sha256"], we["path"], we["blob"]) == (4, "ab" * 32, "/ckpt/v4", None)
    assert read_table(root, "rejects").num_rows == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_logprob_dtypes(tmp_path, dtype):
    lps = torch.tensor([-0.125, -1.5, -3.0], dtype=getattr(torch, dtype))
    with Recorder(tmp_path / "r") as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=torch.tensor([1, 2], dtype=torch.int64),
                    output_ids=torch.tensor([7, 8, 9], dtype=torch.int64), logprobs=lps,
                    token_versions=torch.tensor([0, 0, 1]))
        rec.trainer(step=0, request_id="a", logprobs=lps.clone().requires_grad_())
    row = read_table(tmp_path / "r", "rollouts").to_pylist()[0]
    assert row["logprobs"] == [-0.125, -1.5, -3.0]  # exact in all three dtypes
    assert row["output_ids"] == [7, 8, 9] and row["token_versions"] == [0, 0, 1]
    assert read_table(tmp_path / "r", "trainer").to_pylist()[0]["logprobs"] == [-0.125, -1.5, -3.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the pinned-copy path")
def test_cuda_tensors_round_trip(tmp_path):
    dev = torch.device("cuda")
    ids = torch.arange(100, 612, device=dev)
    lps = -torch.rand(512, device=dev, dtype=torch.bfloat16)
    expect = lps.float().cpu().tolist()
    with Recorder(tmp_path / "r") as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=ids[:8], output_ids=ids, logprobs=lps,
                    reward=torch.tensor(0.5, device=dev))
        ids.zero_()  # the caller reuses its buffers right away: the recorder copied them
        lps.zero_()
    row = read_table(tmp_path / "r", "rollouts").to_pylist()[0]
    assert row["output_ids"] == list(range(100, 612)) and row["logprobs"] == expect
    assert row["reward"] == 0.5


def test_caller_may_reuse_buffers(tmp_path):
    ids_np = np.array([1, 2, 3])
    ids_list = [4, 5, 6]
    ids_t = torch.tensor([7, 8, 9])
    top = [[1, 2], [3, 4]]
    lp = [-1.0, -1.0, -1.0]
    with Recorder(tmp_path / "r", flush_interval_s=60) as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[0], output_ids=ids_np, logprobs=lp)
        rec.rollout(step=0, request_id="b", prompt_ids=[0], output_ids=ids_list, logprobs=lp)
        rec.rollout(step=0, request_id="c", prompt_ids=[0], output_ids=ids_t, logprobs=lp)
        rec.topk(step=0, request_id="a", source="engine", ids=top, logprobs=[[-1, -2], [-1, -2]])
        ids_np[:] = 0
        ids_list[:] = [0, 0, 0]
        ids_t.zero_()
        top[0][0] = 99
    assert [r["output_ids"] for r in read_table(tmp_path / "r", "rollouts").to_pylist()] == [
        [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert read_table(tmp_path / "r", "topk").to_pylist()[0]["ids"] == [1, 2]


# ---------------------------------------------------------------- flush, close, manifest

def test_flush_makes_rows_readable_from_the_stream(tmp_path):
    root = tmp_path / "r"
    rec = Recorder(root, flush_interval_s=60, batch_rows=10_000)
    try:
        for i in range(7):
            rec.rollout(**rollout_kwargs(i))
        rec.event("step_end", step=0)
        rec.flush()
        streams = list((root / "rollouts" / "rank-0000").glob("*.arrows"))
        assert [p.name for p in streams] == ["part-00000.arrows"]
        t = read_stream(streams[0])
        assert t.num_rows == 7 and t.schema.equals(SCHEMAS["rollouts"])
        assert read_stream(root / "events" / "rank-0000" / "part-00000.arrows").num_rows == 1
        man = json.loads((root / "manifest.json").read_text())
        assert man["ranks"]["0"]["status"] == "recording" and man["status"] == "recording"
        assert rec.stats()["rows"]["rollouts"] == 7
    finally:
        rec.close()


def test_close_turns_segments_into_files_listed_with_sha256(tmp_path):
    root = tmp_path / "r"
    with Recorder(root, run_config={"lr": 1e-6}, segment_bytes=8_000) as rec:
        for step in range(6):
            for i in range(20):
                rec.rollout(**rollout_kwargs(i, step=step, n=64))
            rec.metrics(step=step, values={"reward": 0.5})
            rec.flush()
    assert not list(root.rglob("*.arrows")) and not list(root.rglob("*.tmp"))
    man = json.loads((root / "manifest.json").read_text())
    assert man["status"] == "complete" and man["run_id"] == "r" and man["run_config"] == {"lr": 1e-6}
    entry = man["ranks"]["0"]
    assert entry["status"] == "complete" and entry["closed_at"] and entry["counts"]["rollouts"] == 120
    segs = entry["segments"]["rollouts"]
    assert len(segs) > 1, "segment_bytes should have rotated the rollouts segment"
    files = sorted(p.relative_to(root).as_posix() for p in (root / "rollouts" / "rank-0000").iterdir())
    assert sorted(s["path"] for s in segs) == files
    total = 0
    for s in segs:
        data = (root / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        n = pa.ipc.open_file(str(root / s["path"])).read_all().num_rows
        assert n == s["rows"]
        total += n
    assert total == 120
    assert [s["path"] for s in entry["segments"]["metrics"]] == ["metrics/rank-0000/part-00000.arrow"]


def test_close_is_idempotent_and_calls_after_close_raise(tmp_path):
    rec = Recorder(tmp_path / "r")
    rec.rollout(**rollout_kwargs(0))
    rec.close()
    rec.close()
    with pytest.raises(RecordingError):
        rec.rollout(**rollout_kwargs(1))
    assert rec.stats()["rows"] == {"rollouts": 1} and rec.stats()["closed"]


def test_exception_in_with_block_keeps_data(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with Recorder(tmp_path / "r") as rec:
            rec.rollout(**rollout_kwargs(0))
            _ = 1 / 0
    assert read_table(tmp_path / "r", "rollouts").num_rows == 1
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    # every row kept, but the run did not finish: salvaged, with the error named, never complete
    assert man["status"] == "salvaged" and man["ranks"]["0"]["status"] == "salvaged"
    assert man["ranks"]["0"]["crashed"].startswith("ZeroDivisionError")
    with open_recording(tmp_path / "r") as r:
        info = r.info()
    assert info["status"] == "salvaged" and info["ranks"][0]["crashed"].startswith("ZeroDivisionError")
    assert any("ended on an error" in w for w in info["warnings"])


def test_sys_exit_0_in_the_with_block_is_a_finished_run(tmp_path):
    with pytest.raises(SystemExit):
        with Recorder(tmp_path / "r") as rec:
            rec.rollout(**rollout_kwargs(0))
            raise SystemExit(0)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["status"] == "complete"


def test_an_uncaught_exception_outside_a_with_block_marks_the_run_salvaged(tmp_path):
    """A loop that opens a Recorder without ``with`` and dies on an exception: the recorder is
    closed at exit, salvaged, with the error (the interpreter's own traceback still printed)."""
    code = ("import sys\nfrom replay import Recorder\n"
            f"rec = Recorder({str(tmp_path / 'r')!r})\n"
            "rec.rollout(step=0, request_id='a', prompt_ids=[1], output_ids=[2], logprobs=[-1.0])\n"
            "raise RuntimeError('weight load failed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "RuntimeError: weight load failed" in r.stderr
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["status"] == "salvaged" and man["ranks"]["0"]["crashed"] == "RuntimeError: weight load failed"
    assert read_table(tmp_path / "r", "rollouts").num_rows == 1


def test_torn_stream_keeps_complete_batches(tmp_path):
    path = tmp_path / "part-00000.arrows"
    schema = SCHEMAS["metrics"]
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for s in range(3):
            w.write_batch(pa.RecordBatch.from_pylist(
                [{"step": s, "name": "x", "value": 1.0, "source": None, "rank": 0, "time_ns": 1}], schema=schema))
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # cut inside the last batch (and its end marker)
    entry = stream_to_file(path, path.with_suffix(".arrow"))
    assert entry["rows"] == 2 and path.exists()  # the stream stays until the manifest lists the file
    assert pa.ipc.open_file(str(path.with_suffix(".arrow"))).read_all().column("step").to_pylist() == [0, 1]


# ---------------------------------------------------------------- ranks and reopening

def test_same_rank_is_refused_unless_append(tmp_path):
    root = tmp_path / "r"
    with Recorder(root) as rec:
        rec.rollout(**rollout_kwargs(0, step=0))
    with pytest.raises(RecordingError, match="mode='append'"):
        Recorder(root)
    with Recorder(root, mode="append") as rec:
        rec.rollout(**rollout_kwargs(1, step=1))
    with Recorder(root, rank=1) as rec:
        rec.rollout(**rollout_kwargs(2, step=1))
    man = json.loads((root / "manifest.json").read_text())
    assert set(man["ranks"]) == {"0", "1"} and man["status"] == "complete"
    assert [s["path"] for s in man["ranks"]["0"]["segments"]["rollouts"]] == [
        "rollouts/rank-0000/part-00000.arrow", "rollouts/rank-0000/part-00001.arrow"]
    assert man["ranks"]["0"]["counts"]["rollouts"] == 2
    assert read_table(root, "rollouts").column("request_id").to_pylist() == ["r0", "r1"]
    assert read_table(root, "rollouts", rank=1).column("rank").to_pylist() == [1]


def test_live_rank_cannot_be_opened_twice(tmp_path):
    with Recorder(tmp_path / "r"):
        with pytest.raises(RecordingError, match="another live process"):
            Recorder(tmp_path / "r", mode="append")


def test_append_continues_event_seq(tmp_path):
    with Recorder(tmp_path / "r") as rec:
        rec.event("run_start")
        rec.event("step_start", step=0)
    with Recorder(tmp_path / "r", mode="append") as rec:
        rec.event("run_start")
    assert read_table(tmp_path / "r", "events").column("seq").to_pylist() == [0, 1, 2]


# ---------------------------------------------------------------- threads and the queue

def test_threads_record_concurrently(tmp_path):
    root = tmp_path / "r"
    n_threads, per = 6, 60
    with Recorder(root, batch_rows=16) as rec:
        def work(t: int) -> None:
            for i in range(per):
                rec.event("request_submitted", step=0, request_id=f"t{t}-{i}")
                rec.rollout(**{**rollout_kwargs(i), "request_id": f"t{t}-{i}"})
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    ro = read_table(root, "rollouts").column("request_id").to_pylist()
    assert sorted(ro) == sorted(f"t{t}-{i}" for t in range(n_threads) for i in range(per))
    ev = read_table(root, "events")
    seq = ev.column("seq").to_pylist()
    assert seq == list(range(n_threads * per))  # written in seq order, no gaps
    times = ev.column("time_ns").to_numpy()
    assert (np.diff(times) >= 0).all()


def test_bounded_queue_blocks_until_drained():
    q = BoundedQueue(max_items=2, max_bytes=1 << 20)
    q.put("a")
    q.put("b")
    done = threading.Event()
    th = threading.Thread(target=lambda: (q.put("c"), done.set()))
    th.start()
    assert not done.wait(0.2), "a put on a full queue must wait"
    assert q.get_all(0) == ["a", "b"]
    assert done.wait(2)
    th.join()
    assert q.get_all(0) == ["c"]
    q2 = BoundedQueue(max_items=100, max_bytes=10)
    q2.put("big", 50)  # an empty queue takes an item larger than the bound
    t0 = time.monotonic()
    th = threading.Thread(target=q2.put, args=("next", 1))
    th.start()
    time.sleep(0.1)
    assert th.is_alive()
    q2.get_all(0)
    th.join(2)
    assert not th.is_alive() and time.monotonic() - t0 < 2


def test_small_queue_applies_back_pressure_and_loses_nothing(tmp_path):
    with Recorder(tmp_path / "r", max_queue_rows=2, batch_rows=3) as rec:
        for i in range(200):
            rec.rollout(**rollout_kwargs(i))
            assert rec.stats()["queue_depth"] <= 2 + 3
    assert read_table(tmp_path / "r", "rollouts").num_rows == 200


# ---------------------------------------------------------------- weights, stats, imports

def test_weights_store_full_delta_and_hash_only(tmp_path):
    root = tmp_path / "r"
    sd1 = {"w": torch.arange(64, dtype=torch.float32), "b": torch.zeros(4, dtype=torch.bfloat16)}
    sd2 = {"w": sd1["w"] + 1, "b": sd1["b"]}
    with Recorder(root) as rec:
        e1 = rec.weights(version=1, step=0, state_dict=sd1)
        e2 = rec.weights(version=2, step=1, state_dict=sd2, delta=True)
        assert rec.weights(version=3, step=2, sha256="cd" * 32, path="s3://ckpt/3") is None
    rows = read_table(root, "weights").to_pylist()
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert rows[0]["sha256"] == e1["sha256"] and rows[0]["base_version"] is None
    assert rows[1]["base_version"] == 1 and e2["base_sha256"] == e1["sha256"]
    assert rows[0]["nbytes"] == e1["nbytes"] and (root / rows[1]["blob"]).exists()
    assert rows[2]["blob"] is None and rows[2]["path"] == "s3://ckpt/3"
    from replay.store.weights import WeightStore, sha256_of

    assert sha256_of(sd2) == rows[1]["sha256"]
    back = WeightStore(root).load(rows[1]["blob"], rows[1]["sha256"], framework="torch")
    assert torch.equal(back["w"], sd2["w"])


def test_stats_counts_rows_tokens_and_bytes(tmp_path):
    with Recorder(tmp_path / "r") as rec:
        for i in range(4):
            rec.rollout(**rollout_kwargs(i, n=10))
        rec.rollout(step=0, request_id="bad", prompt_ids=[1], output_ids=[1], logprobs=[float("nan")])
        rec.flush()
        s = rec.stats()
    assert s["rows"]["rollouts"] == 4 and s["tokens"]["rollouts"] == 40
    assert s["rejects"] == 1 and s["errors"] == 0 and s["queue_depth"] == 0 and s["bytes"] > 0
    assert s["submitted"]["rollouts"] == 5


def test_recording_lists_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from replay import Recorder\n"
        f"with Recorder({str(tmp_path / 'r')!r}) as rec:\n"
        "    rec.rollout(step=0, request_id='a', prompt_ids=[1], output_ids=[2], logprobs=[-1.0])\n"
        "    rec.topk(step=0, request_id='a', source='engine', ids=[[1, 2]], logprobs=[[-1.0, -2.0]])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"



def test_append_after_a_crash_continues_after_the_last_recorded_event(tmp_path):
    root = tmp_path / "r"
    rec = Recorder(root)
    for i in range(5):
        rec.event("step_start", step=i)
    rec.flush()
    # the writer dies without closing: simulate by dropping the lock and the thread
    rec._writer.close()
    os.close(rec._lock_fd)
    rec._closed = True
    assert json.loads((root / "manifest.json").read_text())["ranks"]["0"]["status"] == "recording"
    with Recorder(root, mode="append") as rec2:
        rec2.event("run_start")
    seqs = read_table(root, "events").column("seq").to_pylist()
    assert sorted(seqs) == [0, 1, 2, 3, 4, 5]


def test_empty_outputs_and_missing_optionals(tmp_path):
    with Recorder(tmp_path / "r", strict=True) as rec:
        rec.rollout(step=0, request_id="empty", prompt_ids=[1, 2], output_ids=[], logprobs=[])
        rec.trainer(step=0, request_id="empty", logprobs=np.zeros(0, np.float32))
    row = read_table(tmp_path / "r", "rollouts").to_pylist()[0]
    assert row["output_ids"] == [] and row["logprobs"] == [] and row["token_versions"] is None
    assert read_table(tmp_path / "r", "trainer").to_pylist()[0]["entropy"] is None


def test_lenient_never_raises_on_a_failing_copy(tmp_path):
    bad = torch.empty(3, device="meta")  # a tensor that cannot be copied to the host
    with Recorder(tmp_path / "r") as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[1, 2, 3], logprobs=bad)
        rec.rollout(step=0, request_id="b", prompt_ids=[1], output_ids=[1], logprobs=[-1.0])
        assert rec.stats()["errors"] + rec.stats()["rejects"] >= 1
    assert read_table(tmp_path / "r", "rollouts").column("request_id").to_pylist() == ["b"]
    with Recorder(tmp_path / "s", strict=True) as rec:
        with pytest.raises(ReplayError):
            rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[1, 2, 3], logprobs=bad)


def test_a_dead_writer_thread_never_blocks_the_caller(tmp_path, monkeypatch):
    from replay.record import writer as _writer

    def broken(self, *a, **k):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(_writer.Writer, "_write_table", broken)
    monkeypatch.setattr(_writer.Writer, "_loop", lambda self: (_ for _ in ()).throw(RuntimeError("loop bug")))
    rec = Recorder(tmp_path / "r", max_queue_rows=2)
    t0 = time.monotonic()
    for i in range(50):  # far more than the queue holds
        rec.rollout(**rollout_kwargs(i))
    rec.flush()
    rec.close()
    assert time.monotonic() - t0 < 10
    s = rec.stats()
    assert s["errors"] >= 1 and s["dropped_rows"] >= 48
    with pytest.raises(RecordingError, match="loop bug"):
        r2 = Recorder(tmp_path / "s", strict=True)
        try:
            time.sleep(0.1)
            r2.rollout(**rollout_kwargs(0))
        finally:
            r2.close()


def test_unwritable_path_is_a_clear_recording_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RecordingError, match="cannot record into"):
        Recorder(blocker / "run")


def test_closed_segment_is_byte_identical_to_pyarrows_own_file(tmp_path):
    schema = SCHEMAS["rollouts"]
    batches = []
    for b in range(4):
        rows = [dict(rollout_kwargs(i, step=b, n=3 + i + b), rank=0, time_ns=5) for i in range(b + 1)]
        batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))

    stream = tmp_path / "part-00000.arrows"
    with pa.OSFile(str(stream), "wb") as f, pa.ipc.new_stream(f, schema, options=IPC_OPTIONS) as w:
        for b in batches:
            w.write_batch(b)
    ref = tmp_path / "ref.arrow"
    with pa.OSFile(str(ref), "wb") as f, pa.ipc.new_file(f, schema, options=IPC_OPTIONS) as w:
        for b in batches:
            w.write_batch(b)
    entry = stream_to_file(stream, tmp_path / "part-00000.arrow")
    data = (tmp_path / "part-00000.arrow").read_bytes()
    assert data == ref.read_bytes()
    assert entry == {"rows": 10, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert pa.ipc.open_file(str(tmp_path / "part-00000.arrow")).read_all().equals(pa.Table.from_batches(batches))


def test_step_context_records_the_boundaries_and_none_for_a_step_that_raised(tmp_path):
    with Recorder(tmp_path / "r") as rec:
        with rec.step(0, weight_version=0):
            rec.rollout(**rollout_kwargs(0))
        with pytest.raises(ValueError):
            with rec.step(1):
                raise ValueError("trainer blew up")
    with open_recording(tmp_path / "r") as r:
        ev = r.sql("SELECT step, kind, weight_version FROM events ORDER BY seq").fetchall()
    assert ev == [(0, "step_start", 0), (0, "step_end", None), (1, "step_start", None)]
