"""``replay check`` on recordings written by a loop of its own: complete, then each missing one
piece, where the check names exactly that piece (and ``--require`` fails on it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from replay import Recorder
from replay.read.check import check
from replay.cli.main import main
from replay.fixes import resolve

STEPS, PER = 3, 2


def _write(root: Path, model: Path, *, engine="full", versions=True, weights=(0, 1, 2), step_end=True,
           trainer="same") -> Path:
    cfg = resolve("v1").to_dict()
    if engine == "partial":
        cfg = {k: v for k, v in cfg.items() if k not in ("enable_prefix_caching", "lm_head_dtype")}
    run_config = {"model": str(model)}
    if engine is not None:
        run_config["engine"] = {"name": "vllm-test", "config": cfg}
    rng = np.random.default_rng(0)
    later = []   # a trainer in another process, counting its own steps: rows the recorder cannot re-key
    with Recorder(root, run_config=run_config, strict=True) as rec:
        for v in weights:
            rec.weights(version=v, step=v, state_dict={"w": np.full(4, v, np.float32)})
        for step in range(STEPS):
            rec.event("step_start", step=step, weight_version=step)
            for i in range(PER):
                rid = f"s{step}-{i}"
                rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2], output_ids=[3, 4, 5],
                            logprobs=-rng.random(3), token_versions=[step] * 3 if versions else None)
                if trainer == "same":
                    rec.trainer(step=step, request_id=rid, weight_version=step, logprobs=-rng.random(3))
                elif trainer == "shifted":  # the trainer's own step counter: one ahead
                    later.append(dict(step=step + 1, request_id=rid, weight_version=step, logprobs=-rng.random(3)))
            if step_end:
                rec.event("step_end", step=step)
    if later:
        with Recorder(root, rank=1, strict=True) as trainer_rank:
            for row in later:
                trainer_rank.trainer(**row)
    return root


def test_a_trainer_counting_its_own_steps_in_the_same_process_joins_its_rollouts(tmp_path, model):
    """One-step-off: the trainer gives step k+1 for rollouts of step k. The recorder that wrote the
    rollouts puts the rows at the rollouts' step, so every token has its trainer logprob."""
    from replay import open_recording

    with Recorder(tmp_path / "r", run_config={"model": str(model)}, strict=True) as rec:
        for step in range(STEPS):
            rec.rollout(step=step, request_id=f"s{step}", prompt_ids=[1], output_ids=[3, 4], logprobs=[-0.5, -0.25])
            rec.trainer(step=step + 1, request_id=f"s{step}", weight_version=step, logprobs=[-0.5, -0.5])
        rec.trainer(step=7, request_id="never-rolled-out", logprobs=[-0.1])
        for step in (5, 6):   # a request id reused at two steps: nothing to say which one a row means
            rec.rollout(step=step, request_id="again", prompt_ids=[1], output_ids=[3], logprobs=[-0.5])
        rec.trainer(step=9, request_id="again", logprobs=[-0.5])
        moved = rec.stats()["trainer_rows_moved"]
    assert moved == STEPS
    with open_recording(tmp_path / "r") as r:
        assert r.sql("SELECT count(*), count(lp_trainer) FROM tokens WHERE request_id LIKE 's%'").fetchall() == [
            (2 * STEPS, 2 * STEPS)]
        assert r.sql("SELECT step FROM trainer WHERE request_id = 'again'").fetchall() == [(9,)]
        assert r.sql("SELECT step FROM trainer WHERE request_id = 'never-rolled-out'").fetchall() == [(7,)]
    assert "another step" not in json.dumps(check(tmp_path / "r"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    m = tmp_path_factory.mktemp("model")
    (m / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return m


def _missing(rep: dict, cmd: str) -> list[str]:
    return [m["what"] for m in rep["commands"][cmd]["missing"]]


def test_a_complete_recording_supports_every_command(tmp_path, model):
    rep = check(_write(tmp_path / "ok", model))
    assert all(c["ready"] for c in rep["commands"].values()), rep["commands"]
    assert rep["facts"]["versions_used"] == [0, 1, 2] == rep["facts"]["versions_stored"]


CASES = {
    "no engine config": (dict(engine=None), "rerun", "no engine config"),
    "partial engine config": (dict(engine="partial"), "rerun", "lacks enable_prefix_caching, lm_head_dtype"),
    "no token versions": (dict(versions=False), "rerun", "token_versions"),
    "a version without weights": (dict(weights=(0, 1)), "rerun", "version(s) 2"),
    "no step boundaries": (dict(step_end=False), "rerun", "no step_end"),
    "no trainer rows": (dict(trainer=None), "bisect --by steps", "no trainer rows"),
    "trainer keyed by its own step": (dict(trainer="shifted"), "bisect --by steps", "another step"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_recording_missing_one_piece_names_that_piece(tmp_path, model, case, capsys):
    kw, cmd, named = CASES[case]
    root = _write(tmp_path / "r", model, **kw)
    rep = check(root)
    missing = _missing(rep, cmd)
    assert len(missing) == 1 and named in missing[0], (case, rep["commands"][cmd])
    assert not rep["commands"][cmd]["ready"] and rep["commands"]["info"]["ready"]
    ready = {c for c, v in rep["commands"].items() if v["ready"]}
    if cmd == "rerun":
        assert {"rerun", "bisect --by fixes", "diagnose"}.isdisjoint(ready) and "bisect --by steps" in ready
    else:  # the trainer side only: the backend verdict still stands
        assert {"rerun", "diagnose"} <= ready
        assert any("backend verdict only" in n for n in rep["commands"]["diagnose"]["notes"])
    assert main(["check", str(root), "--require", cmd]) == 1
    out = capsys.readouterr().out
    assert named in out and "how:" in out


def test_a_moved_recording_names_its_missing_model_and_copies_along(tmp_path, model):
    root = _write(tmp_path / "r", model)
    moved = tmp_path / "elsewhere" / "r"
    shutil.copytree(root, moved)
    assert check(moved)["commands"]["rerun"]["ready"]   # an absolute model path still resolves
    shutil.rmtree(model)
    missing = _missing(check(moved), "rerun")
    assert len(missing) == 1 and "model folder" in missing[0] and str(model) in missing[0]
