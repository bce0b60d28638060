"""Replay and bisection on the demo's recordings (reference engine, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from replay import open_recording
from replay.diagnose.bisect import bisect_fixes, bisect_layers, bisect_steps, bisect_steps_replay, bisect_tokens, ddmin
from replay.errors import BadInput, RecordingError
from replay.fixes import FIX_IDS
from replay.rerun.replayer import Replayer


@pytest.fixture(scope="module")
def runs(demo_runs):
    return demo_runs[0]


def test_replay_under_the_recorded_config_is_exact(runs):
    """Fidelity: every step of v1 (in-flight updates, stale prefix cache, async lag)
    and of v0 replays bit for bit on the reference engine."""
    for name in ("v1", "v0"):
        with Replayer(runs / name) as rp:
            for step in rp.steps():
                s = rp.replay(step, write=False).summary()
                assert s["fidelity"]["exact"], (name, step, s["fidelity"])
                # the replay's prefix cache served what the run's did, request by request
                assert s["prefix_cache"]["requests_differ"] == 0, (name, step, s["prefix_cache"])


def test_regenerate_with_the_same_seeds_gives_the_same_tokens(runs):
    with Replayer(runs / "v1") as rp:
        res = rp.replay(2, mode="regenerate", write=False)
    assert res.summary()["fidelity"] == {"identical_sequences": len(res.rows), "first_diff": None}


def test_replays_are_written_back_and_visible_to_sql(runs, tmp_path):
    import shutil

    path = tmp_path / "v1"
    shutil.copytree(runs / "v1", path)
    with Replayer(path) as rp:
        cfg = rp.recorded_config()
        res = rp.replay(1)
    with open_recording(path) as rec:
        n, cfg_ids = rec.sql("SELECT count(*), list(DISTINCT engine_config) FROM replays WHERE step = 1").fetchall()[0]
        assert n == len(res.rows) and cfg_ids == [cfg.id]
        # replayed logprobs equal the recorded ones under the recorded config
        diff = rec.sql("""SELECT max(abs(x.lp - y.lp)) FROM
            (SELECT request_id, unnest(logprobs) AS lp, generate_subscripts(logprobs, 1) AS i FROM replays) x
            JOIN (SELECT request_id, unnest(logprobs) AS lp, generate_subscripts(logprobs, 1) AS i
                  FROM rollouts WHERE step = 1) y USING (request_id, i)""").fetchall()[0][0]
        assert diff == 0.0
        assert rec.info()["status"] == "complete"


def test_v0_semantics_shrink_the_mismatch_of_a_v1_step(runs):
    import dataclasses

    from replay.fixes import resolve

    with Replayer(runs / "v1") as rp:
        cfg = dataclasses.replace(resolve("v0"), dtype=rp.recorded_config().dtype)
        s = rp.replay(3, cfg, write=False).summary()
    assert s["replayed"]["mean_abs_log_ratio"] < 0.7 * s["recorded"]["mean_abs_log_ratio"]
    # v0 has no prefix cache: the hits the v1 run recorded are not there, and that is said
    pc = s["prefix_cache"]
    assert pc["recorded_tokens"] > 0 and pc["replayed_tokens"] == 0 and pc["requests_differ"] > 0
    assert s["replayed"]["clip_rate"] < s["recorded"]["clip_rate"]


def test_bisect_steps_against_reference(runs):
    res = bisect_steps(runs / "v1", runs / "v0")
    assert res["step"] is not None and res["step"] <= 1
    assert res["evidence"] and {"z_abs", "z_clip", "cusum"} <= set(res["evidence"][0])
    assert bisect_steps(runs / "v0", runs / "v0")["step"] is None


def test_bisect_steps_by_replay_is_logarithmic(runs):
    res = bisect_steps_replay(runs / "v1+processed_logprobs", preset="v0")
    assert res["replays"] <= int(np.ceil(np.log2(res["steps"] + 1))) + 1
    # processed logprobs already match v0 before any update; the first update lands in step 1
    assert res["step"] == 1, res["evidence"]


def test_bisect_fixes_finds_a_minimal_set_and_an_ablation(runs):
    """At step 1 of the demo's v1 (raw logprobs, bf16 head, prefix cache, async, an in-flight
    update) the update lands after every prefill, so no cached block is stale yet: the inference
    path's error there is the late step of a concurrent update under async scheduling, which
    either the paused update or async scheduling off removes. The search names one, says the
    other can stand in for it, and the ablation shows both sets at the floor."""
    res = bisect_fixes(runs / "v1", 1, write=False)
    assert res["explained"] is True
    either = {"v0_runtime_defaults", "paused_weight_update"}
    named = [f for f in res["fixes"] if f in either]
    assert len(named) == 1 and set(res["fixes"]) == {"processed_logprobs", "fp32_lm_head", *named}
    other = (either - set(named)).pop()
    assert res["covered"] == [other]
    assert [(a["fix"], a["replaces"]) for a in res["alternatives"]] == [(other, named[0])]
    rows = {r["label"]: r for r in res["ablation"]}
    assert rows["recorded config"]["at_floor"] is False
    assert rows["all lacking fixes"]["at_floor"] is True
    assert not rows["all but processed_logprobs"]["at_floor"] and not rows["all but fp32_lm_head"]["at_floor"]
    assert rows["all but v0_runtime_defaults"]["at_floor"] and rows["all but paused_weight_update"]["at_floor"]
    alone = {f: rows[f"only {f}"]["mean_abs_residual"] for f in FIX_IDS}
    assert min(alone, key=alone.get) == "processed_logprobs"
    assert rows["only processed_logprobs"]["direction"] == "down"
    assert rows["only paused_weight_update"]["direction"] == "down"


def test_stale_prefix_cache_hits_need_the_runtime_defaults(runs):
    """From step 2 on, prefills hit blocks the previous version computed: the paused update keeps
    the prefix cache (``clear_cache=False``), so only ``v0_runtime_defaults`` removes that, and the
    paused update's own effect is covered by it."""
    res = bisect_fixes(runs / "v1", 2, write=False)
    assert res["fixes"] == ["processed_logprobs", "v0_runtime_defaults", "fp32_lm_head"]
    assert res["covered"] == ["paused_weight_update"] and res["alternatives"] == []
    rows = {r["label"]: r for r in res["ablation"]}
    assert rows["all but v0_runtime_defaults"]["at_floor"] is False


def test_bisect_fixes_searches_only_what_the_recording_lacks(runs):
    """v1+fp32_lm_head already has the fp32 head: it is named as applied, never searched."""
    res = bisect_fixes(runs / "v1+fp32_lm_head", 2, write=False)
    assert res["already_applied"] == ["fp32_lm_head"]
    assert "fp32_lm_head" not in res["fixes"] and "fp32_lm_head" not in res["lacking"]
    assert res["fixes"] == ["processed_logprobs", "v0_runtime_defaults"]
    assert bisect_fixes(runs / "v1+fixes", 1, write=False)["fixes"] == []


def test_ddmin_is_one_minimal():
    need = {"b", "d"}
    calls = []

    def passes(s):
        calls.append(tuple(s))
        return need <= set(s)

    assert sorted(ddmin(["a", "b", "c", "d"], passes)) == ["b", "d"]
    assert ddmin(["a", "b"], lambda s: True) == []


def test_bisect_tokens_points_after_the_update_boundary(runs):
    res = bisect_tokens(runs / "v1", 1, component="r")
    assert res["token"] is not None
    assert res["with_boundary"] > 0
    assert res["at_or_after_boundary"] >= 0.8 * res["with_boundary"]


def test_bisect_layers_names_the_lm_head(runs):
    res = bisect_layers(runs / "v1", 1, "s1-p0-g0", 2, fixes=("fp32_lm_head",))
    assert res["layer"] == "lm_head"
    assert all(r["max_abs_diff"] == 0.0 for r in res["layers"][:-1])


def test_incomplete_step_of_a_killed_writer(runs, tmp_path):
    """A child records a demo run and is SIGKILLed in the middle of step 3: every
    complete step replays; step 3 is named incomplete."""
    script = textwrap.dedent(f"""
        import os, signal
        from replay.record.recorder import Recorder
        from replay.demo.runner import run_config
        from replay.demo.pipeline import RunSpec, run
        orig = Recorder.rollout
        def rollout(self, **kw):
            orig(self, **kw)
            if kw["step"] == 3 and kw["request_id"].endswith("p2-g0"):
                self.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        Recorder.rollout = rollout
        model = {json.dumps(str(_model_dir(runs)))}
        run(RunSpec(name="killed", config=run_config("v1", "float32"), model_dir=model,
                    out_dir={json.dumps(str(tmp_path))}, steps=6))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    path = tmp_path / "killed"
    with Replayer(path) as rp:
        info = rp.rec.info()   # read in place: a replay never salvages (that writes)
        assert info["status"] == "recording" and any("writer is gone" in w for w in info["warnings"])
        for step in (0, 1, 2):
            assert rp.replay(step, write=False).summary()["fidelity"]["exact"]
        with pytest.raises(RecordingError, match="step 3 is incomplete.*complete steps: 0-2"):
            rp.replay(3, write=False)
        assert rp.complete_steps() == [0, 1, 2]
    # the command line: every complete step, the incomplete one named
    proc = subprocess.run([sys.executable, "-m", "replay", "rerun", str(path), "--step", "all", "--no-write",
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s["step"] for s in json.loads(proc.stdout)] == [0, 1, 2]
    assert "skipping incomplete step(s) 3" in proc.stderr


def _model_dir(runs):
    with open_recording(runs / "v1") as rec:
        return rec.info()["run_config"]["model"]


def test_a_range_in_two_worker_processes_equals_one_engine_in_order(runs, tmp_path):
    """Chunks replayed in parallel processes (each rebuilding the prefix cache up to its
    first step) give the same bits as one engine walking the steps in order."""
    import shutil

    path = tmp_path / "v1"
    shutil.copytree(runs / "v1", path)
    with Replayer(path) as rp:
        steps = rp.steps()
        seq = rp.replay_range(steps, write=False)
        par = rp.replay_range(steps, jobs=2)
    assert [r.step for r in par] == steps
    for a, b in zip(seq, par):
        for ra, rb in zip(a.rows, b.rows):
            assert np.array_equal(ra.replayed, rb.replayed)
        assert b.summary()["fidelity"]["exact"]
    with open_recording(path) as rec:
        n = rec.sql("SELECT count(DISTINCT step) FROM replays").fetchall()[0][0]
    assert n == len(steps)


@pytest.mark.parametrize("mode", ["score", "regenerate"])
def test_steps_batched_into_one_call_equal_step_by_step(runs, mode):
    """Without prefix caching (the v0 run) consecutive steps, each with its own serving version
    and in-flight update, share engine calls; every replayed bit equals a replay step by step,
    and the recorded run replays exactly."""
    with Replayer(runs / "v0") as rp:
        steps = rp.steps()
        one = rp.replay_range(steps, mode=mode, batch=1, write=False)
        calls_one = rp.engine_calls
        seen = []
        many = rp.replay_range(steps, mode=mode, batch=10_000, write=False, progress=seen.append)
        calls_many = rp.engine_calls - calls_one
    assert calls_one == len(steps) and calls_many == 1
    assert seen == [f"steps {steps[0]}-{steps[-1]} replayed ({len(steps)}/{len(steps)})"]
    assert [r.step for r in many] == steps
    for a, b in zip(one, many):
        assert [r.request_id for r in a.rows] == [r.request_id for r in b.rows]
        for ra, rb in zip(a.rows, b.rows):
            assert np.array_equal(ra.replayed, rb.replayed) and ra.output_ids == rb.output_ids
            assert ra.versions == rb.versions
        fid = b.summary()["fidelity"]
        assert fid["exact"] if mode == "score" else fid["first_diff"] is None


def test_batches_hold_whole_steps_up_to_the_request_limit(runs):
    """A v1 recording replayed under v0 semantics: batches of at most ``batch`` requests, never
    splitting a step; under the recorded v1 config (prefix caching) one step per call."""
    from replay.fixes import resolve

    with Replayer(runs / "v1") as rp:
        steps = rp.steps()
        per_step = rp.rec.sql("SELECT count(*) FROM rollouts WHERE step = ?", [steps[0]]).fetchall()[0][0]
        v0 = resolve("v0")
        two = rp.replay_range(steps, v0, batch=2 * per_step, write=False)
        assert rp.engine_calls == -(-len(steps) // 2)
        one = rp.replay_range(steps, v0, batch=1, write=False)
        for a, b in zip(one, two):
            assert all(np.array_equal(x.replayed, y.replayed) for x, y in zip(a.rows, b.rows))
        before = rp.engine_calls
        rp.replay_range(steps, write=False)
        assert rp.engine_calls - before == len(steps)
        with pytest.raises(BadInput, match="batch"):
            rp.replay_range(steps, batch=0)


def test_a_relative_model_path_resolves_from_the_recordings_folders(runs, tmp_path, monkeypatch):
    """A run config naming its model relative to the project root (as ``replay demo`` run from
    the root does) still replays from another working directory; a model that is nowhere
    gives an error naming the folder and the way out."""
    import shutil

    from replay.store.manifest import update_manifest
    from replay.models import recorded_model

    project = tmp_path / "project"
    shutil.copytree(runs / "v1", project / "recordings" / "v1")
    shutil.copytree(_model_dir(runs), project / "models" / "tiny")
    rec = project / "recordings" / "v1"
    shutil.rmtree(rec / "model")   # a recording that only names its model (no Recorder.model)
    update_manifest(rec, lambda man: man["run_config"].__setitem__("model", "models/tiny"))
    monkeypatch.chdir(tmp_path)
    assert recorded_model(rec, {"model": "models/tiny"}) == ("models/tiny", project / "models" / "tiny")
    with Replayer(rec) as rp:
        assert rp.model_path == project / "models" / "tiny"
        assert rp.replay(1, write=False).summary()["fidelity"]["exact"]
    shutil.rmtree(project / "models")
    with pytest.raises(RecordingError, match="models/tiny recorded in the run config is not there"):
        Replayer(rec)


@pytest.mark.vllm
def test_bisect_layers_on_real_vllm_hooks_the_running_model(runs):
    """The residual stream read by hooks inside vLLM's model equals the reference engine's
    (float32 body) to rounding, and with fp32_lm_head as the only difference the first
    differing point is the lm_head, every layer before it identical."""
    from replay.engines.factory import make_engine

    res = bisect_layers(runs / "v1", 1, "s1-p0-g0", 2, fixes=("fp32_lm_head",), engine="vllm")
    assert res["layer"] == "lm_head"
    assert all(r["max_abs_diff"] == 0.0 for r in res["layers"][:-1]) and res["layers"][-1]["max_abs_diff"] > 1e-6
    with Replayer(runs / "v1") as rp:
        cfg, model = rp.recorded_config(), rp.model_path
        ids = rp.rec.sql("SELECT prompt_ids FROM rollouts WHERE request_id = 's1-p0-g0'").fetchall()[0][0]
    eng = make_engine("vllm", model, cfg, worker=True)
    try:
        got = eng.hidden_states(ids)
    finally:
        eng.close()
    want = make_engine("reference", model, cfg).hidden_states(ids)
    assert len(got) == len(want) == len(res["layers"]) - 1   # + lm_head
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a).max() > 0.1
        assert np.abs(a - b).max() < 1e-4


def test_the_floor_does_not_depend_on_what_ran_before(runs, tmp_path):
    """A fix bisection at one step stores a floor for that step's own sample; a later diagnosis of
    the whole run measures its floor on its own sample all the same: the same report either way."""
    import shutil

    from replay.diagnose.components import floors
    from replay.diagnose.reference import reference_scores

    path = tmp_path / "v1"
    shutil.copytree(runs / "v1", path)
    first = reference_scores(path, write=False).seqs
    bisect_fixes(path, 1, write=True)
    again = reference_scores(path).seqs
    sampled = [{(s.step, s.request_id) for s in seqs if s.floor is not None} for seqs in (first, again)]
    assert sampled[0] == sampled[1] and sampled[0]        # the same sample of sequences
    before, after = floors(first)[0], floors(again)[0]
    # The same values too, up to float32 rounding: the step the bisection stored was scored in
    # another batch shape, and some CPUs' kernels round a row differently by batch size; a
    # floor sample is a difference of two scores, each within an ulp (at |lp| ~ 1) of itself.
    assert after.n == before.n
    assert after.mean == pytest.approx(before.mean, rel=0, abs=float(np.finfo(np.float32).eps))
