"""Bad input: strict mode raises BadInput naming field/step/request; lenient mode writes rejects."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from replay import BadInput, Recorder
from replay.record.validate import LOGPROB_MAX, Problem, StepTracker, check_arrays, check_scalars, row_json

torch = pytest.importorskip("torch")


def good(**over) -> dict:
    row = dict(step=1, request_id="r1", prompt_ids=[1, 2], output_ids=[3, 4, 5],
               logprobs=[-0.1, -0.2, -0.3], token_versions=[0, 0, 1])
    row.update(over)
    return row


# (call, kwargs, field) for every kind of bad input the recorder refuses
BAD = [
    ("rollout", good(step=-1), "step"),
    ("rollout", good(step=1.5), "step"),
    ("rollout", good(step=True), "step"),
    ("rollout", good(request_id=""), "request_id"),
    ("rollout", good(request_id=17), "request_id"),
    ("rollout", good(prompt_ids=None), "prompt_ids"),
    ("rollout", good(output_ids=[3, 4]), "logprobs"),
    ("rollout", good(token_versions=[0, 1]), "token_versions"),
    ("rollout", good(logprobs=[-0.1, float("nan"), -0.3]), "logprobs"),
    ("rollout", good(logprobs=[-0.1, float("-inf"), -0.3]), "logprobs"),
    ("rollout", good(logprobs=[-0.1, 0.5, -0.3]), "logprobs"),
    ("rollout", good(logprobs=["a", "b", "c"]), "logprobs"),
    ("rollout", good(logprobs=np.array(["a", "b", "c"])), "logprobs"),
    ("rollout", good(output_ids=[3, -4, 5]), "output_ids"),
    ("rollout", good(output_ids=[3, 2**31, 5]), "output_ids"),
    ("rollout", good(output_ids=[3, 4.5, 5]), "output_ids"),
    ("rollout", good(output_ids=np.array([3.0, 4.0, 5.0])), "output_ids"),
    ("rollout", good(output_ids=np.array([3, 4, 5], dtype=object)), "output_ids"),
    ("rollout", good(prompt_ids=["x"]), "prompt_ids"),
    ("rollout", good(prompt_ids=[[1, 2]]), "prompt_ids"),
    ("rollout", good(reward="high"), "reward"),
    ("rollout", good(top_k=2.5), "top_k"),
    ("rollout", good(num_cached_tokens=-1), "num_cached_tokens"),
    ("trainer", dict(step=1, request_id="r1", logprobs=[-0.1, float("nan")]), "logprobs"),
    ("trainer", dict(step=1, request_id="r1", logprobs=[-0.1, -0.2], entropy=[1.0]), "entropy"),
    ("trainer", dict(step=1, request_id=None, logprobs=[-0.1]), "request_id"),
    ("topk", dict(step=1, request_id="r1", source="oracle", ids=[[1, 2]], logprobs=[[-1, -2]]), "source"),
    ("topk", dict(step=1, request_id="r1", source="engine", ids=[[1, 2]], logprobs=[[-1, -2, -3]]), "logprobs"),
    ("topk", dict(step=1, request_id="r1", source="engine", ids=[1, 2], logprobs=[-1, -2]), "ids"),
    ("topk", dict(step=1, request_id="r1", source="engine", ids=[[1, -2]], logprobs=[[-1, -2]]), "ids"),
    ("topk", dict(step=1, request_id="r1", source="engine", ids=[[1, 2]], logprobs=[[0.5, -2]]), "logprobs"),
    ("topk", dict(step=1, request_id="r1", source="engine", ids=[[1, 2]], logprobs=[[-1, -2]],
                  positions=[0, 1]), "positions"),
    ("metrics", dict(step=1, values={"a": "x"}), "values"),
    ("metrics", dict(step=-2, values={"a": 1.0}), "step"),
    ("event", dict(kind=""), "kind"),
    ("weights", dict(version=-1, sha256="ab" * 32), "version"),
]


def _call(rec: Recorder, method: str, kwargs: dict) -> None:
    kwargs = dict(kwargs)
    if method == "event":
        rec.event(kwargs.pop("kind"), **kwargs)
    else:
        getattr(rec, method)(**kwargs)


@pytest.mark.parametrize("method,kwargs,field", BAD, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(BAD)])
def test_strict_raises_bad_input_naming_field_step_request(tmp_path, method, kwargs, field):
    with Recorder(tmp_path / "r", strict=True) as rec:
        with pytest.raises(BadInput) as err:
            _call(rec, method, kwargs)
        e = err.value
        assert e.field == field
        step = kwargs.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            assert e.step == step and f"step={step}" in str(e)
        if isinstance(kwargs.get("request_id"), str) and kwargs["request_id"]:
            assert e.request_id == kwargs["request_id"] and "request_id='r1'" in str(e)
        assert f"field={field}" in str(e)
        rec.rollout(**good(request_id="after"))  # the recorder goes on after a refusal
    assert _read(tmp_path / "r", "rollouts").column("request_id").to_pylist() == ["after"]


def test_lenient_sends_every_bad_row_to_rejects_and_keeps_good_rows(tmp_path, caplog):
    root = tmp_path / "r"
    with caplog.at_level(logging.WARNING, logger="replay.record.recorder"):
        with Recorder(root) as rec:
            for i, (method, kwargs, _) in enumerate(BAD):
                rec.rollout(**good(request_id=f"ok{i}"))
                _call(rec, method, kwargs)
    rej = _read(root, "rejects").to_pylist()
    assert [(r["table"], r["field"]) for r in rej] == [
        ({"rollout": "rollouts", "event": "events"}.get(m, m), f) for m, _, f in BAD]
    for r in rej:
        assert r["reason"] and r["rank"] == 0 and r["time_ns"] > 0
        json.loads(r["row"])  # valid JSON, always
    assert _read(root, "rollouts").column("request_id").to_pylist() == [f"ok{i}" for i in range(len(BAD))]
    nan_row = json.loads(rej[8]["row"])
    assert nan_row["logprobs"] == [pytest.approx(-0.1), "nan", pytest.approx(-0.3)]
    assert rej[8]["step"] == 1 and rej[8]["request_id"] == "r1"
    warned = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == len({({"rollout": "rollouts", "event": "events"}.get(m, m), f) for m, _, f in BAD})


def test_order_checks_steps_backwards_and_duplicates(tmp_path):
    root = tmp_path / "r"
    with Recorder(root) as rec:
        rec.rollout(**good(step=3, request_id="a"))
        rec.rollout(**good(step=3, request_id="a"))  # duplicate
        rec.rollout(**good(step=2, request_id="a"))  # backwards
        rec.rollout(**good(step=4, request_id="a"))  # fine: a request may come back later
        rec.trainer(step=3, request_id="a", logprobs=[-1.0])
        rec.trainer(step=3, request_id="a", logprobs=[-1.0])  # trainer rows may repeat (epochs)
        rec.trainer(step=1, request_id="a", logprobs=[-1.0])  # backwards
    assert _read(root, "rollouts").column("step").to_pylist() == [3, 4]
    assert _read(root, "trainer").column("step").to_pylist() == [3, 3]
    rej = _read(root, "rejects").to_pylist()
    assert [(r["table"], r["field"], r["step"]) for r in rej] == [
        ("rollouts", "request_id", 3), ("rollouts", "step", 2), ("trainer", "step", 1)]
    assert "duplicate" in rej[0]["reason"] and "backwards" in rej[1]["reason"]
    with Recorder(tmp_path / "s", strict=True) as rec:
        rec.rollout(**good(step=3, request_id="a"))
        with pytest.raises(BadInput, match="duplicate"):
            rec.rollout(**good(step=3, request_id="a"))
        with pytest.raises(BadInput, match="backwards") as err:
            rec.rollout(**good(step=1, request_id="a"))
        assert (err.value.field, err.value.step, err.value.request_id) == ("step", 1, "a")


def test_tiny_positive_logprob_rounding_is_accepted(tmp_path):
    with Recorder(tmp_path / "r", strict=True) as rec:
        rec.rollout(**good(logprobs=[LOGPROB_MAX / 2, -0.2, 0.0]))
    assert _read(tmp_path / "r", "rollouts").num_rows == 1


def test_lenient_rejects_bad_torch_and_numpy_rows_in_one_batch(tmp_path):
    root = tmp_path / "r"
    with Recorder(root, flush_interval_s=60) as rec:
        rec.rollout(**good(request_id="a", output_ids=torch.tensor([1, 2, 3]),
                           logprobs=torch.tensor([-1.0, -2.0, -3.0])))
        rec.rollout(**good(request_id="b", output_ids=np.array([1, 2, 3]),
                           logprobs=np.array([-1.0, np.inf, -3.0])))
        rec.rollout(**good(request_id="c", output_ids=np.array([1, 2, 3]), logprobs=np.array([-1.0, -2, -3])))
    assert _read(root, "rollouts").column("request_id").to_pylist() == ["a", "c"]
    rej = _read(root, "rejects").to_pylist()
    assert [(r["request_id"], r["field"]) for r in rej] == [("b", "logprobs")]
    assert json.loads(rej[0]["row"])["logprobs"] == [-1.0, "inf", -3.0]


# ---------------------------------------------------------------- pure functions

def test_check_scalars_normalises_numpy_and_tensor_scalars():
    row = {"step": np.int64(3), "request_id": "x", "reward": torch.tensor(0.25), "top_k": np.int32(5)}
    assert check_scalars("rollouts", row) is None
    assert row["step"] == 3 and type(row["step"]) is int and row["reward"] == 0.25
    assert check_scalars("rollouts", {"step": 1}) == Problem("request_id", "required field is missing")


def test_check_arrays_is_vectorised_over_a_batch():
    flat = np.array([-0.1, -0.2, np.nan, -0.3, 0.2, -0.1], np.float32)
    lengths = np.array([2, 2, 2])
    ids = np.array([1, 2, 3, 4, 5, -6], np.int32)
    bad = check_arrays("rollouts", {"logprobs": (flat, lengths), "output_ids": (ids, lengths)},
                       {"logprobs": np.ones(3, bool), "output_ids": np.ones(3, bool)}, 3)
    assert sorted(bad) == [1, 2]
    assert bad[1].field == "logprobs" and "NaN" in bad[1].reason
    assert bad[2].field == "output_ids"  # ids are checked first: row 2 has a negative id and a positive logprob


def test_step_tracker():
    t = StepTracker()
    assert t.check("rollouts", 2, "a") is None
    t.commit("rollouts", 2, "a")
    assert t.check("rollouts", 2, "a").field == "request_id"
    assert t.check("rollouts", 1, "a").field == "step"
    assert t.check("topk", 1, "a") is None  # tables are separate
    t.commit("topk", 5, "a")
    assert t.check("topk", 5, "a") is None and t.check("topk", 4, "a").field == "step"


def test_row_json_keeps_everything():
    text = row_json({"a": np.array([1.0, np.nan, -np.inf]), "b": torch.tensor([1, 2]), "c": object(),
                     "d": np.float32(0.5), "e": [float("inf")]})
    back = json.loads(text)
    assert back["a"] == [1.0, "nan", "-inf"] and back["b"] == [1, 2] and back["d"] == 0.5
    assert back["c"].startswith("<object") and back["e"] == ["inf"]


def _read(root: Path, table: str) -> pa.Table:
    parts = [pa.ipc.open_file(str(p)).read_all() for p in sorted((root / table / "rank-0000").glob("*.arrow"))]
    from replay.schema import SCHEMAS

    return pa.concat_tables(parts) if parts else SCHEMAS[table].empty_table()


def test_lenient_topk_batch_keeps_good_calls_around_a_bad_one(tmp_path):
    root = tmp_path / "r"
    ids = np.array([[1, 2], [3, 4]])
    lps = np.array([[-0.1, -1.0], [-0.2, -2.0]], np.float32)
    with Recorder(root, flush_interval_s=60) as rec:
        rec.topk(step=0, request_id="a", source="engine", ids=ids, logprobs=lps)
        rec.topk(step=0, request_id="b", source="engine", ids=-ids, logprobs=lps)
        rec.topk(step=0, request_id="c", source="engine", ids=ids, logprobs=np.abs(lps))
        rec.topk(step=0, request_id="d", source="trainer", ids=ids[:1], logprobs=lps[:1], positions=[7])
    t = _read(root, "topk").to_pylist()
    assert [(r["request_id"], r["pos"], r["ids"]) for r in t] == [
        ("a", 0, [1, 2]), ("a", 1, [3, 4]), ("d", 7, [1, 2])]
    assert [(r["request_id"], r["field"]) for r in _read(root, "rejects").to_pylist()] == [
        ("b", "ids"), ("c", "logprobs")]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_top_k_calls_are_judged_by_one_rule_one_at_a_time_or_batched(tmp_path, strict):
    """A call checked alone (strict, on the caller's thread) and calls checked batched (the
    writer's concatenated arrays) keep and refuse the same calls: -inf (outside the support) is
    kept, NaN, +inf, a positive logprob and a negative id are refused, each naming its field."""
    from replay import Recorder, open_recording
    from replay.errors import BadInput

    ids = np.array([[1, 2], [3, 4]], np.int32)
    calls = {"minus-inf": ([[-0.1, -np.inf], [-0.2, -3.0]], ids, None),
             "nan": ([[-0.1, np.nan], [-0.2, -3.0]], ids, "logprobs"),
             "plus-inf": ([[np.inf, -1.0], [-0.2, -3.0]], ids, "logprobs"),
             "positive": ([[0.5, -1.0], [-0.2, -3.0]], ids, "logprobs"),
             "negative-id": ([[-0.1, -1.0], [-0.2, -3.0]], -ids, "ids"),
             "fine": ([[-0.1, -1.0], [-0.2, -3.0]], ids, None)}
    with Recorder(tmp_path / "r", strict=strict) as rec:
        for rid, (lps, ids_, field) in calls.items():
            kw = dict(step=0, request_id=rid, source="engine", ids=ids_, logprobs=np.asarray(lps, np.float32))
            if strict and field is not None:
                with pytest.raises(BadInput) as e:
                    rec.topk(**kw)
                assert e.value.field == field
            else:
                rec.topk(**kw)
    with open_recording(tmp_path / "r") as r:
        kept = {rid for (rid,) in r.sql("SELECT DISTINCT request_id FROM topk").fetchall()}
        refused = dict(r.sql("SELECT request_id, field FROM rejects").fetchall())
    assert kept == {"minus-inf", "fine"}
    if not strict:
        assert refused == {rid: f for rid, (_, _, f) in calls.items() if f is not None}


def test_one_call_and_a_batch_give_the_same_verdict_on_scalars():
    """check_scalars (one call, strict mode) and check_scalar_columns (a batch, in the writer) are
    one rule written twice for speed: every field of every table, given good and bad values, gets
    the same verdict and the same normalised value from both."""
    from replay.record.validate import SCALARS, check_scalar_columns

    values = {"str": ["ok", "", 3, None, np.str_("s")], "step": [0, 7, -1, 2.5, True, np.int64(4), None],
              "count": [0, 3, -2, np.int32(5), "x", None], "int": [-3, 4, 1.5, np.int64(-2), None, False],
              "real": [0.5, 3, float("nan"), np.float32(0.25), "x", True, None],
              "source": ["engine", "trainer", "replay", "other", None]}
    checked = 0
    for table, fields in SCALARS.items():
        base = {n: {"str": "a", "step": 1, "count": 1, "int": 1, "real": 1.0, "source": "engine"}[tag]
                for n, (tag, _) in fields.items()}
        for name, (tag, _) in fields.items():
            rows = [dict(base, **{name: v}) for v in values[tag]]
            cols, bad = check_scalar_columns(table, [dict(r) for r in rows])
            for i, row in enumerate(rows):
                one = dict(row)
                assert check_scalars(table, one) == bad.get(i), (table, name, row[name])
                if i not in bad:
                    assert one[name] == cols[name][i] or (one[name] != one[name] and cols[name][i] != cols[name][i])
                checked += 1
    assert checked > 100
