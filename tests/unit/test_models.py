"""Locally built Qwen2 checkpoints: deterministic, idempotent, loadable by transformers."""
from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")

from replay.errors import BadInput  # noqa: E402
from replay.models import (  # noqa: E402
    BOS_ID, CHECKPOINT_FILES, DEFAULT_VOCAB, EOS_ID, PAD_ID, UNK_ID, build_model, load_config,
    load_model, load_state_dict, load_tokenizer,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


def test_build_writes_every_checkpoint_file(tiny):
    for name in CHECKPOINT_FILES:
        assert (tiny / name).is_file(), name
    cfg = load_config(tiny)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["vocab_size"] == len(DEFAULT_VOCAB) + 4


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_model(tmp_path / "a", "tiny", seed=3)
    b = build_model(tmp_path / "b", "tiny", seed=3)
    c = build_model(tmp_path / "c", "tiny", seed=4)
    for name in CHECKPOINT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_rebuild_is_fast_and_a_new_seed_rewrites(tmp_path):
    out = tmp_path / "m"
    build_model(out, "tiny", seed=0)
    before = (out / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    build_model(out, "tiny", seed=0)
    assert time.perf_counter() - t0 < 0.1
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    w0 = (out / "model.safetensors").read_bytes()
    build_model(out, "tiny", seed=1)
    assert (out / "model.safetensors").read_bytes() != w0
    # A damaged folder (missing weights) is rebuilt, not trusted.
    (out / "model.safetensors").unlink()
    build_model(out, "tiny", seed=1)
    assert (out / "model.safetensors").is_file()


def test_transformers_loads_it_with_a_separate_lm_head(tiny):
    model = load_model(tiny, dtype="float32")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    assert not torch.equal(emb, head)
    n_params = sum(p.numel() for p in model.parameters())
    assert 200_000 < n_params < 500_000
    with torch.no_grad():
        logits = model(torch.tensor([[BOS_ID, 30, 4, 5]])).logits
    assert logits.shape == (1, 4, 64)
    lp = logits.log_softmax(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    # Peaked but not degenerate: sampling settings matter for this model.
    assert (entropy > 0.2).all() and (entropy < 4.0).all()


def test_bfloat16_load_and_state_dict_names_match(tiny):
    model = load_model(tiny, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    sd = load_state_dict(tiny)
    assert set(sd) == set(model.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_tokenizer_word_level_round_trip(tiny):
    tok = load_tokenizer(tiny)
    ids = tok.encode("sort: 31, 4 zz")
    assert tok.convert_ids_to_tokens(ids) == ["sort", ":", "3", "1", ",", "4", "<unk>"]
    assert tok.decode(ids[:-1]) == "sort : 3 1 , 4"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert len(tok) == 64


def test_small_size_is_about_ten_million_parameters(tmp_path):
    path = build_model(tmp_path / "small", "small", seed=0)
    cfg = load_config(path)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    n = sum(v.numel() for v in load_state_dict(path).values())
    assert 8_000_000 < n < 12_000_000


def test_custom_vocab_and_bad_inputs(tmp_path):
    path = build_model(tmp_path / "v", "tiny", vocab=["x", "y", "z"])
    assert load_config(path)["vocab_size"] == 7
    tok = load_tokenizer(path)
    assert tok.convert_ids_to_tokens(tok.encode("x z y")) == ["x", "z", "y"]
    with pytest.raises(BadInput, match="size"):
        build_model(tmp_path / "bad", "huge")
    with pytest.raises(BadInput, match="duplicate"):
        build_model(tmp_path / "dup", "tiny", vocab=["a", "a"])
    with pytest.raises(BadInput, match="config.json"):
        load_model(tmp_path / "nowhere")
    marker = json.loads((path / ".replay-model.json").read_text())
    assert marker["size"] == "tiny" and marker["seed"] == 0


def test_a_llama_checkpoint_is_the_qwen2_one_without_the_attention_biases(tmp_path):
    """Same seed, same size: the Llama folder holds the Qwen2 tensors minus q/k/v biases, loads
    as a ``LlamaForCausalLM``, and a Qwen2 folder keeps the marker it had before there was a choice."""
    from safetensors.torch import load_file

    from replay.models import MARKER

    q = build_model(tmp_path / "q", "tiny", seed=2)
    ll = build_model(tmp_path / "l", "tiny", seed=2, arch="llama")
    sq, sl = load_file(str(q / "model.safetensors")), load_file(str(ll / "model.safetensors"))
    assert set(sq) - set(sl) == {f"model.layers.{i}.self_attn.{n}_proj.bias" for i in range(2) for n in "qkv"}
    assert set(sl) <= set(sq) and all(torch.equal(sl[k], sq[k]) for k in sl)
    assert "arch" not in json.loads((q / MARKER).read_text())
    model = load_model(ll, dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert build_model(tmp_path / "l", "tiny", seed=2, arch="llama") == ll   # idempotent
    with pytest.raises(BadInput, match="architecture"):
        build_model(tmp_path / "x", "tiny", arch="gpt2")
