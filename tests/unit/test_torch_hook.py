"""The trainer hook on a real tiny HF Qwen2 forward, recorded and read back with DuckDB."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replay import Recorder, open_recording
from replay.errors import BadInput
from replay.integrations.torch import (FINGERPRINT_PREFIX, TrainerHook, hash_state_dict_gpu, record_trainer_batch,
                                       record_weights)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from replay.models import build_model, load_model

    return load_model(build_model(tmp_path_factory.mktemp("tiny")), dtype="float32")


def _batch(model, temperature):
    """A PipelineRL-style padded batch: prompt + output per row, right padding, the
    trainer's shifted logits and labels, and the mask of output tokens."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 26, 14, 7], [1, 27, 14, 9, 9, 15]]
    outputs = [[int(t) for t in torch.randint(4, 64, (n,), generator=g)] for n in (6, 3)]
    L = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    ids = torch.zeros(2, L, dtype=torch.long)
    out_mask = torch.zeros(2, L, dtype=torch.bool)
    for b, (p, o) in enumerate(zip(prompts, outputs)):
        ids[b, :len(p) + len(o)] = torch.tensor(p + o)
        out_mask[b, len(p):len(p) + len(o)] = True
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    naive_lp = lp.gather(2, ids[:, 1:, None])[..., 0]
    naive_ent = -(lp.exp() * lp).sum(-1)
    return dict(logits=logits[:, :-1], token_ids=ids[:, 1:], mask=out_mask[:, 1:]), outputs, naive_lp, naive_ent


@pytest.mark.parametrize("layout", ["strided", "contiguous"])  # selected rows vs every row captured
def test_batch_from_logits_matches_the_naive_trainer_pass(model, tmp_path, layout):
    batch, outputs, naive_lp, naive_ent = _batch(model, 0.7)
    if layout == "contiguous":
        batch["logits"] = batch["logits"].contiguous()
    with Recorder(tmp_path / "rec") as rec:
        record_trainer_batch(rec, step=4, request_ids=["a", "b"], weight_version=[7, 8], advantages=[0.5, -1.0],
                             temperature=0.7, k=5, **batch)
    r = open_recording(tmp_path / "rec")
    rows = r.sql("SELECT request_id, weight_version, logprobs, entropy, advantage FROM trainer "
                 "ORDER BY request_id").fetchall()
    m = batch["mask"]
    for b, (rid, version, lps, ent, adv) in enumerate(rows):
        assert (rid, version, adv) == ("ab"[b], 7 + b, [0.5, -1.0][b])
        assert len(lps) == len(outputs[b])
        np.testing.assert_allclose(lps, naive_lp[b][m[b]].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent, naive_ent[b][m[b]].numpy(), rtol=1e-5, atol=1e-5)
    ev = r.sql("SELECT step, json_extract(detail, '$.tokens')::INT FROM events WHERE kind = 'trainer_batch'")
    assert ev.fetchall() == [(4, sum(len(o) for o in outputs))]
    top = r.sql("SELECT request_id, pos, ids, logprobs FROM topk WHERE source = 'trainer' "
                "ORDER BY request_id, pos").fetchall()
    assert len(top) == sum(len(o) for o in outputs)
    lp_full = torch.log_softmax(batch["logits"].float() / 0.7, -1)
    for rid, pos, ids, lps in top:
        b = "ab".index(rid)
        row = lp_full[b][m[b]][pos]
        assert ids == torch.sort(row, descending=True, stable=True).indices[:5].tolist()
        np.testing.assert_allclose(lps, row[ids].numpy(), rtol=1e-5, atol=1e-5)


def test_hook_with_lengths_and_precomputed_logprobs(model, tmp_path):
    batch, outputs, naive_lp, naive_ent = _batch(model, 1.0)
    m = batch["mask"]
    # right-padded, output-only layout: lengths say how many leading positions are output
    out_lp = torch.zeros(2, 6)
    for b in range(2):
        out_lp[b, :m[b].sum()] = naive_lp[b][m[b]]
    with Recorder(tmp_path / "rec") as rec, TrainerHook(rec, k=3, weight_version=2) as hook:
        hook.record_batch(step=1, request_ids=["a", "b"], token_ids=torch.zeros(2, 6, dtype=torch.long),
                          logprobs=out_lp, lengths=[6, 3], k=0)
        hook.record_batch(step=2, request_ids=["a", "b"], **batch)
        fp = hook.record_weights(3, model, step=2, store="hash")
        hook.record_batch(step=3, request_ids=["a", "b"], **batch)
    r = open_recording(tmp_path / "rec")
    rows = r.sql("SELECT step, request_id, weight_version, logprobs FROM trainer ORDER BY step, request_id").fetchall()
    assert [(s, rid, v) for s, rid, v, _ in rows] == [(1, "a", 2), (1, "b", 2), (2, "a", 2), (2, "b", 2),
                                                      (3, "a", 3), (3, "b", 3)]
    for (s1, _, _, lp1), (s2, _, _, lp2) in zip(rows[:2], rows[2:4]):
        np.testing.assert_allclose(lp1, lp2, rtol=1e-5, atol=1e-5)  # precomputed == from logits
    w = r.sql("SELECT version, sha256, blob FROM weights").fetchall()
    assert w == [(3, FINGERPRINT_PREFIX + fp, None)]
    ev = r.sql("SELECT weight_version, json_extract_string(detail, '$.fingerprint') FROM events "
               "WHERE kind = 'weights_fingerprint'").fetchall()
    assert ev == [(3, fp)]


def test_bad_batches_are_refused(model, tmp_path):
    batch, *_ = _batch(model, 1.0)
    with Recorder(tmp_path / "rec") as rec:
        with pytest.raises(BadInput) as e:
            record_trainer_batch(rec, step=0, request_ids=["a"], **batch)
        assert e.value.field == "request_ids"
        with pytest.raises(BadInput) as e:
            record_trainer_batch(rec, step=0, request_ids=["a", "b"], token_ids=batch["token_ids"],
                                 logits=batch["logits"])
        assert e.value.field == "mask"


def test_fingerprint_tracks_every_byte_and_position(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fp = hash_state_dict_gpu(sd)
    assert fp == hash_state_dict_gpu({k: v.clone() for k, v in reversed(list(sd.items()))})
    assert len(fp) == 32
    changed = dict(sd)
    w = sd["lm_head.weight"].clone()
    w.view(-1)[123] = torch.nextafter(w.view(-1)[123], torch.tensor(1e9))  # one ulp
    changed["lm_head.weight"] = w
    assert hash_state_dict_gpu(changed) != fp
    swapped = dict(sd)
    w = sd["model.norm.weight"].clone()
    w[[0, 1]] = w[[1, 0]]
    swapped["model.norm.weight"] = w
    assert w[0] != w[1] and hash_state_dict_gpu(swapped) != fp
    assert hash_state_dict_gpu({k: v.to(torch.bfloat16) for k, v in sd.items()}) != fp
    with pytest.raises(BadInput):
        hash_state_dict_gpu({"x": [1, 2]})


@pytest.mark.gpu
def test_fingerprint_is_the_same_on_cuda(model):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none on this machine)")
    sd = model.state_dict()
    assert hash_state_dict_gpu({k: v.cuda() for k, v in sd.items()}) == hash_state_dict_gpu(sd)


def test_record_weights_full_and_delta_load_back(model, tmp_path):
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: v + 0.001 if k.endswith("norm.weight") else v.clone() for k, v in sd1.items()}
    with Recorder(tmp_path / "rec") as rec:
        fp1 = record_weights(rec, 1, sd1, step=0, store="full")
        fp2 = record_weights(rec, 2, sd2, step=1, store="delta")
    assert fp1 != fp2
    r = open_recording(tmp_path / "rec")
    rows = r.sql("SELECT version, base_version FROM weights ORDER BY version").fetchall()
    assert rows == [(1, None), (2, 1)]
    back = r.load_weights(2)
    assert set(back) == set(sd2)
    for k in sd2:
        assert torch.equal(back[k], sd2[k])
    with Recorder(tmp_path / "rec2") as rec, pytest.raises(BadInput):
        record_weights(rec, 1, sd1, store="zip")
