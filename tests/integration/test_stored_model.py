"""A recording that carries its model (``Recorder.model``) replays anywhere: copied to another
folder with the checkpoint gone, ``replay rerun`` reproduces every recorded logprob and
``replay check`` calls it replayable; a changed model file is refused by name; weights named
where they are (``store_weights=False``) replay while they are there and say so when not.

The recordings come from a loop of this file's own: a tiny Llama-shaped run on the reference
engine, one step with an update landing in flight."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replay import Recorder
from replay.fixes import resolve


def _run(root: Path, model: Path, *, store_weights: bool = True, hashed: Path | None = None) -> Path:
    """The recording; ``hashed``: version 1 recorded by hash only, its checkpoint written there
    (``<hashed>/step-1/model.safetensors``, its recorded path ``s3://bucket/ckpt/step-1``)."""
    from replay.engines.base import GenRequest, WeightUpdate
    from replay.engines.reference.engine import ReferenceEngine
    from replay.models import load_state_dict

    cfg = resolve("v1")
    sd1 = {k: v * 1.05 for k, v in load_state_dict(model).items()}
    eng = ReferenceEngine(model, cfg, seed=0, block_size=16)
    # No "model" in the run config: only what Recorder.model put in the recording names it.
    run_config = {"engine": {"name": "reference", "config": cfg.to_dict()}}
    reqs = [GenRequest(f"r{i}", [1] + [4 + (5 * i + j) % 50 for j in range(20)], max_tokens=8, temperature=0.8,
                       top_p=0.9, seed=i) for i in range(4)]
    with Recorder(root, run_config=run_config, strict=True) as rec:
        rec.model(model, store_weights=store_weights)
        if hashed is None:
            rec.weights(version=1, step=0, state_dict=sd1)
        else:
            from safetensors.torch import save_file

            from replay.store.weights import sha256_of
            (hashed / "step-1").mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in sd1.items()}, str(hashed / "step-1" / "model.safetensors"))
            rec.weights(version=1, step=0, sha256=sha256_of(sd1), path="s3://bucket/ckpt/step-1")
        eng.load_weights(1, sd1, activate=False)
        with rec.step(0, weight_version=0):
            rec.event("weights_update_start", step=0, weight_version=1, mode="concurrent", after_step=3)
            for r, q in zip(eng.generate(reqs, [WeightUpdate(1, 3)]), reqs):
                rec.rollout(step=0, request_id=q.request_id, prompt_ids=q.prompt_ids, output_ids=r.output_ids,
                            logprobs=np.asarray(r.logprobs, np.float32), token_versions=r.token_versions,
                            temperature=q.temperature, top_p=q.top_p, top_k=-1, seed=q.seed,
                            logprobs_mode=cfg.logprobs_mode, engine="reference", engine_config=cfg.id,
                            num_cached_tokens=r.num_cached_tokens)
    eng.close()
    return root


@pytest.fixture
def checkpoint(tmp_path):
    from replay.models import build_model

    return build_model(tmp_path / "ckpt", size="tiny", seed=3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replay", *args], capture_output=True, text=True, timeout=600)


def _rerun(path: Path) -> subprocess.CompletedProcess:
    return _cli("rerun", str(path), "--step", "0", "--format", "json")


def test_a_copied_recording_replays_with_its_checkpoint_gone(tmp_path, checkpoint):
    rec = _run(tmp_path / "run", checkpoint)
    meta = json.loads((rec / "model" / "model.json").read_text())
    assert {"config.json", "tokenizer.json"} <= set(meta["files"]) and meta["weights_version"] == 0
    assert not any(n.endswith(".safetensors") for n in meta["files"])
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(rec, moved)
    shutil.rmtree(checkpoint)
    shutil.rmtree(rec)
    proc = _rerun(moved)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    from replay import open_recording

    with open_recording(moved) as r:
        (n,), = r.sql("SELECT sum(len(output_ids)) FROM rollouts").fetchall()
    assert res["fidelity"]["exact"] is True and res["fidelity"]["n_tokens"] == n > 4
    proc = _cli("check", str(moved), "--require", "rerun")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_changed_model_file_is_refused_by_name(tmp_path, checkpoint):
    rec = _run(tmp_path / "run", checkpoint)
    cfg = json.loads((rec / "model" / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (rec / "model" / "config.json").write_text(json.dumps(cfg))
    proc = _rerun(rec)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "config.json" in err[-1] and "sha256" in err[-1]
    proc = _cli("check", str(rec), "--format", "json")
    rerun = json.loads(proc.stdout)["commands"]["rerun"]
    assert not rerun["ready"] and any("config.json" in m["what"] for m in rerun["missing"])
    proc = _cli("doctor", str(rec), "--format", "json")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 1 and [p["path"] for p in rep["problems"]] == ["model"]


def test_weights_named_where_they_are_replay_while_they_are_there(tmp_path, checkpoint):
    rec = _run(tmp_path / "run", checkpoint, store_weights=False)
    meta = json.loads((rec / "model" / "model.json").read_text())
    assert meta["weights_version"] is None and meta["external_weights"]["path"] == str(checkpoint.resolve())
    proc = _rerun(rec)
    assert proc.returncode == 0 and json.loads(proc.stdout)["fidelity"]["exact"] is True, proc.stderr[-2000:]
    shutil.rmtree(checkpoint)
    proc = _rerun(rec)
    assert proc.returncode == 1 and "not there as recorded" in proc.stderr and "--model" in proc.stderr


def test_a_second_model_is_refused_before_its_weights_are_stored(tmp_path, checkpoint):
    from replay import open_recording
    from replay.errors import BadInput

    with Recorder(tmp_path / "r", strict=True) as rec:
        rec.model(checkpoint)
        with pytest.raises(BadInput, match="one model per run"):
            rec.model(checkpoint, version=7)
    with open_recording(tmp_path / "r") as r:
        assert r.sql("SELECT version FROM weights").fetchall() == [(0,)]


def test_weights_recorded_by_hash_replay_from_the_folder_given(tmp_path, checkpoint):
    """A version recorded by its hash only replays with --weights-from, the folder its checkpoint
    is in (found by the last part of its recorded path, checked against the recorded hash);
    without it, or with a checkpoint of other weights, the command says which version and why."""
    ckpts = tmp_path / "ckpts"
    rec = _run(tmp_path / "run", checkpoint, hashed=ckpts)
    proc = _cli("check", str(rec), "--format", "json")
    rerun = json.loads(proc.stdout)["commands"]["rerun"]
    assert rerun["ready"] and any("--weights-from" in n and "1" in n for n in rerun["notes"]), rerun
    proc = _rerun(rec)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "version 1" in err[-1] and "hash only" in err[-1] and "--weights-from" in err[-1]
    proc = _cli("rerun", str(rec), "--step", "0", "--format", "json", "--weights-from", str(ckpts))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fidelity"]["exact"] is True
    proc = _cli("diagnose", str(rec), "--no-write", "--format", "json")
    assert proc.returncode == 1 and "--weights-from" in proc.stderr.strip().splitlines()[-1]
    proc = _cli("diagnose", str(rec), "--no-write", "--format", "json", "--weights-from", str(ckpts))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["scoring"]["sequences_scored"] == 4
    # the folder named holds a checkpoint of other weights under that name: refused by hash
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ckpts / "step-1" / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in sd.items()}, str(ckpts / "step-1" / "model.safetensors"))
    proc = _cli("rerun", str(rec), "--step", "0", "--weights-from", str(ckpts))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "version 1" in err[-1] and "hashes to" in err[-1] and "step-1" in err[-1]
