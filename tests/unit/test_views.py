"""The read path's views: tokens, sequences, step_metrics, schemas, live reads, pushdown."""
from __future__ import annotations

import math
import threading
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from replay import Recorder, open_recording
from replay.schema import SCHEMAS, segment_path

LOG08, LOG12 = math.log(0.8), math.log(1.2)


def _known(root, rank=0):
    """Two steps with hand-picked logprobs (exact in float32); see the expected r below."""
    with Recorder(root, run_config={"model": "tiny"}, rank=rank, strict=True) as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1, 2], output_ids=[5, 6],
                    logprobs=[-0.5, -0.25], token_versions=[0, 0], reward=1.0, num_cached_tokens=1)
        rec.rollout(step=0, request_id="b", prompt_ids=[1], output_ids=[7], logprobs=[-1.0],
                    token_versions=[0], reward=0.0)
        rec.rollout(step=1, request_id="c", prompt_ids=[3], output_ids=[8, 9, 10],
                    logprobs=[-0.5, -0.5, -0.5], token_versions=[0, 1, 1], reward=1.0)
        # "a" is scored twice: the later scoring wins
        rec.trainer(step=0, request_id="a", logprobs=[-3.0, -3.0], entropy=[9.0, 9.0], weight_version=0)
        time.sleep(0.002)
        rec.trainer(step=0, request_id="a", logprobs=[-0.25, -0.25], entropy=[1.0, 2.0], weight_version=0)
        rec.trainer(step=1, request_id="c", logprobs=[-0.5, -0.25, -1.0], entropy=[0.5, 0.5, 0.5],
                    weight_version=1)
    return root


@pytest.fixture
def known(tmp_path):
    return _known(tmp_path / "known")


def test_tokens_view_has_one_row_per_token_with_trainer_columns(known):
    with open_recording(known) as rec:
        rel = rec.sql("SELECT * FROM tokens ORDER BY step, request_id, pos")
        cols, rows = rel.columns, rel.fetchall()
    assert cols == ["step", "request_id", "pos", "token_id", "lp_rollout", "lp_trainer", "log_ratio",
                    "weight_version", "trainer_version", "entropy", "rank",
                    "lp_ref", "e_backend", "semantics", "lag", "e_trainer", "ref_floor"]
    none = (None,) * 6   # no reference stored yet (replay diagnose stores it)
    assert rows == [
        (0, "a", 0, 5, -0.5, -0.25, 0.25, 0, 0, 1.0, 0) + none,
        (0, "a", 1, 6, -0.25, -0.25, 0.0, 0, 0, 2.0, 0) + none,
        (0, "b", 0, 7, -1.0, None, None, 0, None, None, 0) + none,
        (1, "c", 0, 8, -0.5, -0.5, 0.0, 0, 1, 0.5, 0) + none,
        (1, "c", 1, 9, -0.5, -0.25, 0.25, 1, 1, 0.5, 0) + none,
        (1, "c", 2, 10, -0.5, -1.0, -0.5, 1, 1, 0.5, 0) + none,
    ]


def _expected(r, lt, lr, ent, lag, reward, n_seq):
    rho = [math.exp(x) for x in r]
    n = len(r)
    return {
        "n_sequences": n_seq, "n_tokens": n,
        "mean_abs_log_ratio": sum(abs(x) for x in r) / n,
        "k1": sum(-x for x in r) / n,
        "kl_new_old": sum(p - 1 - x for p, x in zip(rho, r)) / n,
        "clip_rate": sum(1 for x in r if x < LOG08 or x > LOG12) / n,
        "ess": sum(rho) ** 2 / sum(p * p for p in rho) / n,
        "chi2": sum(p * p for p in rho) / n - 1,
        "prob_diff": sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(lt, lr)) / n,
        "entropy": sum(ent) / n, "reward": reward, "lag": lag,
    }


def test_step_metrics_match_hand_computed_values(known):
    with open_recording(known) as rec:
        rel = rec.sql("SELECT * FROM step_metrics ORDER BY step")
        got = [dict(zip(rel.columns, row)) for row in rel.fetchall()]
    want = [
        _expected([0.25, 0.0], [-0.25, -0.25], [-0.5, -0.25], [1.0, 2.0], 0.0, 0.5, 2),
        _expected([0.0, 0.25, -0.5], [-0.5, -0.25, -1.0], [-0.5, -0.5, -0.5], [0.5] * 3, 1 / 3, 1.0, 1),
    ]
    assert [g["step"] for g in got] == [0, 1]
    for g, w in zip(got, want):
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    assert got[0]["clip_rate"] == 0.5 and got[1]["clip_rate"] == pytest.approx(2 / 3)


def test_sequences_view_summarises_each_rollout(known):
    with open_recording(known) as rec:
        rows = rec.sql("SELECT request_id, n_tokens, reward, mean_abs_log_ratio, max_abs_log_ratio, "
                       "first_version, last_version, n_versions, num_cached_tokens, n_scored "
                       "FROM sequences ORDER BY request_id").fetchall()
    assert rows == [("a", 2, 1.0, 0.125, 0.25, 0, 0, 1, 1, 2),
                    ("b", 1, 0.0, None, None, 0, 0, 1, None, 0),
                    ("c", 3, 1.0, 0.25, 0.5, 0, 1, 2, None, 3)]


def test_two_recordings_open_as_schemas(tmp_path):
    a = _known(tmp_path / "run-1")
    with Recorder(tmp_path / "other" / "run-1", rank=0) as rec:
        rec.rollout(step=0, request_id="z", prompt_ids=[1], output_ids=[1, 2, 3, 4], logprobs=[-1.0] * 4)
    with open_recording([a, tmp_path / "other" / "run-1"]) as rec:
        assert rec.names == ["run_1", "run_1_2"]
        assert rec.sql("SELECT count(*) FROM run_1.tokens").fetchall() == [(6,)]
        assert rec.sql("SELECT count(*) FROM run_1_2.tokens").fetchall() == [(4,)]
        both = rec.sql("SELECT a.step, a.n_tokens, b.n_tokens FROM run_1.step_metrics a "
                       "JOIN run_1_2.step_metrics b USING (step)").fetchall()
        assert both == [(0, 2, 0)]
        with pytest.raises(Exception, match="tokens"):
            rec.sql("SELECT * FROM tokens").fetchall()  # no default views with several recordings
    with open_recording([a, a], names=["x", "y"]) as rec:
        assert rec.sql("SELECT (SELECT count(*) FROM x.rollouts) + (SELECT count(*) FROM y.rollouts)"
                       ).fetchall() == [(6,)]


def test_single_recording_views_sit_in_its_schema_and_main(known):
    with open_recording(known) as rec:
        assert rec.sql("SELECT count(*) FROM known.tokens").fetchall() == \
            rec.sql("SELECT count(*) FROM main.tokens").fetchall() == [(6,)]


def test_live_read_of_open_streams_and_refresh(tmp_path):
    root = tmp_path / "live"
    w = Recorder(root, rank=0, flush_interval_s=1000, batch_rows=1000)
    try:
        for i in range(3):
            w.rollout(step=0, request_id=f"r{i}", prompt_ids=[1], output_ids=[2, 3], logprobs=[-1.0, -2.0])
        w.flush()
        with open_recording(root) as rec:
            info = rec.info()
            assert info["status"] == "recording" and info["open_segments"] >= 1
            assert info["ranks"][0]["writer_alive"] is True
            assert rec.sql("SELECT count(*) FROM tokens").fetchall() == [(6,)]
            w.rollout(step=1, request_id="r3", prompt_ids=[1], output_ids=[4], logprobs=[-0.5])
            w.flush()
            assert rec.sql("SELECT count(*) FROM rollouts").fetchall() == [(3,)]  # a snapshot
            rec.refresh()
            assert rec.sql("SELECT count(*) FROM rollouts").fetchall() == [(4,)]
            w.close()
            rec.refresh()
            info = rec.info()
            assert info["status"] == "complete" and info["open_segments"] == 0
            assert rec.sql("SELECT sum(token_id) FROM tokens").fetchall() == [(3 * 5 + 4,)]
    finally:
        w.close()


def _write_stream(path, table, rows):
    sch = SCHEMAS[table]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        w = ipc.new_stream(f, sch)
        w.write_table(pa.Table.from_pylist(rows, schema=sch))


def test_closed_file_wins_over_its_leftover_stream(known):
    stream = segment_path(known, "rollouts", 0, 0, open_=True)
    assert stream.with_suffix(".arrow").exists()
    _write_stream(stream, "rollouts", [dict(step=0, request_id="ghost", rank=0, time_ns=1, prompt_ids=[1],
                                            output_ids=[1], logprobs=[-1.0])])
    with open_recording(known) as rec:
        ids = sorted(r[0] for r in rec.sql("SELECT request_id FROM rollouts").fetchall())
    assert ids == ["a", "b", "c"]


def _scan_boxes(plan: str) -> list[str]:
    """The text of each Arrow scan operator box in a rendered plan."""
    lines = plan.splitlines()
    boxes, cols = [], []
    for i, line in enumerate(lines):
        j = line.find("ARROW_SCAN")
        if j >= 0:
            cols.append((i, j))
    for i, j in cols:
        start = lines[i].rfind("│", 0, j)
        end = lines[i].find("│", j)
        text = []
        for line in lines[i:]:
            seg = line[start:end + 1] if len(line) > end else ""
            if not seg.startswith("│"):
                break
            text.append(seg)
        boxes.append(" ".join(text))
    return boxes


def test_explain_shows_projection_and_filter_pushed_into_the_arrow_scan(known):
    with open_recording(known) as rec:
        plan = rec.sql("EXPLAIN SELECT request_id FROM rollouts WHERE step = 1").fetchall()[0][1]
        boxes = _scan_boxes(plan)
        assert len(boxes) == 1, plan
        assert "Filters:" in boxes[0] and "step" in boxes[0] and "= 1" in boxes[0], plan
        assert "request_id" in boxes[0] and "output_ids" not in boxes[0], plan
        plan = rec.sql("EXPLAIN SELECT count(*) FROM tokens WHERE step = 1").fetchall()[0][1]
        boxes = _scan_boxes(plan)
        # rollouts, trainer and the reference filtered by step; the trainer semantics read whole,
        # two small columns of the reference table
        filtered = [b for b in boxes if "Filters:" in b and "= 1" in b]
        assert len(boxes) == 4 and len(filtered) == 3, plan
        whole = next(b for b in boxes if b not in filtered)
        assert "trainer_semantics" in whole and "lp_sampler" not in whole, plan
        assert not any("prompt_ids" in b for b in boxes), plan


def test_tables_without_segments_are_empty_views_with_the_schema(tmp_path):
    with Recorder(tmp_path / "r", rank=0) as rec:
        rec.event("run_start")
    with open_recording(tmp_path / "r") as rec:
        for table in ("trainer", "topk", "weights", "rejects", "replays"):
            rel = rec.sql(f"SELECT * FROM {table}")
            assert rel.columns == SCHEMAS[table].names and rel.fetchall() == []
        assert rec.sql("SELECT count(*) FROM step_metrics").fetchall() == [(0,)]
        assert rec.sql("SELECT kind FROM events").fetchall() == [("run_start",)]


def test_older_segments_and_extra_columns_are_unified(known, relist):
    old = pa.schema([f for f in SCHEMAS["rollouts"] if f.name not in ("num_cached_tokens", "engine_config")]
                    + [pa.field("logit_bias", pa.string())])
    path = segment_path(known, "rollouts", 7, 0, open_=False)
    path.parent.mkdir(parents=True)
    t = pa.Table.from_pylist([dict(step=2, request_id="old", rank=7, time_ns=1, prompt_ids=[1], output_ids=[3],
                                   logprobs=[-2.0], logit_bias="{}")], schema=old)
    with ipc.new_file(str(path), old) as w:
        w.write_table(t)
    relist(path)
    with open_recording(known) as rec:
        assert rec.sql("SELECT request_id, num_cached_tokens, engine_config, logit_bias FROM rollouts "
                       "ORDER BY request_id").fetchall() == [
            ("a", 1, None, None), ("b", None, None, None), ("c", None, None, None), ("old", None, None, "{}")]
        assert rec.sql("SELECT token_id, rank FROM tokens WHERE step = 2").fetchall() == [(3, 7)]


def test_cursor_serves_another_thread(known):
    out = {}
    with open_recording(known) as rec:
        def work():
            cur = rec.cursor()
            out["n"] = cur.sql("SELECT count(*) FROM tokens WHERE lp_trainer IS NOT NULL").fetchall()
            cur.close()
        th = threading.Thread(target=work)
        th.start()
        main = rec.sql("SELECT count(*) FROM step_metrics").fetchall()
        th.join(30)
    assert out["n"] == [(5,)] and main == [(2,)]


def test_step_filters_over_many_segments_match_a_full_scan(tmp_path):
    root = tmp_path / "many"
    with Recorder(root, rank=0, segment_bytes=1, batch_rows=4) as rec:  # a segment per batch
        rec.event("run_start")
        for step in range(6):
            rec.event("step_start", step=step)
            for i in range(4):
                rec.rollout(step=step, request_id=f"{step}-{i}", prompt_ids=[1], output_ids=[i] * (i + 1),
                            logprobs=[-1.0] * (i + 1))
            rec.flush()
        rec.event("run_end")
    assert len(list((root / "rollouts" / "rank-0000").glob("*.arrow"))) >= 6
    with open_recording(root) as rec:
        full = rec.sql("SELECT step, count(*) FROM tokens GROUP BY step ORDER BY step").fetchall()
        assert full == [(s, 10) for s in range(6)]
        for s in range(7):
            assert rec.sql(f"SELECT count(*) FROM tokens WHERE step = {s}").fetchall() == [(10 if s < 6 else 0,)]
        assert rec.sql("SELECT count(*) FROM rollouts WHERE step BETWEEN 2 AND 3").fetchall() == [(8,)]
        assert rec.sql("SELECT kind FROM events WHERE step IS NULL ORDER BY seq").fetchall() == \
            [("run_start",), ("run_end",)]
        assert rec.sql("SELECT count(*) FROM events WHERE step = 4").fetchall() == [(1,)]


def test_refresh_picks_up_a_segment_with_a_new_column(known, relist):
    with open_recording(known) as rec:
        assert "note" not in rec.sql("SELECT * FROM rollouts").columns
        sch = SCHEMAS["rollouts"].append(pa.field("note", pa.string()))
        path = segment_path(known, "rollouts", 3, 0, open_=False)
        path.parent.mkdir(parents=True)
        with ipc.new_file(str(path), sch) as w:
            w.write_table(pa.Table.from_pylist([dict(step=5, request_id="n", rank=3, time_ns=1, prompt_ids=[1],
                                                     output_ids=[1, 2], logprobs=[-1.0, -1.0], note="hi")],
                                               schema=sch))
        relist(path)
        rec.refresh()
        assert rec.sql("SELECT request_id, note FROM rollouts WHERE note IS NOT NULL").fetchall() == [("n", "hi")]
        assert rec.sql("SELECT count(*) FROM known.tokens").fetchall() == [(8,)]
        assert rec.sql("SELECT max(step) FROM step_metrics").fetchall() == [(5,)]
