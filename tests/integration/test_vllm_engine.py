"""Real vLLM (CPU build) behind the Engine protocol: each fix's knob has the effect the
design claims, measured against the trainer's logprobs (replay.trainer.scoring on the same
bf16 weights, through transformers).

Tolerances: the engine and the trainer run the same bf16 weights through different
kernels (vLLM's CPU attention and packed GEMMs vs transformers' eager ops), so a
logprob differs by bf16 rounding of the hidden states and logits: observed mean
|diff| about 0.01 nat and max about 0.075 on this model (logits of std ~2.5, where a
bf16 ulp is 0.016). Tests therefore allow a mean of 0.03 and a max of 0.12, while
every effect they detect is at least 0.1 nat on average, except the fp32 lm_head's,
which is smaller than the kernel noise (observed mean |diff| 0.0070 with it, 0.0081
without, over the same 384 tokens) and is tested as a paired comparison of means.
"""
from __future__ import annotations

import numpy as np
import pytest

from replay.engines.base import Engine, GenRequest, ScoreRequest, WeightUpdate
from replay.errors import BadInput, EngineError
from replay.fixes import EngineConfig

pytestmark = pytest.mark.vllm

MEAN_TOL, MAX_TOL = 0.03, 0.12
T, TOP_P = 0.7, 0.9


@pytest.fixture(scope="module")
def engines(tiny_model):
    """One vLLM engine per config, started on first use and shared by the module."""
    from replay.engines.vllm.engine import VLLMEngine

    made: dict[EngineConfig, VLLMEngine] = {}

    def get(config: EngineConfig) -> VLLMEngine:
        if config not in made:
            made[config] = VLLMEngine(tiny_model, config, ignore_eos=True, block_size=32,
                                      kv_cache_memory_bytes=64 * 2**20)
        eng = made[config]
        eng.load_weights(0, _checkpoint(tiny_model))
        eng.reset_prefix_cache()
        return eng

    yield get
    for eng in made.values():
        eng.close()


def _checkpoint(path):
    from replay.models import load_state_dict

    return load_state_dict(path)


@pytest.fixture(scope="module")
def ts(trainer_side):
    """The trainer's side: transformers forwards (see conftest)."""
    return trainer_side


@pytest.fixture(scope="module")
def hf0(tiny_model, trainer_side):
    return trainer_side.hf_model(tiny_model)


@pytest.fixture(scope="module")
def weights1(trainer_side):
    return trainer_side.version_weights(1)


@pytest.fixture(scope="module")
def hf1(tiny_model, weights1, trainer_side):
    return trainer_side.hf_model(tiny_model, weights1)


def _prompts(n: int, base: int) -> list[list[int]]:
    return [[1] + [4 + (base + 7 * i + 3 * j) % 60 for j in range(5)] for i in range(n)]


def _gen(engine, prompts, max_tokens=16, temperature=T, top_p=TOP_P, updates=(), **kw):
    reqs = [GenRequest(f"r{i}", p, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=i, **kw)
            for i, p in enumerate(prompts)]
    return engine.generate(reqs, updates)


def _diffs(ts, results, prompts, model, **kw) -> np.ndarray:
    return np.concatenate([np.array(r.logprobs) - ts.trainer_logprobs(model, p, r.output_ids, **kw)
                           for r, p in zip(results, prompts)])


# ------------------------------------------------------------------ processed_logprobs


@pytest.mark.slow
def test_engine_reports_the_real_knobs(engines):
    eng = engines(EngineConfig())
    assert isinstance(eng, Engine)
    assert eng.effective["logprobs_mode"] == "raw_logprobs"
    assert eng.effective["enable_prefix_caching"] is True
    assert eng.effective["head_dtype"] == "bfloat16"
    # vLLM's CPU platform forces async scheduling off whatever the config asks.
    assert eng.effective["async_scheduling"] is False
    assert eng.start_seconds > 0


def test_raw_logprobs_are_offset_from_the_trainers_temperature_scaled_ones(engines, hf0, ts):
    prompts = _prompts(6, 0)
    res = _gen(engines(EngineConfig()), prompts)
    d = _diffs(ts, res, prompts, hf0, temperature=T, top_p=TOP_P)
    # Raw logprobs are log_softmax(logits), the trainer's are log_softmax(logits / 0.7):
    # the sampled tokens are likely ones, so raw logprobs sit systematically lower.
    assert d.mean() < -0.1
    assert (d < 0).mean() > 0.8
    # ...and they are the trainer's logprobs at temperature 1, within bf16 noise.
    d1 = _diffs(ts, res, prompts, hf0, temperature=1.0)
    assert np.abs(d1).mean() < MEAN_TOL and np.abs(d1).max() < MAX_TOL


def test_processed_logprobs_match_the_trainer_within_bf16_noise(engines, hf0, ts):
    prompts = _prompts(6, 0)
    res = _gen(engines(EngineConfig(logprobs_mode="processed_logprobs")), prompts)
    # The trainer side applies the same temperature and vLLM's top-p nucleus renormalisation.
    d = _diffs(ts, res, prompts, hf0, temperature=T, top_p=TOP_P)
    assert abs(d.mean()) < 0.01
    assert np.abs(d).mean() < MEAN_TOL and np.abs(d).max() < MAX_TOL
    assert all(np.isfinite(r.logprobs).all() for r in res)


def test_processed_scoring_applies_temperature_although_prompt_logprobs_are_raw(engines, hf0, ts):
    prompts = _prompts(6, 11)
    eng = engines(EngineConfig(logprobs_mode="processed_logprobs"))
    res = _gen(eng, prompts, num_topk=3)
    scored = eng.score([ScoreRequest(r.request_id, p, r.output_ids, temperature=T, top_p=TOP_P, num_topk=3)
                        for r, p in zip(res, prompts)])
    for g, s in zip(res, scored):
        # Same numbers as the sampler's processed logprobs (same forward, same processing).
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-4)
        # Top-k values agree; ids may differ only where bf16 logits tie.
        np.testing.assert_allclose(s.topk_logprobs, g.topk_logprobs, atol=1e-4)
    plain = eng.score([ScoreRequest(r.request_id, p, r.output_ids, temperature=T) for r, p in zip(res, prompts)])
    d = np.concatenate([np.array(s.logprobs) - ts.trainer_logprobs(hf0, p, r.output_ids, temperature=T)
                        for s, r, p in zip(plain, res, prompts)])
    assert np.abs(d).mean() < MEAN_TOL and np.abs(d).max() < MAX_TOL


def test_raw_scoring_equals_raw_generation(engines):
    prompts = _prompts(4, 23)
    eng = engines(EngineConfig())
    res = _gen(eng, prompts, num_topk=2)
    scored = eng.score([ScoreRequest(r.request_id, p, r.output_ids, temperature=T, num_topk=2)
                        for r, p in zip(res, prompts)])
    for g, s in zip(res, scored):
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-5)
        assert s.topk_ids == g.topk_ids


# ------------------------------------------------------------------------ fp32_lm_head


@pytest.mark.slow
def test_fp32_lm_head_brings_the_engine_closer_to_an_fp32_head_trainer(engines, hf0, ts):
    prompts = _prompts(16, 31)
    outputs = [r.output_ids for r in _gen(engines(EngineConfig()), prompts, max_tokens=24, temperature=1.0,
                                          top_p=1.0)]
    errs = {}
    for head in ("bfloat16", "float32"):
        eng = engines(EngineConfig(lm_head_dtype=head))
        assert eng.effective["head_dtype"] == head
        scored = eng.score([ScoreRequest(f"s{i}", p, o) for i, (p, o) in enumerate(zip(prompts, outputs))])
        errs[head] = np.mean(np.concatenate([
            np.abs(np.array(s.logprobs) - ts.trainer_logprobs(hf0, p, o, lm_head_dtype="float32"))
            for s, p, o in zip(scored, prompts, outputs)]))
    assert errs["float32"] < errs["bfloat16"], errs


# ------------------------------------------------------------------------ weight updates


def test_weights_loaded_at_version_v_give_the_trainers_logprobs_at_v(engines, hf0, hf1, weights1, ts):
    prompts = _prompts(4, 37)
    eng = engines(EngineConfig())
    eng.load_weights(1, weights1)
    assert eng.version == 1
    res = _gen(eng, prompts, temperature=1.0, top_p=1.0)
    assert all(r.token_versions == [1] * len(r.output_ids) for r in res)
    d1 = _diffs(ts, res, prompts, hf1)
    d0 = _diffs(ts, res, prompts, hf0)
    assert np.abs(d1).mean() < MEAN_TOL and np.abs(d1).max() < MAX_TOL
    assert np.abs(d0).mean() > 0.3
    # Switching back to a version kept on the host restores it.
    eng.load_weights(0, _checkpoint_like(hf0), activate=False)
    res0 = eng.generate([GenRequest("back", prompts[0], max_tokens=8, seed=0)], [WeightUpdate(0, 0)])
    assert res0[0].token_versions == [0] * 8
    d = np.array(res0[0].logprobs) - ts.trainer_logprobs(hf0, prompts[0], res0[0].output_ids)
    assert np.abs(d).max() < MAX_TOL


def _checkpoint_like(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["concurrent", "paused"])
def test_update_mid_generation_mixes_old_kv_with_new_weights(engines, hf0, hf1, weights1, mode, ts):
    """After ``after_step=4`` every token is stamped version 1 and was computed by the new
    weights attending to KV the old weights wrote: it matches that mixed computation, not
    a clean version-1 forward. ``paused`` goes through ``pause_scheduler(mode="keep",
    clear_cache=False)``, which keeps the in-flight KV exactly as vLLM's real fix does."""
    prompts = _prompts(4, 41)
    eng = engines(EngineConfig(weight_update=mode))
    eng.load_weights(1, weights1, activate=False)
    res = _gen(eng, prompts, max_tokens=10, temperature=1.0, top_p=1.0, updates=[WeightUpdate(1, 4)])
    assert eng.update_log[-1]["after_step"] == 4
    assert eng.update_log[-1]["paused"] is (mode == "paused")
    mixed_err, clean_err = [], []
    for r, p in zip(res, prompts):
        assert r.token_versions == [0] * 4 + [1] * 6
        pre = np.array(r.logprobs[:4]) - ts.trainer_logprobs(hf0, p, r.output_ids)[:4]
        assert np.abs(pre).max() < MAX_TOL
        post = np.array(r.logprobs[4:])
        mixed_err.append(np.abs(post - ts.split_kv_logprobs(hf0, hf1, p + r.output_ids, len(p) + 3, 6)))
        clean_err.append(np.abs(post - ts.trainer_logprobs(hf1, p, r.output_ids)[4:]))
    assert np.concatenate(mixed_err).mean() < MEAN_TOL
    assert np.concatenate(clean_err).mean() > 0.2


def test_paused_and_concurrent_updates_give_the_same_tokens_on_cpu(engines, weights1):
    """On vLLM's CPU build async scheduling is forced off and ``step()`` runs one batch to
    completion, so a load between two steps is already a clean boundary: the paused
    update (scheduler paused during the load) and the concurrent one (scheduler running)
    give identical tokens, logprobs and versions. A GPU with async scheduling is where
    they differ (the in-flight batch then computes with the old weights)."""
    prompts = _prompts(3, 43)
    runs = {}
    for mode in ("concurrent", "paused"):
        eng = engines(EngineConfig(weight_update=mode))
        eng.load_weights(1, weights1, activate=False)
        runs[mode] = _gen(eng, prompts, max_tokens=8, updates=[WeightUpdate(1, 3)])
    for a, b in zip(runs["concurrent"], runs["paused"]):
        assert a.output_ids == b.output_ids and a.token_versions == b.token_versions
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


# ------------------------------------------------------------------------ prefix caching


@pytest.mark.parametrize("prefix_caching,mode", [(True, "concurrent"), (True, "paused"), (False, "concurrent")])
def test_prefix_cache_serves_stale_kv_after_a_weight_update(engines, hf0, hf1, weights1, prefix_caching, mode, ts):
    """A 70-token prompt fills two 32-token blocks at version 0; after an update to version 1
    a request extending it reuses those blocks when prefix caching is on (its logprobs are
    those of version-1 weights over version-0 KV), and recomputes them when it is off.
    The paused update does not help here: ``pause_generation(mode="keep",
    clear_cache=False)`` keeps the prefix cache, so only ``enable_prefix_caching=False``
    (or an explicit ``reset_prefix_cache()``) avoids the stale hit."""
    eng = engines(EngineConfig(enable_prefix_caching=prefix_caching, weight_update=mode))
    prefix = [1] + [4 + (i * 7) % 60 for i in range(69)]
    eng.generate([GenRequest("warm", prefix, max_tokens=1, seed=0)])
    eng.load_weights(1, weights1)
    prompt = prefix + [10, 11]
    res = eng.generate([GenRequest("b", prompt, max_tokens=4, seed=0)])[0]
    stale = np.abs(np.array(res.logprobs) - ts.split_kv_logprobs(hf0, hf1, prompt + res.output_ids, 64, 4))
    clean = np.abs(np.array(res.logprobs) - ts.trainer_logprobs(hf1, prompt, res.output_ids))
    if prefix_caching:
        assert res.num_cached_tokens == 64
        assert stale.max() < MAX_TOL and clean.mean() > 0.1
        eng.reset_prefix_cache()
        again = eng.generate([GenRequest("c", prompt, max_tokens=4, seed=0)])[0]
        assert again.num_cached_tokens == 0
        assert np.abs(np.array(again.logprobs) - ts.trainer_logprobs(hf1, prompt, again.output_ids)).max() < MAX_TOL
    else:
        assert res.num_cached_tokens == 0
        assert clean.max() < MAX_TOL and stale.mean() > 0.1
    # Scoring never reads the prefix cache (vLLM skips it for prompt-logprob requests).
    scored = eng.score([ScoreRequest("s", prompt, res.output_ids)])[0]
    assert np.abs(np.array(scored.logprobs) - ts.trainer_logprobs(hf1, prompt, res.output_ids)).max() < MAX_TOL


# ------------------------------------------------------------------------ teacher forcing


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_forced_outputs_go_through_generation_with_the_unforced_logprobs(engines, mode):
    """Forcing the tokens a generation sampled gives back its logprobs and top-k, bit for bit; forcing
    other tokens gives the teacher-forced scores (nothing is in flight to differ)."""
    prompts = _prompts(4, 53)
    eng = engines(EngineConfig(logprobs_mode=mode))
    assert eng.supports_forced_output
    sampled = _gen(eng, prompts, max_tokens=10, num_topk=3)
    forced = eng.generate([GenRequest(r.request_id, p, max_tokens=10, temperature=T, top_p=TOP_P, seed=99,
                                      num_topk=3, forced_output_ids=r.output_ids) for r, p in zip(sampled, prompts)])
    for a, b in zip(sampled, forced):   # the same bits: processed ones go through vLLM's own sampler ops
        assert b.output_ids == a.output_ids
        assert b.logprobs == a.logprobs and b.topk_logprobs == a.topk_logprobs
    other = [[4 + (7 * t + 3) % 60 for t in r.output_ids] for r in sampled]
    forced = eng.generate([GenRequest(f"o{i}", p, temperature=T, forced_output_ids=o)
                           for i, (p, o) in enumerate(zip(prompts, other))])
    scored = eng.score([ScoreRequest(f"o{i}", p, o, temperature=T) for i, (p, o) in enumerate(zip(prompts, other))])
    for f, s, o in zip(forced, scored, other):
        assert f.output_ids == o and f.finish_reason == "length"
        np.testing.assert_allclose(f.logprobs, s.logprobs, atol=1e-5)
    with pytest.raises(BadInput, match="forced_output_ids"):
        eng.generate([GenRequest("ok", prompts[0], max_tokens=2), GenRequest("bad", prompts[0], forced_output_ids=[10_000])])
    assert not eng._engine.has_unfinished_requests()


def test_forced_outputs_see_the_mixed_model_of_an_update(engines, hf0, hf1, weights1, ts):
    """Teacher forcing keeps what score() cannot: a request in flight across a weight
    update computes its later tokens with new weights over old KV."""
    prompts = _prompts(3, 59)
    eng = engines(EngineConfig())
    outputs = [r.output_ids for r in _gen(eng, prompts, max_tokens=10, temperature=1.0, top_p=1.0)]
    eng.load_weights(1, weights1, activate=False)
    forced = eng.generate([GenRequest(f"f{i}", p, forced_output_ids=o) for i, (p, o) in enumerate(zip(prompts, outputs))],
                          [WeightUpdate(1, 4)])
    for f, p, o in zip(forced, prompts, outputs):
        assert f.output_ids == o and f.token_versions == [0] * 4 + [1] * 6
        mixed = ts.split_kv_logprobs(hf0, hf1, p + o, len(p) + 3, 6)
        assert np.abs(np.array(f.logprobs[4:]) - mixed).max() < MAX_TOL


@pytest.mark.parametrize("head", ["float32", "bfloat16"])
def test_vllm_and_the_reference_engine_agree_where_both_are_exact(engines, tiny_model, weights1, head):
    """In float32 with async scheduling off and a paused update (the behaviours vLLM's CPU
    build really has), vLLM and the PyTorch reference engine give the same logprobs for
    the same forced tokens across a weight update, with the head in ``head`` precision."""
    from replay.engines.reference.engine import ReferenceEngine

    cfg = EngineConfig(dtype="float32", lm_head_dtype=head, async_scheduling=False, weight_update="paused")
    eng = engines(cfg)
    assert eng.effective["head_dtype"] == head and eng.effective["dtype"] == "float32"
    prompts = _prompts(4, 61)
    outputs = [r.output_ids for r in _gen(eng, prompts, max_tokens=8)]
    ref = ReferenceEngine(tiny_model, cfg, seed=0, ignore_eos=True, block_size=32)
    try:
        results = {}
        for name, e in (("vllm", eng), ("reference", ref)):
            e.load_weights(1, weights1, activate=False)
            results[name] = e.generate([GenRequest(f"f{i}", p, temperature=T, forced_output_ids=o)
                                        for i, (p, o) in enumerate(zip(prompts, outputs))], [WeightUpdate(1, 3)])
    finally:
        ref.close()
    for a, b in zip(results["vllm"], results["reference"]):
        assert a.output_ids == b.output_ids and a.token_versions == b.token_versions == [0] * 3 + [1] * 5
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def _on_both(eng, tiny_model, cfg, weights1, run):
    """``run(engine)`` on vLLM and on a reference engine of the same config (32-token blocks),
    each with an empty prefix cache and version 1 loaded beside version 0."""
    from replay.engines.reference.engine import ReferenceEngine

    ref = ReferenceEngine(tiny_model, cfg, seed=0, ignore_eos=True, block_size=32)
    try:
        got = {}
        for name, e in (("vllm", eng), ("reference", ref)):
            e.reset_prefix_cache()
            e.load_weights(1, weights1, activate=False)
            got[name] = run(e)
    finally:
        ref.close()
    return got


def test_the_reference_engine_does_what_vllm_does_on_an_unpaused_update(engines, tiny_model, weights1):
    """The behaviours the reference engine emulates for V1's defaults, against vLLM itself (float32,
    so the two agree to 1e-4 where they compute the same thing; every effect below is > 0.01):

    * raw logprobs (``log_softmax`` of the raw logits, V1's default);
    * an unpaused (concurrent) update mid-generation lands between two engine steps, whole: from
      the update on, new weights over the KV the old weights wrote, no step runs a mixed model;
    * prefix caching keeps blocks the old weights computed and serves them, stale, after the
      update, to a later request sharing the prefix (the same number of cached tokens).

    Async scheduling, the one V1 default the CPU build cannot run (it forces it off), is
    grounded in the source: see :mod:`replay.engines.reference.engine`."""

    cfg = EngineConfig(dtype="float32", lm_head_dtype="float32", async_scheduling=False, weight_update="concurrent")
    assert cfg.logprobs_mode == "raw_logprobs" and cfg.enable_prefix_caching
    eng = engines(cfg)
    assert eng.effective["enable_prefix_caching"] is True and eng.effective["async_scheduling"] is False
    prompts = _prompts(4, 67)
    outputs = [r.output_ids for r in _gen(eng, prompts, max_tokens=8)]
    prefix = [1] + [4 + (i * 11) % 60 for i in range(69)]   # two full 32-token blocks

    def run(e):
        forced = e.generate([GenRequest(f"f{i}", p, temperature=T, forced_output_ids=o)
                             for i, (p, o) in enumerate(zip(prompts, outputs))], [WeightUpdate(1, 3)])
        e.activate(0)
        e.reset_prefix_cache()
        e.generate([GenRequest("warm", prefix, max_tokens=1, seed=0)])        # blocks computed by v0
        e.activate(1)
        stale = e.generate([GenRequest("b", prefix + [10, 11], forced_output_ids=[12, 13, 14, 15])])[0]
        e.reset_prefix_cache()
        fresh = e.generate([GenRequest("c", prefix + [10, 11], forced_output_ids=[12, 13, 14, 15])])[0]
        return forced, stale, fresh

    got = _on_both(eng, tiny_model, cfg, weights1, run)
    (vf, vs, vfr), (rf, rs, rfr) = got["vllm"], got["reference"]
    for a, b in zip(vf, rf):
        assert a.output_ids == b.output_ids and a.token_versions == b.token_versions == [0] * 3 + [1] * 5
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert vs.num_cached_tokens == rs.num_cached_tokens == 64 and vfr.num_cached_tokens == rfr.num_cached_tokens == 0
    np.testing.assert_allclose(vs.logprobs, rs.logprobs, atol=1e-4)
    np.testing.assert_allclose(vfr.logprobs, rfr.logprobs, atol=1e-4)
    assert np.abs(np.array(vs.logprobs) - np.array(vfr.logprobs)).max() > 0.01   # the stale KV shows


def test_requests_joining_the_running_batch_as_in_vllm(engines, tiny_model, weights1):
    """Continuous batching against vLLM itself (float32, prefix caching on, 32-token blocks): four
    requests sharing a 40-token prefix join the running engine at steps 0, 0, 2 and 5 while an
    unpaused update lands before step 3. Per request the version changes at its own token (3, 3,
    1, never), the ones that join later hit the shared block the first prefill stored (the one
    joining after the update: stale), and the reference engine gives vLLM's logprobs to 1e-4."""
    import dataclasses as dc


    cfg = EngineConfig(dtype="float32", lm_head_dtype="float32", async_scheduling=False, weight_update="concurrent")
    eng = engines(cfg)
    prefix = [1] + [4 + (i * 13) % 60 for i in range(39)]
    prompts = [prefix + [5 + i, 6 + i] for i in range(4)]
    outputs = [r.output_ids for r in _gen(eng, prompts, max_tokens=8)]
    arrival = [0, 0, 2, 5]
    reqs = [GenRequest(f"j{i}", p, temperature=T, forced_output_ids=o, arrival_step=a)
            for i, (p, o, a) in enumerate(zip(prompts, outputs, arrival))]
    got = _on_both(eng, tiny_model, cfg, weights1, lambda e: e.generate(reqs, [WeightUpdate(1, 3)]))
    want = [[0] * 3 + [1] * 5, [0] * 3 + [1] * 5, [0] + [1] * 7, [1] * 8]
    for a, b, w in zip(got["vllm"], got["reference"], want):
        assert a.output_ids == b.output_ids and a.token_versions == b.token_versions == w
        assert a.num_cached_tokens == b.num_cached_tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert [r.num_cached_tokens for r in got["vllm"]][2:] == [32, 32]
    assert not eng._engine.has_unfinished_requests()
    with pytest.raises(BadInput, match="arrival_step"):
        eng.generate([dc.replace(reqs[0], arrival_step=-1)])


# ------------------------------------------------------------------------ protocol details


def test_stop_tokens_topk_and_bad_input(engines):
    eng = engines(EngineConfig())
    prompts = _prompts(1, 47)
    free = _gen(eng, prompts, max_tokens=12, temperature=1.0, top_p=1.0, num_topk=4)[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 12
    for ids, lps in zip(free.topk_ids, free.topk_logprobs):
        assert len(ids) == 4 and lps == sorted(lps, reverse=True)
    stop = free.output_ids[5]
    first = free.output_ids.index(stop)
    stopped = _gen(eng, prompts, max_tokens=12, temperature=1.0, top_p=1.0, stop_token_ids=[stop])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[:first + 1]
    with pytest.raises(BadInput, match="twice"):
        eng.generate([GenRequest("x", [1, 5]), GenRequest("x", [1, 6])])
    with pytest.raises(BadInput, match="never loaded"):
        eng.generate([GenRequest("y", [1, 5])], [WeightUpdate(99, 1)])
    # A request vLLM refuses withdraws the whole call: nothing is left queued.
    with pytest.raises(BadInput, match="out of vocabulary"):
        eng.generate([GenRequest("ok", [1, 5], max_tokens=3), GenRequest("bad", [1, 10_000])])
    again = _gen(eng, prompts, max_tokens=12, temperature=1.0, top_p=1.0)[0]
    assert again.output_ids == free.output_ids


def test_start_up_failures_raise_engine_error(tiny_model, tmp_path):
    from replay.engines.vllm.engine import VLLMEngine

    with pytest.raises(EngineError, match="runs on 'cpu'"):
        VLLMEngine(tiny_model, EngineConfig(), device="cuda")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError, match="could not start"):
        VLLMEngine(tmp_path, EngineConfig())


def test_closed_engine_refuses_work_and_close_is_idempotent(tiny_model):
    from replay.engines.vllm.engine import VLLMEngine

    eng = VLLMEngine(tiny_model, EngineConfig(), kv_cache_memory_bytes=16 * 2**20)
    assert eng.generate([GenRequest("a", [1, 5, 6], max_tokens=2, seed=0)])[0].output_ids
    eng.close()
    eng.close()
    with pytest.raises(EngineError, match="closed"):
        eng.generate([GenRequest("a", [1, 5, 6], max_tokens=2)])


def test_v0_engine_runs_the_same_protocol(tiny_model):
    from replay.engines.vllm.v0 import v0_available
    from replay.engines.vllm.v0 import VLLMV0Engine

    ok, why = v0_available()
    if not ok:
        pytest.skip(why)
    eng = VLLMV0Engine(tiny_model, EngineConfig(logprobs_mode="processed_logprobs", async_scheduling=False,
                                                enable_prefix_caching=False, weight_update="paused"))
    try:
        res = eng.generate([GenRequest("a", [1, 5, 6, 7], max_tokens=6, temperature=T, seed=0)])[0]
        scored = eng.score([ScoreRequest("a", [1, 5, 6, 7], res.output_ids, temperature=T)])[0]
        np.testing.assert_allclose(scored.logprobs, res.logprobs, atol=1e-3)
    finally:
        eng.close()


def test_v0_engine_refuses_a_v1_only_install(tiny_model):
    from replay.engines.vllm.v0 import v0_available
    from replay.engines.vllm.v0 import VLLMV0Engine

    ok, _ = v0_available()
    if ok:
        pytest.skip("the installed vLLM has the V0 engine")
    with pytest.raises(EngineError, match="V1-only"):
        VLLMV0Engine(tiny_model, EngineConfig(logprobs_mode="processed_logprobs", async_scheduling=False))
