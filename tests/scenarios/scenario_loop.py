"""Recordings with one known cause each, made by a training loop that is not the demo's.

The loop: a tiny **Llama** checkpoint (the demo trains a Qwen2), GRPO over groups that
share a 16-token system prefix (two prefix-cache blocks of 8), a one-step-off
asynchronous pipeline (batch k+1 is generated while the trainer trains on batch k,
and version k+1 reaches the engine mid-generation, at a decode step drawn per step,
0 included), sequences that stop at EOS at different lengths, Adam on a
reward for tokens in a target set. The trainer scores with transformers in float32 like
PipelineRL's (logits / T, no renormalisation over top-p). Policy lag is present at
every step after the first.

A scenario sets one cause:

* **backend faults**: the engine's config is V0's minus the fixes in ``faults``;
* **trainer faults**: the engine is V0-correct and the trainer's recorded logprobs are
  wrong in one way (``trainer``);
* **unexplained**: something nothing models (noise on the rollout or the trainer's logprobs; an
  engine that never loads the new weights while the framework stamps the new version).

``build_llama`` and ``record`` are used by ``tests/scenarios/test_diagnosis.py`` and by
``benchmarks/diagnosis.py``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replay.fixes import FIX_IDS, EngineConfig, PRESETS

VOCAB = 48
PAD, BOS, EOS = 0, 1, 2
PREFIX = [BOS] + [3 + (7 * i) % 40 for i in range(15)]   # 16 tokens shared by every prompt
BLOCK = 8
TEMPERATURE, TOP_P = 0.8, 0.9
N_PROBLEMS, GROUP, MAX_TOKENS = 4, 4, 6
LAG_FIXES = ("v0_runtime_defaults", "paused_weight_update")   # each removes an async update's late step
TRAINER_FAULTS = ("temperature", "truncation", "position_shift", "stale_version", "loss_mask", "lm_head_dtype")


@dataclass(frozen=True)
class Scenario:
    """One recording and the diagnosis it must get."""

    name: str
    faults: tuple[str, ...] = ()         # fixes the engine lacks (V0 minus these)
    trainer: str = "clean"               # clean | sampler | one of TRAINER_FAULTS | noise
    rollout_noise: float = 0.0           # std of noise added to the recorded rollout logprobs
    stale_engine: bool = False           # the engine never loads new weights; tokens are stamped as if
    dtype: str = "float32"               # the engine's body dtype
    verdict: str = "clean"               # expected
    causes: tuple[str, ...] = ()         # expected trainer causes
    async_only: bool = False             # the v0_runtime_defaults fault is async scheduling alone

    @property
    def config(self) -> EngineConfig:
        v0 = PRESETS["v0"]
        undo = {"processed_logprobs": dict(logprobs_mode="raw_logprobs"),
                "v0_runtime_defaults": dict(enable_prefix_caching=not self.async_only, async_scheduling=True),
                "paused_weight_update": dict(weight_update="concurrent"),
                "fp32_lm_head": dict(lm_head_dtype="bfloat16")}
        cfg = dataclasses.replace(v0, dtype=self.dtype)
        for f in self.faults:
            cfg = dataclasses.replace(cfg, **undo[f])
        return cfg

    @property
    def fix_sets(self) -> tuple[tuple[str, ...], ...]:
        """Every 1-minimal fix set the diagnosis may name. An unpaused update differs from a
        paused one only under async scheduling (the step in flight computes with the old
        weights), which turning async scheduling off removes too: the paused update is
        needed only where async scheduling stays on and nothing else needs
        v0_runtime_defaults, and then either fix alone closes the gap."""
        rest = tuple(f for f in FIX_IDS if f in self.faults and f not in LAG_FIXES)
        lag = [f for f in LAG_FIXES if f in self.faults]
        if "v0_runtime_defaults" in lag and not self.async_only:
            return (tuple(f for f in FIX_IDS if f in rest or f == "v0_runtime_defaults"),)
        if len(lag) == 2:   # async scheduling on, prefix caching off: either removes the late step
            return tuple(tuple(f for f in FIX_IDS if f in rest or f == one) for one in lag)
        return (rest,) if rest else ()   # async off, or on with the update paused: nothing in flight


def scenarios() -> list[Scenario]:
    """Each fix's fault alone, in pairs and all four; each trainer-side hypothesis; clean runs
    (PipelineRL's semantics and a renormalising trainer, float32 and bfloat16 bodies); and two
    causes nothing models."""
    out = [Scenario("clean"), Scenario("clean-bf16", dtype="bfloat16")]
    for n in (1, 2, 4):
        for faults in itertools.combinations(FIX_IDS, n):
            sc = Scenario("backend:" + "+".join(faults), faults=faults, verdict="backend")
            out.append(sc if sc.fix_sets else dataclasses.replace(sc, verdict="clean"))
    out.append(Scenario("backend:async_scheduling+paused_weight_update", verdict="backend", async_only=True,
                        faults=("v0_runtime_defaults", "paused_weight_update")))
    for h in TRAINER_FAULTS:
        out.append(Scenario(f"trainer:{h}", trainer=h, verdict="trainer", causes=(h,)))
    out.append(Scenario("unexplained:rollout-noise", rollout_noise=0.05, verdict="unexplained"))
    out.append(Scenario("unexplained:trainer-noise", trainer="noise", verdict="unexplained"))
    out.append(Scenario("unexplained:engine-kept-old-weights", stale_engine=True, verdict="unexplained"))
    return out


# ------------------------------------------------------------------------ the model

def build_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny Llama (hidden 64, 2 layers, 2 heads of 32, 1 KV head, vocabulary 48) in HF
    format, with a peaked next-token distribution so temperature and top-p matter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.lm_head.weight.mul_(3.0)               # logits of std ~3: peaked, not one-hot
        model.lm_head.weight[EOS].add_(0.3)          # EOS reachable: sequences end at different lengths
    model.save_pretrained(out, safe_serialization=True)
    return out


# ------------------------------------------------------------------------ the loop

def _trainer_rows(model, prompts, outputs, kind: str, rng: np.random.Generator, stale_model=None):
    """What this scenario's trainer records per sequence."""
    from replay.trainer.scoring import trainer_logprobs

    def score(m, p, o, **kw):
        kw.setdefault("temperature", TEMPERATURE)
        return trainer_logprobs(m, p, o, return_entropy=False, **kw).logprobs

    if kind == "sampler":
        return score(model, prompts, outputs, top_p=TOP_P)
    if kind == "temperature":
        return score(model, prompts, outputs, temperature=1.0)
    if kind == "truncation":   # a trainer that truncates wider than the sampler: a lagged token it
        # cuts gets a large finite logprob instead of -inf, as trainers that mask do
        return [np.maximum(lp, -1e4) for lp in score(model, prompts, outputs, top_p=0.95)]
    if kind == "position_shift":   # the mask starts one position late: value t scores token t + 1
        return [lp[1:] for lp in score(model, prompts, [list(o) + [PAD] for o in outputs])]
    if kind == "stale_version":    # the trainer scored with the weights of the version before
        return score(stale_model, prompts, outputs)
    if kind == "loss_mask":        # the prompt's tokens are scored too, as if generated
        return score(model, [p[:1] for p in prompts], [list(p[1:]) + list(o) for p, o in zip(prompts, outputs)])
    if kind == "lm_head_dtype":
        return score(model, prompts, outputs, lm_head_dtype="bfloat16")
    lps = score(model, prompts, outputs)
    if kind == "noise":
        return [np.minimum(lp + rng.normal(0, 0.05, len(lp)), 0.0).astype(np.float32) for lp in lps]
    return lps


def record(sc: Scenario, model_dir: str | Path, out_dir: str | Path, *, steps: int = 5, seed: int = 0) -> Path:
    """Run the loop under scenario ``sc`` and record it into ``out_dir/<name>``."""
    import copy

    import torch

    from replay import Recorder
    from replay.engines.base import GenRequest, WeightUpdate
    from replay.engines.reference.engine import ReferenceEngine
    from replay.models import load_model
    from replay.trainer.scoring import sequence_logprobs_tensor

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    problems = [[[int(t) for t in rng.integers(3, VOCAB, 3)] for _ in range(N_PROBLEMS)] for _ in range(steps)]
    targets = [set(int(t) for t in rng.choice(np.arange(3, VOCAB), 12, replace=False)) for _ in range(steps)]
    update_at = [int(rng.integers(1, 4)) for _ in range(steps)]   # mid-sequence: requests in flight
    cfg = sc.config
    path = Path(out_dir) / sc.name.replace(":", "-").replace("+", "-")
    if path.exists():
        import shutil
        shutil.rmtree(path)
    policy = load_model(model_dir, dtype="float32").train()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    engine = ReferenceEngine(model_dir, cfg, block_size=BLOCK, seed=seed)
    run_config = {"model": str(model_dir), "engine": {"name": "reference", "config": cfg.to_dict()},
                  "trainer": {"dtype": "float32", "temperature": TEMPERATURE}, "scenario": sc.name}

    def state():
        return {k: v.detach().clone() for k, v in policy.state_dict().items()}

    with Recorder(path, run_config=run_config, strict=True) as rec:
        sd = state()
        engine.load_weights(0, sd)
        rec.weights(version=0, step=0, state_dict=sd)
        stale = copy.deepcopy(policy).eval()

        def generate(step: int, serving: int, update: WeightUpdate | None) -> list[dict]:
            reqs = [GenRequest(f"q{step}.{i}.{g}", PREFIX + problems[step][i], max_tokens=MAX_TOKENS,
                               temperature=TEMPERATURE, top_p=TOP_P, seed=seed * 7919 + step * 101 + i * GROUP + g)
                    for i in range(N_PROBLEMS) for g in range(GROUP)]
            rec.event("step_start", step=step, weight_version=serving)
            for r in reqs:
                rec.event("request_submitted", step=step, weight_version=serving, request_id=r.request_id)
            if update is not None:
                rec.event("weights_update_start", step=step, weight_version=update.version,
                          mode=cfg.weight_update, after_step=update.after_step)
            results = engine.generate(reqs, [update] if update and not sc.stale_engine else [])
            if update is not None and sc.stale_engine:   # stamped as if the update had landed
                for res in results:
                    res.token_versions = [serving if j < update.after_step else update.version
                                          for j in range(len(res.output_ids))]
            rec.event("step_end", step=step, weight_version=update.version if update else serving)
            batch = []
            for r, res in zip(reqs, results):
                i = int(r.request_id.split(".")[1])
                lps = np.asarray(res.logprobs, np.float64)
                if sc.rollout_noise:
                    lps = np.minimum(lps + rng.normal(0, sc.rollout_noise, len(lps)), 0.0)
                reward = float(np.mean([t in targets[step] for t in res.output_ids]))
                rec.rollout(step=step, request_id=r.request_id, group_id=f"q{step}.{i}", prompt_ids=r.prompt_ids,
                            output_ids=res.output_ids, logprobs=lps.astype(np.float32),
                            token_versions=res.token_versions, reward=reward, finish_reason=res.finish_reason,
                            temperature=TEMPERATURE, top_p=TOP_P, top_k=-1, seed=r.seed,
                            logprobs_mode=cfg.logprobs_mode, engine="reference", engine_config=cfg.id,
                            num_cached_tokens=res.num_cached_tokens)
                batch.append((r, res, reward, f"q{step}.{i}"))
            return batch

        batch = generate(0, 0, None)
        for k in range(steps):
            prompts = [list(r.prompt_ids) for r, *_ in batch]
            outputs = [list(res.output_ids) for _, res, *_ in batch]
            rewards = np.array([b[2] for b in batch])
            groups = [b[3] for b in batch]
            adv = np.zeros(len(batch))
            for g in set(groups):
                idx = [j for j, x in enumerate(groups) if x == g]
                adv[idx] = rewards[idx] - rewards[idx].mean()
            with torch.no_grad():
                rows = _trainer_rows(policy, prompts, outputs, sc.trainer, rng, stale_model=stale)
            for (r, *_), lp, a in zip(batch, rows, adv):
                rec.trainer(step=k, request_id=r.request_id, weight_version=k, logprobs=np.asarray(lp, np.float32),
                            advantage=float(a))
            stale.load_state_dict(policy.state_dict())
            res = sequence_logprobs_tensor(policy, prompts, outputs, temperature=TEMPERATURE)
            old = torch.zeros_like(res.logprobs)
            for j, (_, out, *_) in enumerate(batch):
                old[j, :len(out.logprobs)] = torch.tensor(out.logprobs)
            ratio = torch.exp(res.logprobs - old) * res.mask
            loss = -(ratio * torch.tensor(adv, dtype=torch.float32)[:, None]).sum() / res.mask.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sd = state()
            rec.weights(version=k + 1, step=k, state_dict=sd, delta=True)
            rec.metrics(step=k, values={"loss": float(loss.detach()), "reward": float(rewards.mean())}, source="trainer")
            if k + 1 < steps:
                engine.load_weights(k + 1, sd, activate=False)
                batch = generate(k + 1, k, WeightUpdate(version=k + 1, after_step=update_at[k + 1]))
    engine.close()
    (path / "scenario.json").write_text(json.dumps(dataclasses.asdict(sc)))
    return path
