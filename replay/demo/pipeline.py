"""One demo run: an asynchronous, PipelineRL-like RL loop, recorded end to end.

The pipeline keeps the engine one batch ahead of the trainer::

    engine:   gen batch 0 (v0) | gen batch 1 (v0 → v1 mid-way) | gen batch 2 (v1 → v2 mid-way) | ...
    trainer:                   | train on batch 0 → v1          | train on batch 1 → v2          | ...

Version ``k + 1`` (the trainer's weights after batch ``k``) reaches the engine in
flight, after decode step ``u_k`` of batch ``k + 1``, through the update path of the
engine's config (concurrent or paused). The positions ``u_k``, the problems and the
sampling seeds are drawn from the run's seed before anything else, so two runs with
the same seed differ only by engine config. The computation is laid out in the order
that makes this schedule exact: the trainer's step on batch ``k`` is computed before
the engine reaches ``u_k`` in batch ``k + 1``, which is what a pipeline whose update
lands at ``u_k`` sees.

Old logprobs in the objective are the engine's rollout logprobs (PipelineRL), so the
engine's semantics flow into training.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from replay.fixes import EngineConfig
from replay.metrics import token_metrics
from replay.demo.rl import TrainConfig, grpo_advantages, policy_loss, token_logprobs, unpad
from replay.demo.task import sample_problems


@dataclass
class RunSpec:
    """Everything that defines one demo run."""

    name: str                     # folder name under the demo's output folder, e.g. "v1+fp32_lm_head"
    config: EngineConfig          # engine semantics
    model_dir: str                # the warm-started checkpoint every run starts from
    out_dir: str                  # the demo's output folder
    seed: int = 0                 # problems, update positions and sampling seeds
    steps: int = 32               # trainer steps
    engine: str = "reference"     # reference | vllm
    device: str = "cpu"           # cpu | cuda
    n_prompts: int = 8            # distinct problems per step
    group_size: int = 8           # GRPO group: completions per problem
    max_tokens: int = 6           # completion length limit (the answer is 5 tokens)
    temperature: float = 0.7      # sampling temperature (< 1, so logprob semantics matter)
    top_p: float = 0.9            # nucleus sampling (< 1)
    topk_sample: int = 5          # top-k logprobs recorded for the first group of each step
    train: TrainConfig = field(default_factory=TrainConfig)


def _state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(spec: RunSpec, progress: Callable[[int, int], None] | None = None) -> dict:
    """Train and record one run into ``<out_dir>/<name>``; returns per-step metrics."""
    import torch

    from replay.engines.base import GenRequest, WeightUpdate
    from replay.engines.factory import engine_name, make_engine
    from replay.models import EOS_ID, load_model
    from replay.record.recorder import Recorder

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    schedule = [(sample_problems(rng, spec.n_prompts), int(rng.integers(1, spec.max_tokens - 1)))
                for _ in range(spec.steps)]

    policy = load_model(spec.model_dir, dtype="float32", device=spec.device)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    engine = make_engine(spec.engine, spec.model_dir, spec.config, device=spec.device, seed=spec.seed)
    ename = engine_name(spec.engine)
    cfg = spec.config
    mode = cfg.weight_update
    path = Path(spec.out_dir) / spec.name
    run_config = {
        "demo": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("config", "train")},
        "engine": {"name": ename, "config": cfg.to_dict(), "config_id": cfg.id,
                   **({"settings": _settings(engine)} if spec.engine == "vllm" else {})},
        "trainer": dataclasses.asdict(spec.train),
        "model": spec.model_dir,
    }
    history: list[dict] = []
    with Recorder(path, run_config=run_config, rank=0) as rec:
        rec.event("run_start", step=0, weight_version=0, engine=ename, config_id=cfg.id)
        sd = _state_dict(policy)
        engine.load_weights(0, sd)
        rec.model(spec.model_dir, version=0, step=0, state_dict=sd)   # a copy of the recording replays anywhere

        def generate(step: int, serving: int, update: WeightUpdate | None) -> list[dict]:
            problems, _ = schedule[step]
            reqs: list[GenRequest] = []
            meta = []
            for pi, prob in enumerate(problems):
                for g in range(spec.group_size):
                    rid = f"s{step}-p{pi}-g{g}"
                    reqs.append(GenRequest(
                        request_id=rid, prompt_ids=prob.prompt_ids, max_tokens=spec.max_tokens,
                        temperature=spec.temperature, top_p=spec.top_p, top_k=-1,
                        seed=spec.seed * 1_000_003 + step * 1009 + len(reqs),
                        num_topk=spec.topk_sample if pi == 0 else 0, stop_token_ids=[EOS_ID]))
                    meta.append((prob, f"s{step}-p{pi}"))
            rec.event("step_start", step=step, weight_version=serving)
            for r in reqs:
                rec.event("request_submitted", step=step, weight_version=serving, request_id=r.request_id,
                          seed=r.seed, prompt_len=len(r.prompt_ids))
            results = engine.generate(reqs, [update] if update else [])
            # Events in the order they happened: requests that ended before the update's
            # decode step finish first, then the update, then the rest.
            at = update.after_step if update else None
            done_before = [res for res in results if at is not None and len(res.output_ids) <= at]
            done_after = [res for res in results if res not in done_before]
            for res in done_before:
                rec.event("request_finished", step=step, weight_version=serving, request_id=res.request_id,
                          finish_reason=res.finish_reason, n_tokens=len(res.output_ids))
            if update is not None:
                rec.event("weights_update_start", step=step, weight_version=update.version, mode=mode,
                          after_step=at, from_version=serving)
                rec.event("weights_update_end", step=step, weight_version=update.version, mode=mode,
                          after_step=at)
            for res in done_after:
                rec.event("request_finished", step=step,
                          weight_version=res.token_versions[-1] if res.token_versions else serving,
                          request_id=res.request_id, finish_reason=res.finish_reason,
                          n_tokens=len(res.output_ids))
            batch: list[dict] = []
            for res, (prob, gid) in zip(results, meta):
                reward = prob.reward(res.output_ids)
                rec.rollout(step=step, request_id=res.request_id, group_id=gid, prompt_ids=prob.prompt_ids,
                            output_ids=res.output_ids, logprobs=res.logprobs,
                            token_versions=res.token_versions, reward=reward,
                            finish_reason=res.finish_reason, temperature=spec.temperature,
                            top_p=spec.top_p, top_k=-1, seed=reqs[len(batch)].seed,
                            logprobs_mode=cfg.logprobs_mode, engine=ename, engine_config=cfg.id,
                            num_cached_tokens=res.num_cached_tokens)
                if res.topk_ids:
                    rec.topk(step=step, request_id=res.request_id, source="engine",
                             ids=res.topk_ids, logprobs=res.topk_logprobs)
                batch.append({"id": res.request_id, "group": gid, "prompt": prob.prompt_ids,
                              "output": list(res.output_ids), "lp": np.asarray(res.logprobs, np.float32),
                              "versions": list(res.token_versions), "reward": reward,
                              "topk": bool(res.topk_ids)})
            rec.event("step_end", step=step, weight_version=update.version if update else serving)
            return batch

        batch = generate(0, 0, None)
        for step in range(spec.steps):
            version = step  # the trainer's weights when it trains on batch `step`
            batch = [b for b in batch if b["output"]]
            prompts = [b["prompt"] for b in batch]
            outputs = [b["output"] for b in batch]
            rewards = np.array([b["reward"] for b in batch], np.float32)
            adv = grpo_advantages(rewards, [b["group"] for b in batch])
            lp_new, ent, mask = token_logprobs(policy, prompts, outputs, spec.train.temperature)
            lp_old = torch.zeros_like(lp_new)
            for i, b in enumerate(batch):
                lp_old[i][mask[i]] = torch.from_numpy(b["lp"])
            loss = policy_loss(lp_new, lp_old, mask.float(), adv, spec.train)
            opt.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), spec.train.grad_clip))
            opt.step()

            lps, ents = unpad(lp_new, mask), unpad(ent, mask)
            rec.event("trainer_batch", step=step, weight_version=version, n_sequences=len(batch))
            for b, lp_t, e_t, a in zip(batch, lps, ents, adv):
                rec.trainer(step=step, request_id=b["id"], weight_version=version, logprobs=lp_t,
                            entropy=e_t, advantage=float(a))
            lp_tr = np.concatenate(lps) if lps else np.zeros(0, np.float32)
            lp_ro = np.concatenate([b["lp"] for b in batch]) if batch else np.zeros(0, np.float32)
            tm = token_metrics(lp_tr, lp_ro)
            tok_versions = np.concatenate([b["versions"] for b in batch]) if batch else np.zeros(0)
            values = {
                "clamp_log_ratio_new_old_indicator": tm["clip_rate"],
                "kl_new_old": tm["kl_new_old"],
                "mean_abs_log_ratio_new_old": tm["mean_abs_log_ratio"],
                "ess": tm["ess"],
                "entropy": float(np.concatenate(ents).mean()) if ents else float("nan"),
                "reward": float(rewards.mean()) if len(rewards) else float("nan"),
                "lag": float(np.mean(version - tok_versions)) if len(tok_versions) else float("nan"),
                "loss": float(loss.detach()),
                "grad_norm": grad_norm,
            }
            rec.metrics(step=step, values=values, source="trainer")
            history.append({"step": step, **values})

            sd = _state_dict(policy)
            rec.weights(version=step + 1, step=step, state_dict=sd, delta=True)
            if step + 1 < spec.steps:
                engine.load_weights(step + 1, sd, activate=False)
                batch = generate(step + 1, step, WeightUpdate(version=step + 1, after_step=schedule[step + 1][1]))
            if progress is not None:
                progress(step + 1, spec.steps)
        rec.event("run_end", step=spec.steps - 1, weight_version=spec.steps)
    engine.close()
    return {"name": spec.name, "config_id": cfg.id, "path": str(path), "history": history}


def save_summary(path: Path, result: dict) -> None:
    (Path(path) / "demo_summary.json").write_text(json.dumps(result, indent=1))


def _settings(engine) -> dict:
    """What a vLLM replay of this run needs to take as it was (the engine's effective values)."""
    from replay.engines.factory import VLLM_REPLAY_SETTINGS

    eff = engine.effective or {}
    return {k: eff[k] for k in VLLM_REPLAY_SETTINGS if eff.get(k) is not None}
