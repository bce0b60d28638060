"""A PipelineRL-style actor/trainer pair with the recorder attached.

The actor samples groups of completions with vLLM; the trainer scores them with a
transformers model (the same checkpoint, fp32), takes a GRPO step on the importance
ratio ``exp(lp_trainer - lp_rollout)`` and pushes the new weights to the actor
between steps. The lines that record are marked ``# replay``: ``attach`` wraps the
``LLM`` (engine config, checkpoint, rollouts with versions and submission order, weight
updates), and a ``TrainerHook`` takes the trainer's logprob pass.

Every prompt starts with the same 32-token instruction, as RL prompts share a system
prompt: with ``--block-size 32`` vLLM's prefix cache serves that block to the later
steps' requests from KV computed under older weights (the update does not reset the
cache), and the recording holds each request's cached-token count.

Runs on the CPU with a tiny model built locally (``--arch qwen2`` or ``llama``)::

    python examples/pipelinerl_style.py --out recordings/pipelinerl-style --steps 3 --arch llama --block-size 32
    replay sql recordings/pipelinerl-style "SELECT step, avg(abs(log_ratio)) FROM tokens GROUP BY step"
    replay check recordings/pipelinerl-style      # rerun, bisect and diagnose: all there
    replay rerun recordings/pipelinerl-style --engine vllm --step all
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process

import torch

from replay.integrations.torch import TrainerHook  # replay
from replay.integrations.vllm import attach  # replay

DIGITS = range(4, 14)  # token ids of "0".."9" in replay.models' vocabulary
# The same 32 token ids before every problem, as a system prompt: "<bos> answer : 0 1 ... 9 . sort
# copy ... yes : answer :" in replay.models' vocabulary.
INSTRUCTION = [1, 42, 14, *range(4, 14), 25, *range(26, 41), 14, 42, 14]


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

    from replay.models import build_model, load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="recordings/pipelinerl-style", help="recording folder to create")
    ap.add_argument("--model", default="recordings/models/tiny", help="checkpoint folder (built if missing)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    ap.add_argument("--arch", choices=("qwen2", "llama"), default="qwen2", help="architecture of the built model")
    ap.add_argument("--block-size", type=int, default=None,
                    help="vLLM's KV block size (a multiple of 32 on the CPU build; default: vLLM's)")
    args = ap.parse_args(argv)

    path = build_model(args.model, size="tiny", seed=0, arch=args.arch)
    engine_args = {} if args.block_size is None else {"block_size": args.block_size}
    llm = LLM(model=str(path), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.1, seed=0,
              kv_cache_memory_bytes=256 * 2**20, logprobs_mode="processed_logprobs", max_model_len=128,
              enable_prefix_caching=True, **engine_args)
    model = load_model(path, dtype="float32").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sp = SamplingParams(n=4, temperature=args.temperature, max_tokens=8, logprobs=2, seed=1)
    prompts = [{"prompt_token_ids": INSTRUCTION + [35, 14, 5, 15, 6]},
               {"prompt_token_ids": INSTRUCTION + [26, 14, 9, 15, 4, 15, 7]}]

    run = attach(llm, args.out, weight_update="paused", run_config={"example": "pipelinerl_style"})  # replay
    hook = TrainerHook(run.rec, k=5, temperature=args.temperature, weight_version=0)  # replay
    for step in range(args.steps):
        with run.step(step):  # replay
            outputs = run.generate(prompts, sp, step=step, rewards=reward)  # actor (recorded)
        rewards = [[reward(list(c.token_ids)) for c in o.outputs] for o in outputs]
        ids, input_ids, mask, old_lp, adv = make_batch(outputs, rewards)  # trainer
        logits, labels, m, loss = train_step(model, opt, input_ids, mask, old_lp, adv, args.temperature)
        hook.record_batch(step=step, request_ids=ids, logits=logits, token_ids=labels, mask=m,  # replay
                          advantages=adv)  # replay
        # blocking weight update: generation is idle between steps
        run.update_weights(step + 1, {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()},
                           step=step)  # loads into vLLM, stores the weights, records the update
        hook.weight_version = run.version  # replay
        mean_reward = sum(map(sum, rewards)) / sum(map(len, rewards))
        run.rec.metrics(step=step, values={"loss": loss, "reward": mean_reward}, source="trainer")  # replay
        print(f"step {step}: loss {loss:+.4f} reward {mean_reward:.3f}")
    hook.close()  # replay
    run.close()  # replay
    print(f"recorded {args.steps} steps into {args.out}")


if __name__ == "__main__":
    main()
