"""Replaying a step whose requests joined the running batch at different engine steps: the
replayer reads each request's arrival from where its tokens change version, and the replay
reproduces the recording exactly; a step that does not fit one arrival per request says so.

The recordings come from this file's own loop: the reference engine with requests joining
at steps 0, 0, 2 and 4 while an update lands at engine step 3 (the same semantics the
real-vLLM test in ``test_vllm_engine.py`` grounds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from replay import Recorder
from replay.fixes import resolve

ARRIVALS = [0, 0, 2, 4]


def _run(root: Path, model: Path, *, recorded_after: int | None = None, versions=None) -> tuple[Path, list]:
    from replay.engines.base import GenRequest, WeightUpdate
    from replay.engines.reference.engine import ReferenceEngine
    from replay.models import load_state_dict

    cfg = resolve("v1", ["v0_runtime_defaults"])   # prefix caching and async scheduling off
    sd1 = {k: v * 1.05 for k, v in load_state_dict(model).items()}
    eng = ReferenceEngine(model, cfg, seed=0)
    reqs = [GenRequest(f"r{i}", [1] + [4 + (3 * i + j) % 50 for j in range(12)], max_tokens=8, temperature=0.8,
                       seed=i, arrival_step=a) for i, a in enumerate(ARRIVALS)]
    eng.load_weights(1, sd1, activate=False)
    results = eng.generate(reqs, [WeightUpdate(1, 3)])
    eng.close()
    with Recorder(root, run_config={"engine": {"name": "reference", "config": cfg.to_dict()}}, strict=True) as rec:
        rec.model(model)
        rec.weights(version=1, step=0, state_dict=sd1)
        with rec.step(0, weight_version=0):
            rec.event("weights_update_start", step=0, weight_version=1, mode="concurrent",
                      after_step=3 if recorded_after is None else recorded_after)
            for i, (q, r) in enumerate(zip(reqs, results)):
                rec.rollout(step=0, request_id=q.request_id, prompt_ids=q.prompt_ids, output_ids=r.output_ids,
                            logprobs=np.asarray(r.logprobs, np.float32),
                            token_versions=versions[i] if versions else r.token_versions,
                            temperature=q.temperature, top_p=1.0, top_k=-1, seed=q.seed,
                            logprobs_mode=cfg.logprobs_mode, engine="reference", engine_config=cfg.id)
    return root, results


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from replay.models import build_model

    return build_model(tmp_path_factory.mktemp("ckpt"), size="tiny", seed=5)


def _replay(path):
    from replay.rerun.replayer import Replayer

    with Replayer(path) as rp:
        summary = rp.replay(0, write=False).summary()
        return summary, list(rp.warnings)


def test_each_request_meets_the_update_at_its_own_token_and_replays_exactly(tmp_path, model):
    path, results = _run(tmp_path / "run", model)
    assert [r.token_versions.index(1) if 1 in r.token_versions else None for r in results] == [3, 3, 1, 0]
    from replay import open_recording
    from replay.rerun.replayer import plan_step

    with open_recording(path) as rec:
        plan = plan_step(rec, 0)
    assert [r.arrival_step for r in plan.requests] == [0, 0, 2, 3]   # the last: joined once the update had landed
    summary, warnings = _replay(path)
    assert summary["fidelity"]["exact"] is True, summary["fidelity"]
    assert any("joined the running batch at engine steps 0, 2, 3" in w for w in warnings)


def test_an_update_position_counted_from_another_origin_is_moved_and_said(tmp_path, model):
    """The framework wrote after_step=1 (its own count), but tokens reach the new version at 3:
    the tokens are what happened, so the update is replayed at engine step 3, with a note."""
    path, _ = _run(tmp_path / "run", model, recorded_after=1)
    summary, warnings = _replay(path)
    assert summary["fidelity"]["exact"] is True
    assert any("recorded at decode step 1" in w and "moved by 2" in w for w in warnings)


def test_a_static_batch_needs_no_arrivals(tmp_path, model):
    """Requests that all start together change version at the update's own step: nothing inferred."""
    from replay import open_recording
    from replay.rerun.replayer import plan_step

    global ARRIVALS
    saved, ARRIVALS = ARRIVALS, [0, 0, 0, 0]
    try:
        path, _ = _run(tmp_path / "run", model)
    finally:
        ARRIVALS = saved
    with open_recording(path) as rec:
        plan = plan_step(rec, 0)
    assert [r.arrival_step for r in plan.requests] == [0, 0, 0, 0] and plan.notes == []
    summary, _ = _replay(path)
    assert summary["fidelity"]["exact"] is True


def test_versions_that_lie_do_not_replay_as_exact(tmp_path, model):
    """A request stamped old throughout although it ran after the update reads as one that joined at
    0 and finished before the update: the replay then computes it otherwise and says it differs,
    rather than passing as exact."""
    from replay import open_recording
    from replay.rerun.replayer import plan_step

    _, results = _run(tmp_path / "probe", model)
    versions = [list(r.token_versions) for r in results]
    versions[3] = [0] * len(versions[3])   # stamped old throughout, although it ran after the update
    path, _ = _run(tmp_path / "run", model, versions=versions)
    with open_recording(path) as rec:
        plan = plan_step(rec, 0)
    assert plan.requests[3].arrival_step == 0
    summary, _ = _replay(path)
    assert summary["fidelity"]["exact"] is False   # the replay does not pretend
