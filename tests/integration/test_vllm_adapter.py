"""Recording straight from real vLLM V1 (CPU build) outputs.

Two engines are started once for the module (raw_logprobs and processed_logprobs);
each generates a batch with n=2 completions and top-k logprobs, the batch is
recorded through ``replay.integrations.vllm.record_outputs``, and the recording is
read back with DuckDB and compared with what vLLM returned.
"""
from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[1, 26, 14, 7, 15, 8], [1, 27, 14, 9, 9], [1, 28, 14, 4, 15, 5, 15, 6]]
NUM_TOPK = 3


def _generate(model_path, mode: str, rec_path):
    from vllm import LLM, SamplingParams

    from replay import Recorder
    from replay.integrations.vllm import describe_llm, record_outputs

    llm = LLM(model=str(model_path), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=256 * 2**20, logprobs_mode=mode, max_model_len=128, seed=0,
              disable_log_stats=True)
    try:
        sp = SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=20, max_tokens=8, seed=123,
                            logprobs=NUM_TOPK)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        info = describe_llm(llm)
        with Recorder(rec_path, run_config={"engine": info.settings}) as rec:
            written = record_outputs(rec, outputs, step=5, sampling_params=sp, llm=llm, weight_version=2,
                                     rewards=[[1.0, 0.0], [0.5, 0.25], [0.0, 1.0]])
    finally:
        del llm
        gc.collect()
    return outputs, info, written


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """For each logprobs mode: (vLLM outputs, engine info, written ids, recording path)."""
    out = {}
    for mode in ("raw_logprobs", "processed_logprobs"):
        path = tmp_path_factory.mktemp(mode) / "rec"
        outputs, info, written = _generate(tiny_model, mode, path)
        out[mode] = (outputs, info, written, path)
    return out


def _expected(outputs):
    """request id -> (prompt, output ids, sampled logprobs, top ids, top logprobs, finish) from vLLM's objects."""
    exp = {}
    for o in outputs:
        for c in o.outputs:
            rid = f"{o.request_id}:{c.index}"
            lps = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
            tops = [sorted(d.items(), key=lambda kv: kv[1].rank)[:NUM_TOPK] for d in c.logprobs]
            exp[rid] = (list(o.prompt_token_ids), list(c.token_ids), lps,
                        [[t for t, _ in top] for top in tops], [[lp.logprob for _, lp in top] for top in tops],
                        c.finish_reason)
    return exp


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_rollout_logprobs_equal_vllm_outputs(runs, mode):
    from replay import open_recording

    outputs, info, written, path = runs[mode]
    exp = _expected(outputs)
    assert sorted(written) == sorted(exp) and len(exp) == 2 * len(PROMPTS)
    rec = open_recording(path)
    rows = rec.sql("SELECT request_id, group_id, prompt_ids, output_ids, logprobs, token_versions, reward, "
                   "finish_reason, temperature, top_p, top_k, seed, logprobs_mode, engine, engine_config "
                   "FROM rollouts WHERE step = 5 ORDER BY request_id").fetchall()
    assert len(rows) == len(exp)
    for (rid, gid, prompt, out_ids, lps, versions, reward, finish, temp, top_p, top_k, seed, lmode, engine,
         ecfg) in rows:
        e_prompt, e_ids, e_lps, _, _, e_finish = exp[rid]
        assert gid == rid.rsplit(":", 1)[0]
        assert prompt == e_prompt and out_ids == e_ids
        np.testing.assert_array_equal(np.float32(lps), np.float32(e_lps))
        assert versions == [2] * len(e_ids)
        assert finish == e_finish
        assert lmode == mode
        assert engine.startswith("vllm-0.") and ecfg == info.engine_config.id
        assert (pytest.approx(temp), pytest.approx(top_p), top_k, seed) == (0.8, 0.9, 20, 123)
        assert reward in (1.0, 0.0, 0.5, 0.25)
    ev = rec.sql("SELECT request_id, weight_version, json_extract_string(detail, '$.finish_reason') FROM events "
                 "WHERE kind = 'request_finished' ORDER BY request_id").fetchall()
    assert ev == [(rid, 2, exp[rid][5]) for rid in sorted(exp)]


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_topk_rows_follow_vllm_ranks(runs, mode):
    from replay import open_recording

    outputs, _, _, path = runs[mode]
    exp = _expected(outputs)
    rec = open_recording(path)
    got = {}
    for rid, pos, ids, lps in rec.sql("SELECT request_id, pos, ids, logprobs FROM topk WHERE source = 'engine' "
                                       "ORDER BY request_id, pos").fetchall():
        got.setdefault(rid, []).append((ids, lps))
    assert set(got) == set(exp)
    n_finite = 0
    for rid, (_, _, _, top_ids, top_lps, _) in exp.items():
        # positions whose top-k holds -inf (outside the processed support) are left out
        finite = [p for p, lps in enumerate(top_lps) if all(np.isfinite(lps))]
        n_finite += len(finite)
        assert [g[0] for g in got[rid]] == [top_ids[p] for p in finite]
        np.testing.assert_array_equal(np.float32([g[1] for g in got[rid]]),
                                      np.float32([top_lps[p] for p in finite]).reshape(-1, NUM_TOPK))
        assert all(a >= b for lps in top_lps for a, b in zip(lps, lps[1:]))  # best first
    assert n_finite > 0
    assert not rec.sql("SELECT count(*) FROM rejects").fetchall()[0][0]


def test_tokens_view_and_modes_differ(runs):
    """The tokens view carries the engine logprobs; the two modes disagree at temperature 0.8."""
    from replay import open_recording

    per_mode = {}
    for mode in ("raw_logprobs", "processed_logprobs"):
        _, info, _, path = runs[mode]
        assert info.logprobs_mode == mode and info.engine_config.logprobs_mode == mode
        rec = open_recording(path)
        n_tok = rec.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
        n_out = rec.sql("SELECT sum(len(output_ids)) FROM rollouts").fetchall()[0][0]
        assert n_tok == n_out > 0
        per_mode[mode] = dict(((r, p), lp) for r, p, lp in
                              rec.sql("SELECT request_id, pos, lp_rollout FROM tokens").fetchall())
    # same seed, same weights: the first sampled token of each request is the same under
    # both modes, but its logprob is of a different distribution
    raw, proc = per_mode["raw_logprobs"], per_mode["processed_logprobs"]
    firsts = [k for k in raw if k[1] == 0 and k in proc]
    assert firsts and any(abs(raw[k] - proc[k]) > 1e-3 for k in firsts)
    assert runs["raw_logprobs"][1].engine_config.id != runs["processed_logprobs"][1].engine_config.id


def _choice(c, kind: str) -> dict:
    """One choice of an OpenAI-compatible response as vLLM serves it with return_tokens_as_token_ids."""
    lps = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
    if kind == "completions":
        return {"index": c.index, "finish_reason": c.finish_reason, "logprobs": {
            "tokens": [f"token_id:{t}" for t in c.token_ids], "token_logprobs": lps,
            "top_logprobs": [{f"token_id:{t}": lp.logprob for t, lp in d.items()} for d in c.logprobs]}}
    content = [{"token": f"token_id:{t}", "logprob": lp, "bytes": None,
                "top_logprobs": [{"token": f"token_id:{u}", "logprob": v.logprob}
                                 for u, v in sorted(d.items(), key=lambda kv: kv[1].rank)]}
               for t, lp, d in zip(c.token_ids, lps, c.logprobs)]
    return {"index": c.index, "finish_reason": c.finish_reason, "message": {"role": "assistant", "content": ""},
            "logprobs": {"content": content}}


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_openai_response_round_trip(runs, tmp_path, kind):
    """A (chat) completions response built from the same vLLM output, with token_id:N tokens,
    records the same rollouts and top-k rows."""
    from replay import Recorder, open_recording
    from replay.integrations.vllm import record_openai_response

    outputs, info, _, _ = runs["processed_logprobs"]
    o = outputs[0]
    choices = [_choice(c, kind) for c in o.outputs]
    response = {"id": "cmpl-1", "choices": choices, "prompt_token_ids": list(o.prompt_token_ids),
                "usage": {"prompt_tokens_details": {"cached_tokens": 3}}}
    with Recorder(tmp_path / "rec") as rec:
        ids = record_openai_response(rec, response, step=1, logprobs_mode=info.logprobs_mode,
                                     engine=info.engine, temperature=0.8, num_topk=NUM_TOPK)
    assert ids == ["cmpl-1:0", "cmpl-1:1"]
    rows = open_recording(tmp_path / "rec").sql(
        "SELECT request_id, output_ids, logprobs, num_cached_tokens, logprobs_mode FROM rollouts "
        "ORDER BY request_id").fetchall()
    for (rid, out_ids, lps, cached, mode), c in zip(rows, o.outputs):
        assert out_ids == list(c.token_ids) and cached == 3 and mode == "processed_logprobs"
        np.testing.assert_array_equal(np.float32(lps),
                                      np.float32([c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]))
    exp = _expected(outputs)
    top = open_recording(tmp_path / "rec").sql(
        "SELECT request_id, pos, ids, logprobs FROM topk ORDER BY request_id, pos").fetchall()
    assert top
    for rid, pos, ids, lps in top:
        want = exp[f"{o.request_id}:{rid.rsplit(':', 1)[1]}"]
        # A completions dict carries no ranks: entries of equal logprob may come in either order.
        assert _by_logprob(ids, lps) == _by_logprob(want[3][pos], want[4][pos])


def _by_logprob(ids, lps):
    """Top-k entries grouped by logprob (float32): equal values form one unordered group."""
    groups: dict = {}
    for t, lp in zip(ids, lps):
        groups.setdefault(float(np.float32(lp)), set()).add(int(t))
    return groups


def test_pipelinerl_style_example_records_a_run(tmp_path):
    """examples/pipelinerl_style.py runs two RL steps of a tiny Llama on vLLM's CPU build with a
    32-token KV block, and leaves a recording whose tokens view pairs every rollout token with
    the trainer's logprob and weight versions; the second step's requests took the shared
    instruction's block from the prefix cache, computed under the first step's weights."""
    import subprocess
    import sys
    from pathlib import Path

    from replay import open_recording

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "pipelinerl_style.py"), "--out",
                           str(tmp_path / "rec"), "--model", str(tmp_path / "model"), "--steps", "2",
                           "--arch", "llama", "--block-size", "32"],
                          capture_output=True, text=True, timeout=400, cwd=root,
                          env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = open_recording(tmp_path / "rec")
    rows = rec.sql("SELECT step, count(*), count(lp_trainer), max(abs(log_ratio)), min(weight_version), "
                   "max(trainer_version) FROM tokens GROUP BY step ORDER BY step").fetchall()
    assert [r[0] for r in rows] == [0, 1]
    for step, n, n_trainer, max_ratio, version, trainer_version in rows:
        assert n == n_trainer > 0  # every generated token has its trainer logprob
        assert 0 < max_ratio < 1.0  # bf16 engine vs fp32 trainer: close, not equal
        assert version == trainer_version == step
    kinds = [k for (k,) in rec.sql("SELECT kind FROM events ORDER BY seq").fetchall()]
    assert kinds.count("weights_update_end") == 2
    modes = rec.sql("SELECT DISTINCT logprobs_mode FROM rollouts").fetchall()
    assert modes == [("processed_logprobs",)]
    # the instruction's block is served from the cache at step 1 (stale: version 0's KV)
    cached = dict(rec.sql("SELECT step, min(num_cached_tokens) FROM rollouts GROUP BY step").fetchall())
    assert cached[1] == 32, cached
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llama"
    rec.close()
    # Recorded through the adapters only, the run is replayable anywhere: copied to another folder,
    # its checkpoint gone, vLLM replays every step (the recorded block size, the prefix cache's
    # stale hits) and gives back every recorded logprob, bit for bit.
    import shutil

    moved = tmp_path / "elsewhere" / "rec"
    shutil.copytree(tmp_path / "rec", moved)
    shutil.rmtree(tmp_path / "model")
    shutil.rmtree(tmp_path / "rec")
    check = subprocess.run([sys.executable, "-m", "replay", "check", str(moved), "--require", "rerun"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run([sys.executable, "-m", "replay", "rerun", str(moved), "--engine", "vllm", "--step", "all",
                           "--format", "json"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout)
    assert [s["step"] for s in steps] == [0, 1]
    assert all(s["fidelity"]["exact"] for s in steps), [s["fidelity"] for s in steps]
    hits = steps[1]["prefix_cache"]
    assert hits["recorded_tokens"] == hits["replayed_tokens"] > 0 and not hits.get("requests_differ"), hits
