"""Mismatch metrics: the numpy definitions and their DuckDB twin agree step by step."""
from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from replay.errors import BadInput
from replay.metrics import (METRIC_ALIASES, METRIC_NAMES, RHO_CLAMP, STEP_METRIC_COLUMNS,
                            canonical_metric_name, clip_bounds, step_metrics_sql,
                            token_metrics)


def _by_definition(lt, lr, eps_low=0.2, eps_high=0.2):
    """The DESIGN §5 formulas written out token by token in plain Python."""
    n = len(lt)
    rs = [a - b for a, b in zip(lt, lr)]
    rhos = [math.exp(r) for r in rs]
    lo, hi = math.log(1 - eps_low), math.log(1 + eps_high)
    return {
        "mean_abs_log_ratio": sum(abs(r) for r in rs) / n,
        "k1": sum(-r for r in rs) / n,
        "kl_new_old": sum(p - 1 - r for p, r in zip(rhos, rs)) / n,
        "clip_rate": sum(1 for r in rs if r < lo or r > hi) / n,
        "ess": sum(rhos) ** 2 / sum(p * p for p in rhos) / n,
        "chi2": sum(p * p for p in rhos) / n - 1,
        "prob_diff": sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(lt, lr)) / n,
        "n_tokens": n,
    }


# ---------------------------------------------------------------- numpy

def test_token_metrics_follow_the_definitions():
    rng = np.random.default_rng(0)
    lr = np.log(rng.uniform(0.01, 1.0, 200))
    lt = lr + rng.normal(0, 0.3, 200)
    got = token_metrics(lt, lr, eps_low=0.2, eps_high=0.28)
    want = _by_definition(lt.tolist(), lr.tolist(), 0.2, 0.28)
    assert tuple(got) == METRIC_NAMES
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
    assert 0 < got["clip_rate"] < 1 and 0 < got["ess"] < 1 and got["kl_new_old"] > 0


def test_identical_logprobs_give_no_mismatch():
    lp = np.log(np.linspace(0.05, 0.95, 50))
    got = token_metrics(lp, lp.copy())
    assert got == {"mean_abs_log_ratio": 0.0, "k1": 0.0, "kl_new_old": 0.0, "clip_rate": 0.0,
                   "ess": 1.0, "chi2": 0.0, "prob_diff": 0.0, "n_tokens": 50}


def test_empty_input_gives_nans():
    got = token_metrics([], [], clip="sequence", seq_lengths=[])
    assert got["n_tokens"] == 0
    assert all(math.isnan(got[k]) for k in METRIC_NAMES if k != "n_tokens")


def test_sequence_clip_uses_the_mean_ratio_of_each_sequence():
    # seq A: tokens +0.5 and -0.5 -> every token clips, its mean (0) does not
    # seq B: both tokens +0.3 -> mean clips; seq C (empty) is skipped
    lr = np.zeros(4)
    lt = np.array([0.5, -0.5, 0.3, 0.3])
    assert token_metrics(lt, lr)["clip_rate"] == 1.0
    seq = token_metrics(lt, lr, clip="sequence", seq_lengths=[2, 2, 0])
    assert seq["clip_rate"] == 0.5
    assert seq["k1"] == token_metrics(lt, lr)["k1"]


@pytest.mark.parametrize("kwargs, field", [
    ({"clip": "sequence"}, "seq_lengths"),
    ({"clip": "sequence", "seq_lengths": [1, 1]}, "seq_lengths"),
    ({"clip": "sequence", "seq_lengths": [4, -1]}, "seq_lengths"),
    ({"clip": "batch"}, "clip"),
    ({"eps_low": 1.5}, "eps"),
    ({"eps_high": -0.1}, "eps"),
])
def test_bad_arguments_are_bad_input(kwargs, field):
    with pytest.raises(BadInput) as e:
        token_metrics([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], **kwargs)
    assert e.value.field == field


def test_length_mismatch_is_bad_input():
    with pytest.raises(BadInput, match="3 tokens"):
        token_metrics([0.0, 0.0, 0.0], [0.0, 0.0])


def test_extreme_ratios_do_not_overflow_ess_or_chi2():
    lr = np.array([-1000.0, -0.1, -0.2, -0.3])
    lt = np.array([0.0, -0.1, -0.2, -0.3])  # r = 1000 on the first token
    got = token_metrics(lt, lr)
    assert math.isfinite(got["ess"]) and math.isfinite(got["chi2"])
    rho_c = np.exp(np.array([RHO_CLAMP, 0, 0, 0]))
    assert got["ess"] == pytest.approx(rho_c.sum() ** 2 / (rho_c ** 2).sum() / 4)
    assert got["kl_new_old"] == math.inf  # unclamped on purpose
    assert got["clip_rate"] == 0.25 and got["mean_abs_log_ratio"] == 250.0


def test_eps_low_of_one_disables_lower_clipping():
    assert clip_bounds(1.0, 0.2)[0] == -math.inf
    assert token_metrics([-50.0], [0.0], eps_low=1.0)["clip_rate"] == 0.0


def test_aliases_map_pipelinerl_names_to_ours():
    assert METRIC_ALIASES["clamp_log_ratio_new_old_indicator"] == "clip_rate"
    assert METRIC_ALIASES["mean_abs_log_ratio_new_old"] == "mean_abs_log_ratio"
    assert canonical_metric_name("kl_new_old") == "kl_new_old"
    assert canonical_metric_name("clamp_log_ratio_new_old_indicator") == "clip_rate"
    assert canonical_metric_name("reward") == "reward"
    assert set(METRIC_ALIASES.values()) <= set(METRIC_NAMES)
    with pytest.raises(BadInput, match="unknown metric"):
        canonical_metric_name("nonsense")


# ---------------------------------------------------------------- SQL

def _tokens_and_rollouts(seed: int = 0):
    """A random recording-like pair of tables; step 3 has no scored token, step 5 no token."""
    rng = np.random.default_rng(seed)
    tok = {k: [] for k in ("step", "request_id", "pos", "token_id", "lp_rollout", "lp_trainer",
                           "log_ratio", "weight_version", "trainer_version", "entropy")}
    rol = {"step": [], "request_id": [], "reward": []}
    for step in range(6):
        for j in range(int(rng.integers(2, 6))):
            rid = f"s{step}-r{j}"
            rol["step"].append(step)
            rol["request_id"].append(rid)
            rol["reward"].append(float(rng.integers(0, 2)))
            if step == 5:
                continue
            n = int(rng.integers(1, 30))
            lr = np.log(rng.uniform(0.001, 1.0, n)).astype(np.float32)
            lt = (lr + rng.normal(0, 0.25, n)).astype(np.float32)
            scored = rng.random(n) > 0.15 if step != 3 else np.zeros(n, bool)
            wv = int(rng.integers(0, step + 1))
            for p in range(n):
                tok["step"].append(step)
                tok["request_id"].append(rid)
                tok["pos"].append(p)
                tok["token_id"].append(int(rng.integers(0, 1000)))
                tok["lp_rollout"].append(float(lr[p]))
                tok["lp_trainer"].append(float(lt[p]) if scored[p] else None)
                tok["log_ratio"].append(float(lt[p]) - float(lr[p]) if scored[p] else None)
                tok["weight_version"].append(wv)
                tok["trainer_version"].append(step if scored[p] else None)
                tok["entropy"].append(float(rng.uniform(0, 3)) if scored[p] else None)
    tokens = pa.table({
        "step": pa.array(tok["step"], pa.int64()),
        "request_id": pa.array(tok["request_id"], pa.string()),
        "pos": pa.array(tok["pos"], pa.int32()),
        "token_id": pa.array(tok["token_id"], pa.int32()),
        "lp_rollout": pa.array(tok["lp_rollout"], pa.float32()),
        "lp_trainer": pa.array(tok["lp_trainer"], pa.float32()),
        "log_ratio": pa.array(tok["log_ratio"], pa.float64()),
        "weight_version": pa.array(tok["weight_version"], pa.int64()),
        "trainer_version": pa.array(tok["trainer_version"], pa.int64()),
        "entropy": pa.array(tok["entropy"], pa.float32()),
    })
    rollouts = pa.table({"step": pa.array(rol["step"], pa.int64()),
                         "request_id": pa.array(rol["request_id"], pa.string()),
                         "reward": pa.array(rol["reward"], pa.float64())})
    return tokens, rollouts


def _con(tokens, rollouts, trainer_steps=()):
    con = duckdb.connect()
    con.register("tokens", tokens)
    con.register("rollouts", rollouts)
    con.register("trainer", pa.table({"step": pa.array(list(trainer_steps), pa.int64())}))
    return con


def _rows(con, sql):
    table = con.sql(sql).to_arrow_table()
    assert tuple(table.column_names) == STEP_METRIC_COLUMNS
    return table.to_pylist()


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.28), (1.0, 0.05)])
def test_sql_step_metrics_equal_token_metrics_per_step(eps):
    tokens, rollouts = _tokens_and_rollouts()
    con = _con(tokens, rollouts)
    rows = _rows(con, step_metrics_sql(eps_low=eps[0], eps_high=eps[1]))
    assert [r["step"] for r in rows] == list(range(6))
    t = tokens.to_pydict()
    r = rollouts.to_pydict()
    for row in rows:
        s = row["step"]
        idx = [i for i, st in enumerate(t["step"]) if st == s and t["lp_trainer"][i] is not None]
        lt = np.array([t["lp_trainer"][i] for i in idx], np.float64)
        lr = np.array([t["lp_rollout"][i] for i in idx], np.float64)
        want = token_metrics(lt, lr, eps_low=eps[0], eps_high=eps[1])
        rewards = [rw for st, rw in zip(r["step"], r["reward"]) if st == s]
        assert row["n_sequences"] == len(rewards)
        assert row["reward"] == pytest.approx(np.mean(rewards), rel=1e-12)
        assert row["n_tokens"] == want["n_tokens"]
        if not idx:  # steps 3 and 5: no scored token
            assert all(row[k] is None for k in STEP_METRIC_COLUMNS[3:] if k != "reward")
            continue
        for k in METRIC_NAMES[:-1]:
            assert row[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (s, k)
        assert row["entropy"] == pytest.approx(np.mean([t["entropy"][i] for i in idx]), rel=1e-9)
        lag = np.mean([t["trainer_version"][i] - t["weight_version"][i] for i in idx])
        assert row["lag"] == pytest.approx(lag, rel=1e-9, abs=1e-12)
    assert {3, 5} == {row["step"] for row in rows if row["n_tokens"] == 0}


def test_sql_survives_extreme_ratios_and_matches_numpy():
    lr = [-200.0, -0.5, -0.1, -300.0]
    lt = [0.0, -0.5, -80.0, -300.0]
    tokens = pa.table({
        "step": pa.array([7] * 4, pa.int64()), "request_id": ["a"] * 4,
        "lp_rollout": pa.array(lr, pa.float32()), "lp_trainer": pa.array(lt, pa.float32()),
        "weight_version": pa.array([1] * 4, pa.int64()),
        "trainer_version": pa.array([2] * 4, pa.int64()),
        "entropy": pa.array([0.5] * 4, pa.float32()),
    })
    rollouts = pa.table({"step": pa.array([7], pa.int64()), "request_id": ["a"],
                         "reward": [1.0]})
    (row,) = _rows(_con(tokens, rollouts), step_metrics_sql())
    want = token_metrics(lt, lr)
    assert math.isfinite(row["ess"]) and math.isfinite(row["chi2"])
    for k in ("ess", "chi2", "clip_rate", "mean_abs_log_ratio", "k1", "kl_new_old",
              "prob_diff"):
        assert row[k] == pytest.approx(want[k], rel=1e-9), k
    assert row["lag"] == 1.0 and row["n_sequences"] == 1


def test_sql_lists_trainer_only_steps_and_can_leave_trainer_out():
    tokens, rollouts = _tokens_and_rollouts(1)
    con = _con(tokens, rollouts, trainer_steps=[9])
    rows = _rows(con, step_metrics_sql())
    assert rows[-1]["step"] == 9 and rows[-1]["n_sequences"] == 0
    assert rows[-1]["n_tokens"] == 0 and rows[-1]["reward"] is None
    without = _rows(con, step_metrics_sql(trainer=None))
    assert [r["step"] for r in without] == list(range(6))
    assert without == rows[:-1]


def test_sql_takes_schema_qualified_relations():
    tokens, rollouts = _tokens_and_rollouts(2)
    con = _con(tokens, rollouts)
    con.execute("CREATE SCHEMA a")
    con.execute("CREATE TABLE a.tokens AS SELECT * FROM tokens")
    con.execute("CREATE TABLE a.rollouts AS SELECT * FROM rollouts")
    con.execute("CREATE TABLE a.trainer AS SELECT * FROM trainer")
    ours = _rows(con, step_metrics_sql("a.tokens", "a.rollouts", "a.trainer"))
    assert ours == _rows(con, step_metrics_sql())


@pytest.mark.parametrize("name", ["tokens; DROP TABLE x", "1abc", "", "a..b", "t WHERE 1"])
def test_sql_rejects_odd_relation_names(name):
    with pytest.raises(BadInput, match="identifier"):
        step_metrics_sql(tokens=name)


def test_sql_has_no_trailing_semicolon():
    assert not step_metrics_sql().rstrip().endswith(";")


def test_a_replays_recorded_metrics_do_not_depend_on_the_replayed_support():
    """Tokens a replayed config could not have sampled (-inf there) are counted, left out of the
    replayed metrics only: the recorded metrics are the same whatever config is replayed."""
    from replay.fixes import resolve
    from replay.rerun.replayer import ReplayedSequence, ReplayResult

    rec, tr = [-0.5, -1.0, -0.2, -0.7], [-0.4, -1.1, -0.2, -0.9]

    def result(replayed):
        return ReplayResult(step=0, config=resolve("v1"), engine="reference", mode="score", replay_id="x",
                            rows=[ReplayedSequence("a", rec, tr, np.asarray(replayed, np.float32), None, [1, 2, 3, 4],
                                                   None, None, None, None)])
    inside = result([-0.5, -1.0, -0.2, -0.7]).summary()
    outside = result([-0.5, float("-inf"), -0.2, float("-inf")]).summary()
    assert inside["recorded"] == outside["recorded"]
    assert outside["recorded"]["n_tokens"] == 4
    assert outside["replayed"]["outside_support"] == 2 and outside["replayed"]["n_tokens"] == 2
    assert outside["fidelity"]["outside_support"] == 2
    assert math.isfinite(outside["replayed"]["mean_abs_log_ratio"])
    assert outside["replayed"]["mean_abs_log_ratio"] == pytest.approx((0.1 + 0.0) / 2)
