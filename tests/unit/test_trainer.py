"""Trainer-side logprobs: batched, tempered, fp32 lm_head, differentiable."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from replay.errors import BadInput  # noqa: E402
from replay.models import build_model, load_model  # noqa: E402
from replay.trainer.scoring import sequence_logprobs_tensor, trainer_logprobs  # noqa: E402

PROMPTS = [[1, 26, 14, 7, 5, 15, 8], [1, 27, 14, 9], [1, 28, 14, 4, 5, 6, 7, 8, 9, 10]]
OUTPUTS = [[20, 4, 33, 17, 2], [11, 11, 12], [30, 31, 32, 5, 6, 7, 8, 40, 41]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("trainer") / "tiny", "tiny", seed=0)


def naive(model, prompt, output, temperature, head_fp64=False):
    """One sequence, no padding, straight from the HF logits (float64 head if asked)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        if head_fp64:
            hidden = model.model(input_ids=ids).last_hidden_state[0].double()
            logits = hidden @ model.lm_head.weight.double().T
        else:
            logits = model(input_ids=ids).logits[0].double()
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(output)] / temperature
    lp_all = torch.log_softmax(logits, -1)
    lp = lp_all.gather(-1, torch.tensor(output)[:, None])[:, 0]
    ent = -(lp_all.exp() * lp_all).sum(-1)
    return lp.numpy(), ent.numpy()


def test_batched_matches_one_sequence_forward_fp32(model_path):
    model = load_model(model_path, dtype="float32")
    res = trainer_logprobs(model, PROMPTS, OUTPUTS, temperature=0.7, batch_size=2)
    assert [len(x) for x in res.logprobs] == [len(o) for o in OUTPUTS]
    assert all(x.dtype == np.float32 for x in res.logprobs + res.entropy)
    for p, o, lp, ent in zip(PROMPTS, OUTPUTS, res.logprobs, res.entropy):
        ref_lp, ref_ent = naive(model, p, o, 0.7)
        np.testing.assert_allclose(lp, ref_lp, atol=2e-5)
        np.testing.assert_allclose(ent, ref_ent, atol=2e-5)
    assert all((x < 0).all() for x in res.logprobs)


def test_temperature_changes_logprobs_and_entropy(model_path):
    model = load_model(model_path, dtype="float32")
    cold = trainer_logprobs(model, PROMPTS, OUTPUTS, temperature=0.5)
    warm = trainer_logprobs(model, PROMPTS, OUTPUTS, temperature=1.5)
    assert np.mean(np.concatenate(cold.entropy)) < np.mean(np.concatenate(warm.entropy))
    assert not np.allclose(np.concatenate(cold.logprobs), np.concatenate(warm.logprobs))


def test_fp32_head_is_closer_to_exact_than_bf16_head(model_path):
    model = load_model(model_path, dtype="bfloat16")
    fp32 = trainer_logprobs(model, PROMPTS, OUTPUTS, lm_head_dtype="float32", return_entropy=False)
    bf16 = trainer_logprobs(model, PROMPTS, OUTPUTS, lm_head_dtype="bfloat16", return_entropy=False)
    assert fp32.entropy is None
    err32, err16 = [], []
    for i, (p, o) in enumerate(zip(PROMPTS, OUTPUTS)):
        exact, _ = naive(model, p, o, 1.0, head_fp64=True)
        err32.append(np.abs(fp32.logprobs[i] - exact))
        err16.append(np.abs(bf16.logprobs[i] - exact))
    assert np.mean(np.concatenate(err32)) < 1e-4
    assert np.mean(np.concatenate(err16)) > 10 * np.mean(np.concatenate(err32))


def test_tensor_variant_keeps_the_graph(model_path):
    model = load_model(model_path, dtype="float32")
    res = sequence_logprobs_tensor(model, PROMPTS, OUTPUTS, temperature=0.7, return_entropy=True)
    assert res.logprobs.shape == res.mask.shape == (3, max(len(o) for o in OUTPUTS))
    assert res.mask.sum().item() == sum(len(o) for o in OUTPUTS)
    assert (res.logprobs[~res.mask] == 0).all()
    loss = -(res.logprobs * res.mask).sum()
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    nograd = trainer_logprobs(model, PROMPTS, OUTPUTS, temperature=0.7)
    for i, o in enumerate(OUTPUTS):
        np.testing.assert_allclose(res.logprobs[i, :len(o)].detach().numpy(), nograd.logprobs[i], atol=1e-6)


def test_empty_outputs_and_bad_inputs(model_path):
    model = load_model(model_path, dtype="float32")
    res = trainer_logprobs(model, [[1, 2]], [[]])
    assert res.logprobs[0].shape == (0,)
    with pytest.raises(BadInput, match="output"):
        trainer_logprobs(model, PROMPTS, OUTPUTS[:2])
    with pytest.raises(BadInput, match="empty prompt"):
        trainer_logprobs(model, [[]], [[3]])
    with pytest.raises(BadInput, match="temperature"):
        trainer_logprobs(model, PROMPTS, OUTPUTS, temperature=0)
    with pytest.raises(BadInput, match="lm_head_dtype"):
        trainer_logprobs(model, PROMPTS, OUTPUTS, lm_head_dtype="float16")


def test_padding_does_not_move_bf16_logprobs(model_path):
    """Right padding must not change a sequence's numbers, in bf16 too (eager attention)."""
    model = load_model(model_path, dtype="bfloat16")
    batched = trainer_logprobs(model, PROMPTS, OUTPUTS).logprobs
    for p, o, lp in zip(PROMPTS, OUTPUTS, batched):
        alone = trainer_logprobs(model, [p], [o]).logprobs[0]
        np.testing.assert_allclose(lp, alone, atol=1e-5)


def test_top_p_truncation_matches_processed_semantics(model_path):
    """With top_p the tempered logits are truncated to the nucleus before log_softmax:
    kept tokens gain -log(nucleus mass), dropped tokens get -inf; gradients stay finite."""
    model = load_model(model_path, dtype="float32")
    greedy = []
    for p in PROMPTS:  # likely tokens (always in the nucleus) next to the arbitrary OUTPUTS
        seq = list(p)
        with torch.no_grad():
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        greedy.append(seq[len(p):])
    prompts, outputs = PROMPTS + PROMPTS, OUTPUTS + greedy
    plain = np.concatenate(trainer_logprobs(model, prompts, outputs, temperature=0.7).logprobs)
    res = trainer_logprobs(model, prompts, outputs, temperature=0.7, top_p=0.6)
    nucleus = np.concatenate(res.logprobs)
    kept = np.isfinite(nucleus)
    assert kept.any() and (~kept).any()
    assert (nucleus[kept] >= plain[kept] - 1e-6).all() and (nucleus[kept] > plain[kept] + 1e-3).any()
    assert all(np.isfinite(e).all() for e in res.entropy)
    out = sequence_logprobs_tensor(model, prompts, outputs, temperature=0.7, top_p=0.6, return_entropy=True)
    out.entropy.sum().backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()
