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


def _tr(step, rid, lp, ent=None, version=3, t=1):
    return dict(step=step, request_id=rid, rank=5, time_ns=t, logprobs=lp, entropy=ent, weight_version=version)


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
    # step 2: position 0 of null-inside (its latest scoring) + 2 tokens x 2 rows of twice
    assert n_tokens == {1: 13, 2: 5, 3: 0, 4: 2, 7: 0}
    step4 = dict(zip(STEP_METRIC_COLUMNS, fast[3]))
    assert step4["lag"] is None and step4["entropy"] == pytest.approx(1.0)


def test_lists_sql_checks_relation_names():
    with pytest.raises(Exception, match="identifier"):
        step_metrics_lists_sql(rollouts="rollouts; DROP TABLE x")
