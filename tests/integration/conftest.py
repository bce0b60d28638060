"""Shared fixtures for the integration tests: a tiny real checkpoint, weight versions,
and the trainer's side of every logprob comparison (``replay.trainer.scoring`` over a bf16
transformers model, plus a forward that splits the KV cache between two versions)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

# The vLLM engine core stays in the test process (no engine subprocess to spawn).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random Qwen2 checkpoint (hidden 128, 2 layers, head_dim 64, vocab 64)."""
    from replay.models import build_model

    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), size="tiny", seed=0)


def version_weights(seed: int) -> dict:
    """A new weight version: HF-named tensors of another random tiny model, rounded to
    bfloat16 so the engine and the trainer hold bit-identical weights."""
    import torch
    from replay.models import DEFAULT_VOCAB, SIZES, SPECIAL_TOKENS, random_state_dict

    sd = random_state_dict(SIZES["tiny"], len(SPECIAL_TOKENS) + len(DEFAULT_VOCAB), seed)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def hf_model(path, state_dict=None):
    """The checkpoint as a bf16 transformers model, optionally with other weights."""
    from replay.models import load_model

    model = load_model(path, dtype="bfloat16")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def _logits(model, ids, lm_head_dtype: str, past=None):
    import torch

    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        hidden = out.last_hidden_state[0]
        w = model.lm_head.weight
        if lm_head_dtype == "float32":
            logits = hidden.float() @ w.float().T
        else:
            logits = (hidden @ w.T).float()
    return logits, out.past_key_values


def trainer_logprobs(model, prompt, output, temperature=1.0, top_p=1.0, lm_head_dtype="bfloat16"):
    """The trainer's logprob of each output token (:func:`replay.trainer.scoring.trainer_logprobs`):
    ``log_softmax(logits / T)``, with ``top_p < 1`` renormalised over the sampler's nucleus
    (the processed-mode comparison)."""
    import numpy as np

    from replay.trainer.scoring import trainer_logprobs as score

    res = score(model, [list(prompt)], [list(output)], temperature=temperature, top_p=top_p,
                lm_head_dtype=lm_head_dtype, return_entropy=False)
    return np.asarray(res.logprobs[0], dtype=np.float64)


def split_kv_logprobs(model_old, model_new, ids, split: int, n_out: int, temperature=1.0):
    """Logprobs of the last ``n_out`` tokens of ``ids`` when the KV of ``ids[:split]`` was
    computed by ``model_old`` and everything after by ``model_new``: what a request sees
    after a weight update that keeps its KV (an in-flight request after ``k`` decode steps
    has ``split = len(prompt) + k - 1``; a prefix-cache hit has ``split`` = cached tokens)."""
    import numpy as np
    import torch

    ids = list(ids)
    _, past = _logits(model_old, ids[:split], "bfloat16")
    logits, _ = _logits(model_new, ids[split:-1], "bfloat16", past=past)
    lp = torch.log_softmax(logits.double() / temperature, dim=-1).numpy()
    rows = lp[len(lp) - n_out:]
    return np.array([rows[i, t] for i, t in enumerate(ids[len(ids) - n_out:])])


@pytest.fixture(scope="session")
def trainer_side():
    """The helpers above as one object (test modules take it as a fixture)."""
    return SimpleNamespace(version_weights=version_weights, hf_model=hf_model,
                           trainer_logprobs=trainer_logprobs, split_kv_logprobs=split_kv_logprobs)
