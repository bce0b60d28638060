"""The reference engine: exact forward, sampling semantics and the V0 / V1 emulations.

Sampling settings throughout: temperature 0.7, top_p 0.9 (the source's settings).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from replay.engines.base import Engine, GenGroup, GenRequest, ScoreRequest, WeightUpdate, generate_groups, groups_by_calls  # noqa: E402
from replay.engines.reference.engine import ReferenceEngine  # noqa: E402
from replay.errors import BadInput  # noqa: E402
from replay.fixes import EngineConfig, resolve  # noqa: E402
from replay.models import build_model, load_model, load_state_dict  # noqa: E402
from replay.trainer.scoring import trainer_logprobs  # noqa: E402

T, TOP_P = 0.7, 0.9
PROCESSED = resolve("v1", ["processed_logprobs"])
# Processed logprobs, no prefix cache, no async scheduling: the update mode alone varies.
CLEAN = resolve("v1", ["processed_logprobs", "v0_runtime_defaults"])
# The same with raw logprobs: which weights computed a step shows in the logprob of any token (processed
# logprobs of a token alone in its nucleus are 0 under every version).
CLEAN_RAW = resolve("v1", ["v0_runtime_defaults"])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("ref") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def hf_bf16(model_path):
    return load_model(model_path, dtype="bfloat16")


def requests(n=4, max_tokens=16, prompt_len=10, **kw):
    return [GenRequest(f"r{i}", [1, 26, 14] + [4 + (i + j) % 10 for j in range(prompt_len - 3)],
                       max_tokens=max_tokens, temperature=T, top_p=TOP_P, seed=100 + i, **kw)
            for i in range(n)]


def perturbed(model_path, scale=0.5, seed=1, only=None):
    """A new weight version: each tensor (or only those whose name contains one of ``only``)
    plus Gaussian noise of ``scale`` times its own std."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(load_state_dict(model_path, dtype="float32").items()):
        if only is None or any(o in name for o in only):
            std = float(t.std()) if t.numel() > 1 else 0.1
            t = t + torch.randn(t.shape, generator=gen) * std * scale
        out[name] = t.to(torch.bfloat16)
    return out


def score_at(engine, version, reqs, results):
    engine.activate(version)
    scored = engine.score([ScoreRequest(r.request_id, r.prompt_ids, g.output_ids, r.temperature, r.top_p)
                           for r, g in zip(reqs, results)])
    return [np.array(s.logprobs) for s in scored]


def trainer_for(model, reqs, results, **kw):
    return trainer_logprobs(model, [r.prompt_ids for r in reqs], [g.output_ids for g in results],
                            temperature=T, **kw).logprobs


# ------------------------------------------------------------------ exactness


def test_is_an_engine_and_fp32_logits_match_transformers(model_path):
    engine = ReferenceEngine(model_path, EngineConfig(dtype="float32", lm_head_dtype="float32"))
    assert isinstance(engine, Engine) and engine.version == 0
    prompt, output = [1, 26, 14, 7, 5, 15, 8], [30, 31, 32, 4, 5, 6, 20, 21]
    res = engine.score([ScoreRequest("s", prompt, output, num_topk=64)])[0]
    model = load_model(model_path, dtype="float32")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits, -1)
    got = torch.full_like(ref, float("nan"))
    for pos, (ids, lps) in enumerate(zip(res.topk_ids, res.topk_logprobs)):
        got[pos, ids] = torch.tensor(lps)
    assert (got - ref).abs().max().item() < 1e-5
    np.testing.assert_allclose(res.logprobs, ref.gather(-1, torch.tensor(output)[:, None])[:, 0], atol=1e-5)


def test_decode_and_teacher_forcing_give_the_same_bits(model_path):
    """Prefill, decode step and scoring share one code path per row: no drift between them."""
    for dtype in ("bfloat16", "float32"):
        engine = ReferenceEngine(model_path, dataclasses.replace(CLEAN, dtype=dtype), ignore_eos=True)
        reqs = requests()
        gen = engine.generate(reqs)
        for g, s in zip(gen, score_at(engine, 0, reqs, gen)):
            assert g.logprobs == s.tolist()


# --------------------------------------------------------- logprob semantics


def test_raw_logprobs_are_offset_processed_match_the_trainer(model_path, hf_bf16):
    """Raw logprobs ignore temperature and top-p: vs the trainer's tempered, nucleus-truncated
    logprobs they sit clearly lower on average. Processed logprobs agree with the trainer
    within bf16 noise (tolerance 0.02 nats: both run the bf16 body, the lm_head dtypes
    match; rounding of bf16 activations is the only allowed difference)."""
    reqs = requests(n=6, max_tokens=20)
    raw = ReferenceEngine(model_path, resolve("v1"), ignore_eos=True).generate(reqs)
    diff = np.concatenate([np.array(g.logprobs) - t for g, t in
                           zip(raw, trainer_for(hf_bf16, reqs, raw, top_p=TOP_P, lm_head_dtype="bfloat16"))])
    assert diff.mean() < -0.1  # systematic, not noise
    diff = np.concatenate([np.array(g.logprobs) - t for g, t in
                           zip(raw, trainer_for(hf_bf16, reqs, raw, lm_head_dtype="bfloat16"))])
    assert diff.mean() < -0.1  # against the plain tempered trainer (no top-p) too
    proc = ReferenceEngine(model_path, PROCESSED, ignore_eos=True).generate(reqs)
    trainer = trainer_for(hf_bf16, reqs, proc, top_p=TOP_P, lm_head_dtype="bfloat16")
    diff = np.concatenate([np.array(g.logprobs) - t for g, t in zip(proc, trainer)])
    assert np.abs(diff).max() < 0.02
    # Against a trainer without top-p, processed logprobs are renormalized over the
    # nucleus: never lower, higher by -log(nucleus mass) on average.
    plain = trainer_for(hf_bf16, reqs, proc, lm_head_dtype="bfloat16")
    diff = np.concatenate([np.array(g.logprobs) - t for g, t in zip(proc, plain)])
    assert diff.min() > -0.02 and diff.mean() > 0.01


def test_fp32_lm_head_moves_the_engine_toward_the_fp32_trainer(model_path, hf_bf16):
    """bf16 body in both; the trainer projects in fp32. The engine with fp32_lm_head has a
    smaller mean |lp_engine - lp_trainer| than the engine with a bf16 head."""
    reqs = requests(n=6, max_tokens=20)
    gen = ReferenceEngine(model_path, PROCESSED, ignore_eos=True).generate(reqs)
    trainer = trainer_for(hf_bf16, reqs, gen, top_p=TOP_P, lm_head_dtype="float32")
    errs = {}
    for head in ("bfloat16", "float32"):
        engine = ReferenceEngine(model_path, dataclasses.replace(PROCESSED, lm_head_dtype=head))
        scored = score_at(engine, 0, reqs, gen)
        errs[head] = np.mean(np.concatenate([np.abs(s - t) for s, t in zip(scored, trainer)]))
    assert errs["float32"] < errs["bfloat16"]
    assert errs["bfloat16"] > 1e-3  # the bf16 head error is real, not rounding of the comparison


def test_top_k_and_topk_logprobs(model_path):
    engine = ReferenceEngine(model_path, PROCESSED, ignore_eos=True)
    reqs = [dataclasses.replace(r, top_k=3, top_p=1.0, num_topk=5) for r in requests(n=3)]
    gen = engine.generate(reqs)
    for g in gen:
        for tok, lp, ids, lps in zip(g.output_ids, g.logprobs, g.topk_ids, g.topk_logprobs):
            assert tok in ids[:3] and lp == lps[ids.index(tok)]
            assert lps == sorted(lps, reverse=True)
            # Outside the top-3: masked (-inf) in processed mode, unless tied with the 3rd
            # (bf16 logits tie often; vLLM keeps ties too).
            assert all(x == float("-inf") or x == lps[2] for x in lps[3:])
            assert abs(np.logaddexp.reduce(lps)) < 1e-5


def test_every_engine_class_has_the_whole_protocol(model_path):
    """The replayer probes no engine for what it can do: each engine class has every method of
    the protocol (its read-only attributes may be set per instance: an engine passes
    ``isinstance(..., Engine)``, which checks them), and both vLLM backends (V0 too, which cannot run here) have every
    member of the backend protocol, so V0 and V1 are one engine class."""
    import inspect

    from replay.engines.client import EngineClient
    from replay.engines.vllm.engine import Backend, VLLMEngine
    from replay.engines.vllm.v0 import V0
    from replay.engines.vllm.v1 import V1

    def members(proto: type) -> list[str]:
        return [n for n, v in vars(proto).items()
                if not n.startswith("_") and (callable(v) or isinstance(v, property))]

    assert {"versions", "activate", "reset_prefix_cache", "generate_groups", "hidden_states", "name",
            "supports_forced_output", "effective"} <= set(members(Engine))
    attributes = {"name", "config", "version", "supports_forced_output", "effective", "start_seconds"}
    for cls in (ReferenceEngine, VLLMEngine, EngineClient):
        missing = [n for n in members(Engine) if n not in attributes and not inspect.getattr_static(cls, n, None)]
        assert missing == [], (cls.__name__, missing)
    assert isinstance(ReferenceEngine(model_path, PROCESSED), Engine)
    wanted = members(Backend) + list(Backend.__annotations__)
    assert {"engine_kwargs", "create", "effective", "rpc", "pause", "resume", "abort", "name"} <= set(wanted)
    for backend in (V1, V0):
        missing = [n for n in wanted if inspect.getattr_static(backend, n, None) is None]
        assert missing == [], (backend.__name__, missing)
        assert not issubclass(backend, VLLMEngine)
    assert (V1.name, V0.name) == ("vllm", "vllm-v0")


# ------------------------------------------------------------------- versions


def test_weights_of_version_v_give_the_trainers_logprobs_at_v(model_path, hf_bf16):
    engine = ReferenceEngine(model_path, PROCESSED, ignore_eos=True)
    sd2 = perturbed(model_path)
    engine.load_weights(2, sd2)
    reqs = requests(n=4, max_tokens=12)
    gen = engine.generate(reqs)
    assert all(g.token_versions == [2] * 12 for g in gen)
    model2 = load_model(model_path, dtype="bfloat16")
    model2.load_state_dict(sd2)
    at_v2 = trainer_for(model2, reqs, gen, top_p=TOP_P, lm_head_dtype="bfloat16")
    at_v0 = trainer_for(hf_bf16, reqs, gen, top_p=TOP_P, lm_head_dtype="bfloat16")
    for g, t2, t0 in zip(gen, at_v2, at_v0):
        assert np.abs(np.array(g.logprobs) - t2).max() < 0.02
        assert np.abs(np.array(g.logprobs) - t0).max() > 0.1
    assert engine.versions == [0, 2]


HEAD_ONLY = ("layers.1.mlp", "model.norm", "lm_head")  # changes no K/V: scoring at v2 is exact


def _update_run(model_path, config, after=4):
    engine = ReferenceEngine(model_path, config, ignore_eos=True, initial_version=1)
    engine.load_weights(2, perturbed(model_path, scale=0.5, only=HEAD_ONLY), activate=False)
    reqs = requests(n=3, max_tokens=10)
    gen = engine.generate(reqs, [WeightUpdate(version=2, after_step=after)])
    assert engine.version == 2
    v1, v2 = score_at(engine, 1, reqs, gen), score_at(engine, 2, reqs, gen)
    return gen, v1, v2


def _computed_by(gen, v1, v2):
    """Per token, which version's scores it has bit for bit (1, 2, or None: neither)."""
    out = []
    for g, a, b in zip(gen, v1, v2):
        lp = np.array(g.logprobs)
        out.append([1 if abs(x - p) < 1e-5 else 2 if abs(x - q) < 1e-5 else None for x, p, q in zip(lp, a, b)])
        assert np.abs(a[4:] - b[4:]).min() > 1e-4       # the versions really differ there
    return out


def test_an_update_lands_between_two_steps_whole(model_path):
    """vLLM loads weights between engine steps, never under one: without async scheduling a
    concurrent update and a paused one give the same clean boundary, bit for bit (the real
    CPU build shows the same, tests/integration/test_vllm_engine.py). v2 differs from v1 in
    layer 1's MLP, the final norm and the lm_head only, so no K/V depends on the version and
    scoring under either version is exact at every position."""
    gen, v1, v2 = _update_run(model_path, CLEAN_RAW)
    paused, _, _ = _update_run(model_path, dataclasses.replace(CLEAN_RAW, weight_update="paused"))
    assert gen == paused
    for g, by in zip(gen, _computed_by(gen, v1, v2)):
        assert g.token_versions == [1] * 4 + [2] * 6
        assert by == [1] * 4 + [2] * 6


def test_concurrent_update_with_async_scheduling_reaches_the_step_in_flight_late(model_path):
    """The V1 default pair: the batch launched before the load computes token 4 with the old
    weights, and the framework stamps it with the new version."""
    gen, v1, v2 = _update_run(model_path, dataclasses.replace(CLEAN_RAW, async_scheduling=True))
    for g, by in zip(gen, _computed_by(gen, v1, v2)):
        assert g.token_versions == [1] * 4 + [2] * 6
        assert by == [1] * 5 + [2] * 5


def test_a_paused_update_waits_for_the_step_in_flight(model_path):
    """``pause_generation(mode="keep")`` completes once no batch is in flight, so under async
    scheduling too every token stamped v2 was computed by v2: the fix removes the late step."""
    gen, v1, v2 = _update_run(model_path, dataclasses.replace(CLEAN_RAW, weight_update="paused",
                                                                async_scheduling=True))
    for g, by in zip(gen, _computed_by(gen, v1, v2)):
        assert g.token_versions == [1] * 4 + [2] * 6
        assert by == [1] * 4 + [2] * 6


def test_an_update_at_the_prefill_has_nothing_in_flight(model_path):
    gen, v1, v2 = _update_run(model_path, dataclasses.replace(CLEAN_RAW, async_scheduling=True), after=0)
    for g, a, b in zip(gen, v1, v2):
        assert g.token_versions == [2] * 10
        assert np.abs(np.array(g.logprobs) - b).max() < 1e-5


def test_a_request_joining_later_meets_the_update_at_its_own_token(model_path):
    """Continuous batching: a request that joins at engine step 2 meets an update at step 4 at its
    token 2, with the bits of that request alone updated at its token 2 (rows are independent);
    one that joins after the update runs the new version from its prefill."""
    import dataclasses as dc

    def engine():
        e = ReferenceEngine(model_path, CLEAN_RAW, ignore_eos=True, initial_version=1)
        e.load_weights(2, perturbed(model_path, scale=0.5, only=HEAD_ONLY), activate=False)
        return e

    base = requests(n=3, max_tokens=8)
    reqs = [base[0], dc.replace(base[1], arrival_step=2), dc.replace(base[2], arrival_step=5)]
    got = engine().generate(reqs, [WeightUpdate(2, 4)])
    assert [g.token_versions for g in got] == [[1] * 4 + [2] * 4, [1] * 2 + [2] * 6, [2] * 8]
    alone = engine().generate([base[1]], [WeightUpdate(2, 2)])[0]
    assert got[1].output_ids == alone.output_ids and got[1].logprobs == alone.logprobs
    e = engine()
    v1, v2 = score_at(e, 1, reqs, got), score_at(e, 2, reqs, got)
    assert np.abs(np.array(got[1].logprobs[:2]) - v1[1][:2]).max() < 1e-5
    assert np.abs(np.array(got[1].logprobs[2:]) - v2[1][2:]).max() < 1e-5
    assert np.abs(np.array(got[2].logprobs) - v2[2]).max() < 1e-5
    with pytest.raises(BadInput, match="arrival_step") as err:
        engine().generate([dc.replace(base[0], arrival_step=-1)])
    assert err.value.field == "arrival_step"


def test_a_later_arrival_hits_the_blocks_an_earlier_one_prefilled(model_path):
    """Prefix caching within one call: the blocks a request prefilled serve a request that joins
    later with the same prefix, stale if an update landed in between (as vLLM's running batch)."""
    import dataclasses as dc

    cfg = dc.replace(CLEAN_RAW, enable_prefix_caching=True)
    engine = ReferenceEngine(model_path, cfg, ignore_eos=True, initial_version=1)
    engine.load_weights(2, perturbed(model_path, scale=0.5), activate=False)
    prompt = [1, 26, 14] + [4 + j % 10 for j in range(17)]   # 20 tokens: one full 16-token block
    first = GenRequest("a", prompt, max_tokens=6, temperature=T, top_p=TOP_P, seed=1)
    late = GenRequest("b", prompt[:18] + [9, 9], max_tokens=6, temperature=T, top_p=TOP_P, seed=2, arrival_step=4)
    a, b = engine.generate([first, late], [WeightUpdate(2, 2)])
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 16 and b.token_versions == [2] * 6
    fresh = ReferenceEngine(model_path, cfg, ignore_eos=True, initial_version=1)
    fresh.load_weights(2, perturbed(model_path, scale=0.5), activate=True)
    clean = fresh.generate([dc.replace(late, arrival_step=0, forced_output_ids=b.output_ids)])[0]
    assert clean.num_cached_tokens == 0
    assert np.abs(np.array(b.logprobs) - np.array(clean.logprobs)).max() > 1e-3   # the hit was stale


# --------------------------------------------------------------- prefix cache


def _stale_run(model_path, config):
    engine = ReferenceEngine(model_path, config, ignore_eos=True)
    prompt = [1, 26, 14] + [4 + j % 10 for j in range(17)]   # 20 tokens: one full 16-token block
    first = engine.generate([GenRequest("a", prompt, max_tokens=4, temperature=T, top_p=TOP_P, seed=1)])
    engine.load_weights(2, perturbed(model_path))           # cache not reset, as in the source's setup
    req = GenRequest("b", prompt[:16] + [30, 31, 32, 33, 34], max_tokens=8, temperature=T, top_p=TOP_P, seed=2)
    second = engine.generate([req])[0]
    fresh = engine.score([ScoreRequest("b", req.prompt_ids, second.output_ids, T, TOP_P)])[0]
    return first[0], second, np.abs(np.array(second.logprobs) - np.array(fresh.logprobs)).max()


def test_prefix_cache_reuses_stale_kv_after_an_update(model_path):
    _, second, gap = _stale_run(model_path, PROCESSED)
    assert second.num_cached_tokens == 16
    assert second.token_versions == [2] * 8
    assert gap > 0.01


def test_v0_runtime_defaults_remove_the_stale_kv(model_path):
    _, second, gap = _stale_run(model_path, resolve("v1", ["processed_logprobs", "v0_runtime_defaults"]))
    assert second.num_cached_tokens == 0
    assert gap < 1e-5


def test_prefix_cache_hits_within_a_call_are_exact(model_path):
    """Without an update a cache hit changes nothing: same bits as recomputing."""
    reqs = [GenRequest(f"r{i}", [1] + [4 + j % 10 for j in range(35)], max_tokens=6, temperature=T,
                       top_p=TOP_P, seed=7) for i in range(3)]
    cached = ReferenceEngine(model_path, PROCESSED, ignore_eos=True).generate(reqs)
    assert [g.num_cached_tokens for g in cached] == [0, 32, 32]
    plain = ReferenceEngine(model_path, resolve("v1", ["processed_logprobs", "v0_runtime_defaults"]),
                            ignore_eos=True).generate(reqs)
    for a, b in zip(cached, plain):
        assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    engine = ReferenceEngine(model_path, PROCESSED)
    engine.generate(reqs[:1])
    engine.reset_prefix_cache()
    assert engine.generate(reqs[1:2])[0].num_cached_tokens == 0


# ---------------------------------------------------------------- determinism


def test_same_inputs_same_bits(model_path):
    outs = []
    for _ in range(2):
        engine = ReferenceEngine(model_path, resolve("v1"))
        engine.load_weights(2, perturbed(model_path), activate=False)
        outs.append(engine.generate(requests(n=4, max_tokens=12), [WeightUpdate(2, 5)]))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_seeds_do_not_depend_on_batch_composition(model_path, dtype):
    config = dataclasses.replace(CLEAN, dtype=dtype)
    reqs = requests(n=5, max_tokens=12)
    together = ReferenceEngine(model_path, config, ignore_eos=True).generate(reqs)
    alone = ReferenceEngine(model_path, config, ignore_eos=True).generate([reqs[3]])[0]
    reordered = ReferenceEngine(model_path, config, ignore_eos=True).generate([reqs[3], reqs[0]])[0]
    for other in (alone, reordered):
        assert other.output_ids == together[3].output_ids and other.logprobs == together[3].logprobs
    assert len({tuple(g.output_ids) for g in together}) == 5


# ------------------------------------------------------------- stops and errors


def test_stop_tokens_end_a_request(model_path):
    engine = ReferenceEngine(model_path, PROCESSED, ignore_eos=True)
    free = engine.generate(requests(n=1, max_tokens=12))[0]
    stop = free.output_ids[3]
    first = free.output_ids.index(stop)
    stopped = engine.generate(requests(n=1, max_tokens=12, stop_token_ids=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.output_ids == free.output_ids[:first + 1]
    assert free.finish_reason == "length"


def test_bad_inputs_raise_clear_errors(model_path):
    engine = ReferenceEngine(model_path, PROCESSED)
    with pytest.raises(BadInput, match="never loaded"):
        engine.generate(requests(n=1), [WeightUpdate(9, 1)])
    with pytest.raises(BadInput, match="unknown weight name"):
        engine.load_weights(3, {"model.layers.7.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(BadInput, match="twice"):
        engine.generate(requests(n=1) * 2)
    with pytest.raises(BadInput, match="vocabulary"):
        engine.score([ScoreRequest("x", [1, 2], [999])])
    with pytest.raises(BadInput, match="never loaded"):
        engine.activate(5)


def test_hidden_states_per_layer_locate_a_changed_layer(model_path):
    engine = ReferenceEngine(model_path, EngineConfig(dtype="float32", lm_head_dtype="float32"))
    ids = [1, 26, 14, 7, 5, 15, 8]
    before = engine.hidden_states(ids)
    assert len(before) == 3 and before[0].shape == (7, 128)
    engine.load_weights(1, perturbed(model_path, only=("layers.1.",)))
    after = engine.hidden_states(ids)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert np.abs(before[2] - after[2]).max() > 1e-2


def test_loaded_versions_do_not_alias_the_callers_tensors(model_path):
    """A trainer updates its weights in place after sending them; the kept version must not move."""
    engine = ReferenceEngine(model_path, CLEAN, ignore_eos=True)
    sd = perturbed(model_path)
    engine.load_weights(2, sd)
    reqs = requests(n=2, max_tokens=8)
    first = engine.generate(reqs)
    for t in sd.values():
        t.mul_(0.5)
    assert engine.generate(reqs) == first


# ------------------------------------------------------------- grouped batches


GROUP_CONFIGS = [CLEAN_RAW, dataclasses.replace(CLEAN_RAW, weight_update="paused"),
                 dataclasses.replace(CLEAN, async_scheduling=True)]


@pytest.mark.parametrize("config", GROUP_CONFIGS, ids=["concurrent", "paused", "processed-async"])
def test_groups_in_one_call_give_the_bits_of_separate_calls(model_path, config):
    """Three recorded-step-like groups, each with its own serving version and update schedule
    (one updated mid-call), run in one batch: every token, logprob and reported version equals
    that of a separate generate() per group, forced and sampled."""
    v2, v3 = perturbed(model_path, seed=1), perturbed(model_path, seed=2)

    def engine():
        e = ReferenceEngine(model_path, config, ignore_eos=True, initial_version=1)
        e.load_weights(2, v2, activate=False)
        e.load_weights(3, v3, activate=False)
        return e

    forced = requests(n=2, max_tokens=8)
    forced = [dataclasses.replace(r, request_id=f"f{i}", forced_output_ids=[5 + i] * 8) for i, r in enumerate(forced)]
    groups = [GenGroup(requests(n=3, max_tokens=10), [WeightUpdate(2, 3)], serving=1),
              GenGroup(requests(n=2, max_tokens=6) + forced, [WeightUpdate(3, 2)], serving=2),
              GenGroup(requests(n=3, max_tokens=9), [], serving=2)]
    batched_engine = engine()
    batched = batched_engine.generate_groups(groups)
    assert batched_engine.version == 2
    separate = []
    for g in groups:
        e = engine()
        e.activate(g.serving)
        separate.append(e.generate(g.requests, g.updates))
    assert batched == separate
    assert batched[0][0].token_versions == [1] * 3 + [2] * 7
    assert batched[1][0].token_versions == [2] * 2 + [3] * 4
    assert batched[1][2].output_ids == [5] * 8


def test_groups_under_prefix_caching_are_refused(model_path):
    engine = ReferenceEngine(model_path, PROCESSED)
    with pytest.raises(BadInput, match="prefix caching") as err:
        engine.generate_groups([GenGroup(requests(n=1)), GenGroup(requests(n=1))])
    assert err.value.field == "groups"
    assert len(engine.generate_groups([GenGroup(requests(n=2))])[0]) == 2


class _PlainEngine(ReferenceEngine):
    """The reference engine seen through generate() only, as an engine without batched groups is."""

    def generate_groups(self, groups):
        return groups_by_calls(self, groups)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def generate(self, requests, updates=()):
        self.calls.append((self.version, [u.version for u in updates], [r.request_id for r in requests]))
        return ReferenceEngine.generate_groups(self, [GenGroup(list(requests), list(updates))])[0]


def test_engines_without_groups_share_a_call_per_schedule(model_path):
    """generate_groups() on an engine with only generate(): groups that start on the same version
    with the same updates share one call (unless their request ids collide), results per group."""
    plain = _PlainEngine(model_path, CLEAN, ignore_eos=True, initial_version=1)
    plain.load_weights(2, perturbed(model_path), activate=False)
    a = [dataclasses.replace(r, request_id=f"a{i}") for i, r in enumerate(requests(n=2, max_tokens=6))]
    b = [dataclasses.replace(r, request_id=f"b{i}") for i, r in enumerate(requests(n=2, max_tokens=6))]
    groups = [GenGroup(a, [WeightUpdate(2, 3)], 1), GenGroup(b, [], 2), GenGroup(b, [WeightUpdate(2, 3)], 1),
              GenGroup(a, [WeightUpdate(2, 3)], 1)]
    out = generate_groups(plain, groups)
    assert [c[0] for c in plain.calls] == [1, 2, 1]
    assert plain.calls[0][2] == ["a0", "a1", "b0", "b1"]           # groups 0 and 2 shared a call
    assert plain.calls[2][2] == ["a0", "a1"]                       # group 3 collides with group 0's ids
    native = ReferenceEngine(model_path, CLEAN, ignore_eos=True, initial_version=1)
    native.load_weights(2, perturbed(model_path), activate=False)
    assert out == generate_groups(native, groups)
    assert [len(g) for g in out] == [2, 2, 2, 2]


def test_prefills_under_prefix_caching_hit_as_one_at_a_time_in_order(model_path):
    """Prefills run in waves, yet each request gets the hit it would get after every earlier
    request of the call stored its prompt's full blocks, and the same bits as without a cache."""
    base = [1] + [4 + (7 * j) % 40 for j in range(39)]                # 40 tokens: 2 full blocks
    prompts = {"a": base, "b": base[:32] + [50, 51, 52, 53, 54], "c": base[:16] + [55] * 14,
               "d": list(base), "e": [2] + [44 + j % 9 for j in range(19)]}
    reqs = [GenRequest(k, p, max_tokens=4, temperature=T, top_p=TOP_P, seed=i)
            for i, (k, p) in enumerate(prompts.items())]
    cached = ReferenceEngine(model_path, PROCESSED, ignore_eos=True).generate(reqs)
    assert [g.num_cached_tokens for g in cached] == [0, 32, 16, 32, 0]
    plain = ReferenceEngine(model_path, CLEAN, ignore_eos=True).generate(reqs)
    for a, b in zip(cached, plain):
        assert a.output_ids == b.output_ids and a.logprobs == b.logprobs


def test_forced_tokens_run_on_past_an_eos_inside_them(model_path):
    """A recording made with ignore_eos holds EOS tokens mid-sequence: forcing it gives a logprob
    for every recorded token (not a sequence cut at the first EOS or stop token), and the tokens
    up to the EOS get the logprobs of a forced run that ends there."""
    from replay.models import EOS_ID

    raw = resolve("v1", [])   # raw logprobs: finite for any token, so the comparison below says something
    engine = ReferenceEngine(model_path, raw)   # the replayer's engines keep EOS on
    tokens = [7, EOS_ID, 9, EOS_ID, 11, 12]
    req = dataclasses.replace(requests(n=1, max_tokens=6)[0], forced_output_ids=tokens, stop_token_ids=[9])
    got = engine.generate([req])[0]
    assert got.output_ids == tokens and len(got.logprobs) == len(tokens)
    assert all(np.isfinite(got.logprobs))
    cut = ReferenceEngine(model_path, raw).generate([dataclasses.replace(req, forced_output_ids=tokens[:2])])[0]
    assert got.logprobs[:2] == cut.logprobs
