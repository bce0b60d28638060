"""The step_metrics view (computed from the tables' lists) equals the per-step metrics
computed over the tokens view, also on rows the Recorder would refuse."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from replay import Recorder, open_recording
from replay.metrics import STEP_METRIC_COLUMNS, step_metrics_lists_sql, step_metrics_sql
from replay.schema import SCHEMAS, segment_path


def _segment(root, table, rank, rows, relist):
    sch = SCHEMAS[table]
    path = segment_path(root, table, rank, 0, open_=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ipc.new_file(str(path), sch) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=sch))
    relist(path)  # listed in the manifest, as a writer of rank `rank` would have


def _roll(step, rid, out, lp, tv, reward=1.0, t=1):
    return dict(step=step, request_id=rid, rank=5, time_ns=t, prompt_ids=[1], output_ids=out,
                logprobs=lp, token_versions=tv, reward=reward)


def _tr(step, rid, lp, ent=None, version=3, t=1, rank=5):
    return dict(step=step, request_id=rid, rank=rank, time_ns=t, logprobs=lp, entropy=ent, weight_version=version)


@pytest.fixture
def odd(tmp_path, relist):
    root = tmp_path / "odd"
    with Recorder(root, rank=0, strict=True) as rec:  # ordinary rows
        for i in range(3):
            rec.rollout(step=1, request_id=f"ok{i}", prompt_ids=[1], output_ids=[4, 5, 6],
                        logprobs=[-0.5, -0.25 * i, -1.0], token_versions=[1, 1, 2], reward=float(i))
            rec.trainer(step=1, request_id=f"ok{i}", logprobs=[-0.4, -0.3, -1.5], entropy=[1.0, 2.0, 0.5],
                        weight_version=2)
    _segment(root, "rollouts", 5, [
        _roll(1, "long-lp", [1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6], [0, 1, 1]),
        _roll(2, "null-inside", [1, 2, 3, 4, 5], [-0.1, None, -0.3, -0.4, -0.5], None, reward=0.0),
        _roll(2, "empty", [], [], []),
        _roll(2, "twice", [7, 8], [-1.0, -2.0], [1, 1]),
        _roll(2, "twice", [7, 8], [-1.0, -2.0], [1, 2], t=2),
        _roll(3, "unscored", [1], [-1.0], [0]),
        _roll(4, "no-version", [1, 2], [-0.5, -0.5], [0, 0]),
    ], relist)
    _segment(root, "trainer", 5, [
        _tr(1, "long-lp", [-0.2, -0.2, -0.2, -0.2, -0.2], None),
        _tr(2, "null-inside", [-9.0] * 5, [9.0] * 5, t=1),
        _tr(2, "null-inside", [-0.2, -0.1, None], [0.5, None, 1.5, 2.5, 3.5], version=None, t=5),
        _tr(2, "empty", [], []),
        _tr(2, "twice", [-1.5, -1.0], [1.0, 1.0]),
        _tr(7, "trainer-only", [-1.0], [1.0]),
        _tr(4, "no-version", [-0.25, -0.75], [0.5, 1.5], version=None),
    ], relist)
    return root


def test_view_equals_the_metrics_over_the_tokens_view(odd):
    with open_recording(odd) as rec:
        rel = rec.sql("SELECT * FROM step_metrics")
        assert tuple(rel.columns) == STEP_METRIC_COLUMNS
        fast = rel.fetchall()
        slow = rec.sql(step_metrics_sql("tokens", "rollouts", "trainer")).fetchall()
    assert [r[0] for r in fast] == [r[0] for r in slow] == [1, 2, 3, 4, 7]
    for a, b in zip(fast, slow):
        for col, x, y in zip(STEP_METRIC_COLUMNS, a, b):
            if y is None:
                assert x is None, (a[0], col)
            else:
                assert x == pytest.approx(y, rel=1e-12, abs=1e-15), (a[0], col)
    n_tokens = dict((r[0], r[2]) for r in fast)
    # step 1: 3 ok rows x 3 + long-lp cut to its 4 output tokens;
    # step 2: null-inside's scoring at version 3 (a scoring of unknown version counts as older,
    # though written later): its 5 tokens but the one without a rollout logprob; + 2 tokens x 2
    # rows of twice
    assert n_tokens == {1: 13, 2: 8, 3: 0, 4: 2, 7: 0}
    step4 = dict(zip(STEP_METRIC_COLUMNS, fast[3]))
    assert step4["lag"] is None and step4["entropy"] == pytest.approx(1.0)


def test_lists_sql_checks_relation_names():
    with pytest.raises(Exception, match="identifier"):
        step_metrics_lists_sql(rollouts="rollouts; DROP TABLE x")


def test_the_scoring_that_counts_is_chosen_by_weights_then_rank_never_by_clocks_of_two_ranks(tmp_path, relist):
    """Two trainer ranks score the same rollouts; rank 0's clock runs behind rank 1's. The
    scoring that counts is the one with the newest weights, then the lowest rank, then that
    rank's latest row: the same in the tokens view, both step_metrics forms and the TUI's
    numpy path. By wall clock alone every answer would differ."""
    from tui.stepstats import fetch, match_trainer, step_metrics

    root = tmp_path / "two-clocks"
    with Recorder(root, rank=0, strict=True) as rec:
        for rid in "abc":
            rec.rollout(step=1, request_id=rid, prompt_ids=[1], output_ids=[4, 5], logprobs=[-1.0, -1.0],
                        token_versions=[1, 1], reward=1.0)
    _segment(root, "trainer", 1, [                      # rank 1: its clock is ahead
        _tr(1, "a", [-2.0, -2.0], version=2, t=100, rank=1),
        _tr(1, "b", [-3.0, -3.0], version=3, t=100, rank=1),
        _tr(1, "c", [-1.5, -1.5], version=3, t=100, rank=1),
    ], relist)
    _segment(root, "trainer", 2, [                      # rank 0's rows (written in rank 0's clock)
        _tr(1, "a", [-1.25, -1.25], version=3, t=50, rank=0),   # newer weights: counts
        _tr(1, "b", [-1.5, -1.5], version=3, t=10, rank=0),     # same weights, lower rank: counts
        _tr(1, "c", [-9.0, -9.0], version=3, t=5, rank=0),
        _tr(1, "c", [-1.75, -1.75], version=3, t=6, rank=0),   # rank 0's later row: counts
    ], relist)
    want = {"a": -1.25, "b": -1.5, "c": -1.75}
    with open_recording(root) as rec:
        got = {rid: lp for rid, lp in rec.sql("SELECT request_id, lp_trainer FROM tokens").fetchall()}
        assert got == want
        fast = dict(zip(STEP_METRIC_COLUMNS, rec.sql("SELECT * FROM step_metrics").fetchall()[0]))
        slow = dict(zip(STEP_METRIC_COLUMNS, rec.sql(step_metrics_sql("tokens", "rollouts", "trainer")).fetchall()[0]))
        with rec.cursor() as cur:
            rollouts, trainer = fetch(cur, rec.names[0])
            numpy = step_metrics(rollouts, trainer)
    assert fast["mean_abs_log_ratio"] == pytest.approx(0.5) == slow["mean_abs_log_ratio"]
    assert numpy["mean_abs_log_ratio"] == [pytest.approx(0.5)]
    rows = match_trainer(rollouts, trainer)
    chosen = {r: trainer.column("lt")[int(j)].as_py()[0] for r, j in zip(rollouts.column("request_id").to_pylist(), rows)}
    assert chosen == want
