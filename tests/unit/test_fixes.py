"""The fix registry: presets, fixes, config ids, run names."""
from __future__ import annotations

import pytest

from replay import BadInput
from replay.fixes import FIX_IDS, PRESETS, EngineConfig, apply_fix, parse_run_name, resolve


def test_v1_with_all_fixes_is_v0():
    assert resolve("v1", FIX_IDS) == PRESETS["v0"]
    assert resolve("v1", FIX_IDS).id == PRESETS["v0"].id
    assert resolve("v1").id != PRESETS["v0"].id


def test_each_fix_changes_v1_and_is_idempotent():
    v1 = PRESETS["v1"]
    ids = {apply_fix(v1, f).id for f in FIX_IDS}
    assert len(ids) == len(FIX_IDS) and v1.id not in ids
    for f in FIX_IDS:
        once = apply_fix(v1, f)
        assert apply_fix(once, f) == once and once.fixes_applied() == (f,)
    assert PRESETS["v1"].fixes_applied() == ()
    assert PRESETS["v0"].fixes_applied() == FIX_IDS


def test_config_round_trips_and_refuses_unknowns():
    cfg = resolve("v1", ["fp32_lm_head"])
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BadInput, match="logprobs_mode"):
        EngineConfig(logprobs_mode="softmax")
    with pytest.raises(BadInput, match="unknown engine config field"):
        EngineConfig.from_dict({"colour": "blue"})
    with pytest.raises(BadInput, match="unknown fix"):
        resolve("v1", ["faster"])
    with pytest.raises(BadInput, match="unknown preset"):
        resolve("v2")


def test_run_names():
    assert parse_run_name("v1+fixes") == ("v1", FIX_IDS)
    assert parse_run_name("v1+fp32_lm_head+processed_logprobs") == ("v1", ("fp32_lm_head", "processed_logprobs"))
    assert parse_run_name("v0") == ("v0", ())
    with pytest.raises(BadInput):
        parse_run_name("v1+nope")


def test_a_vllm_replay_takes_the_recorded_settings_and_the_reference_none():
    from replay.engines.factory import replay_settings
    recorded = {"block_size": 32, "max_model_len": 256, "max_num_seqs": None, "enforce_eager": True,
                "enable_chunked_prefill": False}
    assert replay_settings("vllm", recorded) == {"block_size": 32, "max_model_len": 256,
                                                 "enable_chunked_prefill": False}
    assert replay_settings("reference", recorded) == {} and replay_settings("vllm", None) == {}


def test_the_default_context_stays_within_the_models_own(tmp_path):
    import json

    from replay.engines.vllm.args import DEFAULT_MAX_MODEL_LEN, default_max_model_len
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    assert default_max_model_len(str(tmp_path)) == 256
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert default_max_model_len(str(tmp_path)) == DEFAULT_MAX_MODEL_LEN
    assert default_max_model_len(str(tmp_path / "missing")) == DEFAULT_MAX_MODEL_LEN
