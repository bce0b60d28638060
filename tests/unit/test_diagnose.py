"""The diagnosis' parts on their own: the floor test, the semantics identification and the
reference scorer (against transformers, token by token, across a weight-version switch)."""
from __future__ import annotations

import numpy as np
import pytest

from replay.diagnose.stats import TAIL_RATE, Floor, floor_test


def _h0(rng, n, s=1e-6):
    """A component under the hypothesis: two correct computations, each off the exact value by an
    error of the floor's size, and the floor's own samples."""
    return rng.normal(0, s, n) - rng.normal(0, s, n), np.abs(rng.normal(0, s, 4 * n))


def test_floor_test_rarely_rejects_two_correct_computations():
    rng = np.random.default_rng(0)
    rejected = sum(not floor_test(c, Floor.of(f)).at_floor for c, f in (_h0(rng, 400) for _ in range(300)))
    assert rejected <= 3   # each test is at 1e-3; 300 trials of two tests expect ~0.6


def test_floor_test_rejects_a_small_shift_on_every_token():
    rng = np.random.default_rng(1)
    c, f = _h0(rng, 400)
    t = floor_test(c + 4e-6, Floor.of(f))   # a few floors' worth, everywhere
    assert t.at_floor is False and t.z_mean > 3.09


def test_floor_test_rejects_a_large_error_on_few_tokens():
    """The late step of an async update or stale KV touches a few tokens hard: the mean barely moves, the tail test fires."""
    rng = np.random.default_rng(2)
    c, f = _h0(rng, 1000)
    c[:40] += 1e-3                          # 4% of the tokens, far above the floor
    t = floor_test(c, Floor.of(f))
    assert t.at_floor is False and t.exceed >= 40 and t.z_tail > 3.09


def test_floor_test_counts_support_disagreements():
    rng = np.random.default_rng(3)
    c, f = _h0(rng, 1000)
    few = c.copy()
    few[:3] = np.inf                        # within the allowance
    assert floor_test(few, Floor.of(f)).at_floor is True and floor_test(few, Floor.of(f)).outside == 3
    many = c.copy()
    many[: int(3 * TAIL_RATE * 1000)] = np.inf
    assert floor_test(many, Floor.of(f)).at_floor is False
    nan = np.full(10, np.nan)               # nothing compared: no verdict
    assert floor_test(nan, Floor.of(f)).at_floor is None


def test_exactly_zero_components_are_at_a_zero_floor():
    t = floor_test(np.zeros(100), Floor.of(np.zeros(100)))
    assert t.at_floor is True
    assert floor_test(np.full(100, 1e-4), Floor.of(np.zeros(100))).at_floor is False


# ------------------------------------------------------------------ semantics

def _seq(lp_tr_sampler, lp_tr_tempered, trainer, top_p=0.9):
    from replay.diagnose.sequences import RefSeq
    from replay.diagnose.scoring import Dist

    n = len(trainer)
    s = RefSeq(step=0, request_id="a", group_id=None, prompt_ids=[1], output_ids=[5] * n,
               versions=np.zeros(n, np.int64), trainer_version=0, lp_rollout=np.zeros(n),
               trainer_row=np.asarray(trainer, float), num_cached_tokens=None, dist=Dist(0.8, -1, top_p))
    s.lp_sampler = s.lp_sampler_tr = np.asarray(lp_tr_sampler, float)
    s.lp_tempered = s.lp_tempered_tr = np.asarray(lp_tr_tempered, float)
    return s


def test_identify_semantics_picks_the_distribution_the_trainer_follows():
    from replay.diagnose.components import identify_semantics

    sampler, tempered = [-0.1, -0.5, -np.inf], [-0.2, -0.6, -4.0]
    assert identify_semantics([_seq(sampler, tempered, tempered)]) == "untruncated"
    assert identify_semantics([_seq(sampler, tempered, [-0.1, -0.5, -1e4])]) == "sampler"
    # without truncation the two are one; without trainer rows nothing is identified
    assert identify_semantics([_seq(tempered, tempered, tempered, top_p=1.0)]) == "sampler"
    s = _seq(sampler, tempered, tempered)
    s.trainer_row = None
    assert identify_semantics([s]) == "sampler"


def test_the_decomposition_adds_up_to_the_mismatch():
    from replay.diagnose.components import tokens

    rng = np.random.default_rng(4)
    s = _seq(rng.normal(-1, 0.3, 20), rng.normal(-1.1, 0.3, 20), rng.normal(-1, 0.3, 20))
    s.lp_rollout = rng.normal(-1, 0.3, 20)
    s.lp_sampler_tr = s.lp_sampler + rng.normal(0, 0.05, 20)
    s.lp_tempered_tr = s.lp_tempered + rng.normal(0, 0.05, 20)
    for sem in ("sampler", "untruncated"):
        t = tokens([s], sem)
        np.testing.assert_allclose(t.trainer + t.lag + t.semantics - t.backend, t.r, atol=1e-12)


# ------------------------------------------------------------------ scoring

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from replay.models import build_model

    return build_model(tmp_path_factory.mktemp("qwen"), size="tiny", seed=3)


def _versions(path):
    import torch

    from replay.models import load_state_dict

    v0 = {k: v.float() for k, v in load_state_dict(path).items()}
    gen = torch.Generator().manual_seed(7)
    v1 = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in v0.items()}
    return {0: v0, 1: v1}


def test_scorer_equals_transformers_token_by_token(qwen):
    """Single-version sequences (shared prompts, different lengths): the trainer's padded
    transformers forward to float32 precision (a few units in the last place: the prompt runs
    once, in GEMMs of another shape), under the sampler's truncated distribution and untruncated."""
    from replay.diagnose.scoring import Dist, ReferenceScorer, Seq
    from replay.models import load_model
    from replay.trainer.scoring import trainer_logprobs

    w = _versions(qwen)
    prompts = [[1, 30, 14, 5]] * 3 + [[1, 31, 14, 6, 15]] * 2
    outputs = [[5, 6, 7], [8], [9, 10, 11, 12], [4, 4], [13, 5, 6]]
    sc = ReferenceScorer(qwen, w.__getitem__)
    got = sc.score([Seq(i, p, o, [Dist(0.7, -1, 0.9), Dist(0.7)], [1] * len(o))
                    for i, (p, o) in enumerate(zip(prompts, outputs))])
    model = load_model(qwen, dtype="float32")
    model.load_state_dict(w[1])
    for j, top_p in enumerate((0.9, 1.0)):
        want = trainer_logprobs(model, prompts, outputs, temperature=0.7, top_p=top_p, return_entropy=False)
        for i in range(len(prompts)):
            a, b = got[i][j], np.asarray(want.logprobs[i], np.float64)
            assert np.array_equal(np.isneginf(a), np.isneginf(b))
            np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-6, rtol=1e-6)


def test_scorer_across_a_version_switch_keeps_the_earlier_kv(qwen):
    """Tokens stamped [0, 0, 1, 1]: the prompt and the first output token's KV come from version 0,
    the rest from version 1, as an update that keeps the requests' KV leaves them."""
    import torch

    from replay.diagnose.scoring import Dist, ReferenceScorer, Seq
    from replay.models import load_model

    w = _versions(qwen)
    prompt, out = [1, 30, 14, 5, 15], [6, 7, 8, 9]
    sc = ReferenceScorer(qwen, w.__getitem__)
    got = sc.score([Seq("a", prompt, out, [Dist(1.0)], [0, 0, 1, 1]),
                    Seq("b", prompt, out, [Dist(1.0)], [0, 0, 1, 1])])
    old, new = load_model(qwen, dtype="float32"), load_model(qwen, dtype="float32")
    old.load_state_dict(w[0])
    new.load_state_dict(w[1])
    ids = prompt + out
    # token t is predicted at position P-1+t; positions < P+1 (prompt + first output) are version 0's
    split = len(prompt) + 1
    with torch.no_grad():
        a = old(input_ids=torch.tensor([ids[:split]]), use_cache=True)
        b = new(input_ids=torch.tensor([ids[split:-1]]), past_key_values=a.past_key_values, use_cache=True)
    logits = torch.cat([a.logits[0, len(prompt) - 1:], b.logits[0]], 0).float()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None])[:, 0].double().numpy()
    np.testing.assert_allclose(got["a"][0], want, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got["a"][0], got["b"][0])
    fresh = sc.score([Seq("c", prompt, out, [Dist(1.0)], [1, 1, 1, 1])])["c"][0]
    assert np.abs(fresh[2:] - got["a"][0][2:]).max() > 1e-4   # the old KV matters


def test_scorer_refuses_what_it_cannot_score(qwen):
    from replay.diagnose.scoring import Dist, ReferenceScorer, Seq
    from replay.errors import BadInput

    w = _versions(qwen)
    sc = ReferenceScorer(qwen, w.__getitem__)
    with pytest.raises(BadInput, match="empty prompt"):
        sc.score([Seq("x", [], [5], [Dist()], [0])])
    with pytest.raises(BadInput, match="versions for"):
        sc.score([Seq("x", [1], [5, 6], [Dist()], [0])])
    assert sc.score([Seq("e", [1], [], [Dist()], [])])["e"][0].size == 0
