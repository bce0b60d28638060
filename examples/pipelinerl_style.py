"""A PipelineRL-style actor/trainer pair with the recorder attached.

The actor samples groups of completions with vLLM; the trainer scores them with a
transformers model (the same checkpoint, fp32), takes a GRPO step on the importance
ratio ``exp(lp_trainer - lp_rollout)`` and pushes the new weights to the actor
between steps. The lines that record are marked ``# replay``: the actor's
``RequestOutput`` go to ``record_outputs``, the trainer's logprob pass to a
``TrainerHook``, and each weight update is an event.

Runs on the CPU with a tiny model built locally::

    python examples/pipelinerl_style.py --out recordings/pipelinerl-style --steps 3
    replay sql recordings/pipelinerl-style "SELECT step, avg(abs(log_ratio)) FROM tokens GROUP BY step"
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process

import torch

from replay import Recorder  # replay
from replay.integrations.torch import TrainerHook  # replay
from replay.integrations.vllm import record_outputs  # replay

DIGITS = range(4, 14)  # token ids of "0".."9" in replay.models' vocabulary


def reward(output_ids: list[int]) -> float:
    """The task: answer with digits. Reward = share of output tokens that are digits."""
    return sum(t in DIGITS for t in output_ids) / max(1, len(output_ids))


def make_batch(outputs, rewards):
    """Padded [B, T] input ids, the output-token mask, rollout logprobs and group advantages."""
    rows, masks, old_lp, adv, ids = [], [], [], [], []
    for out, group in zip(outputs, rewards):
        mean = sum(group) / len(group)
        for comp, r in zip(out.outputs, group):
            p, o = list(out.prompt_token_ids), list(comp.token_ids)
            rows.append(p + o)
            masks.append([0] * len(p) + [1] * len(o))
            old_lp.append([0.0] * len(p) + [comp.logprobs[i][t].logprob for i, t in enumerate(o)])
            adv.append(r - mean)
            ids.append(f"{out.request_id}:{comp.index}")
    L = max(map(len, rows))
    pad = lambda xs, v: torch.tensor([x + [v] * (L - len(x)) for x in xs])  # noqa: E731
    return ids, pad(rows, 0), pad(masks, 0).bool(), pad(old_lp, 0.0), torch.tensor(adv)


def train_step(model, opt, input_ids, mask, old_lp, adv, temperature):
    """One GRPO step (PipelineRL's rl_step, reduced): returns the shifted logits it used and the loss."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    labels, m = input_ids[:, 1:], mask[:, 1:]
    new_lp = torch.log_softmax(logits.float() / temperature, -1).gather(2, labels[..., None])[..., 0]
    ratio = torch.exp(new_lp - old_lp[:, 1:])
    loss = -((ratio * adv[:, None]) * m).sum() / m.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return logits.detach(), labels, m, loss.item()


def main(argv=None) -> None:
    from vllm import LLM, SamplingParams

    from replay.engines._vllm_args import rpc_load_weights
    from replay.models import build_model, load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="recordings/pipelinerl-style", help="recording folder to create")
    ap.add_argument("--model", default="recordings/models/tiny", help="checkpoint folder (built if missing)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    args = ap.parse_args(argv)

    path = build_model(args.model, size="tiny", seed=0)
    llm = LLM(model=str(path), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.1, seed=0,
              kv_cache_memory_bytes=256 * 2**20, logprobs_mode="processed_logprobs", max_model_len=128)
    model = load_model(path, dtype="float32").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sp = SamplingParams(n=4, temperature=args.temperature, max_tokens=8, logprobs=2, seed=1)
    prompts = [{"prompt_token_ids": [1, 35, 14, 5, 15, 6]}, {"prompt_token_ids": [1, 26, 14, 9, 15, 4, 15, 7]}]

    rec = Recorder(args.out, run_config={"example": "pipelinerl_style", "model": str(path)})  # replay
    hook = TrainerHook(rec, k=5, temperature=args.temperature, weight_version=0)  # replay
    version = 0
    for step in range(args.steps):
        rec.event("step_start", step=step, weight_version=version)  # replay
        outputs = llm.generate(prompts, sp, use_tqdm=False)  # actor
        rewards = [[reward(list(c.token_ids)) for c in o.outputs] for o in outputs]
        record_outputs(rec, outputs, step=step, sampling_params=sp, llm=llm, weight_version=version,  # replay
                       rewards=rewards, weight_update="paused")  # replay
        ids, input_ids, mask, old_lp, adv = make_batch(outputs, rewards)  # trainer
        logits, labels, m, loss = train_step(model, opt, input_ids, mask, old_lp, adv, args.temperature)
        hook.record_batch(step=step, request_ids=ids, logits=logits, token_ids=labels, mask=m,  # replay
                          advantages=adv)  # replay
        version += 1  # blocking weight update: generation is idle between steps
        rec.event("weights_update_start", step=step, weight_version=version, mode="blocking")  # replay
        sd = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
        llm.collective_rpc(rpc_load_weights, args=(list(sd.items()),))
        hook.weight_version = version  # replay
        rec.event("weights_update_end", step=step, weight_version=version, mode="blocking")  # replay
        mean_reward = sum(map(sum, rewards)) / sum(map(len, rewards))
        rec.metrics(step=step, values={"loss": loss, "reward": mean_reward}, source="trainer")  # replay
        print(f"step {step}: loss {loss:+.4f} reward {mean_reward:.3f}")
    hook.close()  # replay
    rec.close()  # replay
    print(f"recorded {args.steps} steps into {args.out}")


if __name__ == "__main__":
    main()
