"""The trainer side of the demo: logprobs with a graph, GRPO advantages, clipped objectives.

As in PipelineRL, the *old* logprobs of the importance ratio are the engine's
rollout logprobs, so whatever the engine means by a logprob flows straight into the
objective: ``r = lp_trainer - lp_rollout``, ``ρ = exp(r)``.

- GSPO (the default, as in the source): one ratio per sequence,
  ``s = exp(mean_t r)``, clipped to ``[1 - eps_low, 1 + eps_high]``.
- PPO: one ratio per token, clipped to ``[1 - eps_low, 1 + eps_high]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrainConfig:
    """Hyper-parameters of the demo's trainer."""

    objective: str = "gspo"      # "gspo" (sequence ratio) or "ppo" (token ratio)
    eps_low: float = 0.05        # lower clip: ratio below 1 - eps_low is clipped
    eps_high: float = 0.05       # upper clip: ratio above 1 + eps_high is clipped
    lr: float = 2e-4             # AdamW learning rate
    weight_decay: float = 0.0    # AdamW weight decay
    grad_clip: float = 1.0       # max grad norm
    temperature: float = 0.7     # the trainer scores logits / temperature, as the sampler used


def padded_batch(prompts: list[list[int]], outputs: list[list[int]], pad_id: int = 0):
    """Right-padded ``[B, T]`` ids of prompt+output, and a mask of the output positions."""
    import torch

    lens = [len(p) + len(o) for p, o in zip(prompts, outputs)]
    T = max(lens)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    out_mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        seq = list(p) + list(o)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        out_mask[i, len(p): len(seq)] = True
    return ids, attn, out_mask


def token_logprobs(model, prompts, outputs, temperature: float):
    """Logprob and entropy of every output token (logits / temperature, fp32), with the graph.

    Returns ``(lp [B, T-1], entropy [B, T-1], mask [B, T-1])`` aligned so that position
    ``t`` scores token ``t + 1``.
    """
    import torch

    ids, attn, out_mask = padded_batch(prompts, outputs)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    target = ids[:, 1:]
    lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy, out_mask[:, 1:]


def unpad(values, mask) -> list[np.ndarray]:
    """Per-sequence 1-D arrays of ``values`` where ``mask`` is set."""
    v = values.detach().float().cpu().numpy()
    m = mask.cpu().numpy()
    return [v[i][m[i]].astype(np.float32) for i in range(v.shape[0])]


def grpo_advantages(rewards: np.ndarray, group_ids: list[str]) -> np.ndarray:
    """Reward minus the mean of its group, divided by the group's std (+1e-4)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        r = rewards[idx]
        adv[idx] = (r - r.mean()) / (r.std() + 1e-4)
    return adv.astype(np.float32)


def policy_loss(lp_new, lp_old, mask, advantages, cfg: TrainConfig):
    """Clipped policy-gradient loss (to minimise) for GSPO or PPO."""
    import torch

    adv = torch.as_tensor(advantages, dtype=torch.float32)
    r = (lp_new - lp_old) * mask
    if cfg.objective == "gspo":
        n = mask.sum(-1).clamp(min=1)
        s = torch.exp(r.sum(-1) / n)
        clipped = s.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        return -torch.minimum(s * adv, clipped * adv).mean()
    if cfg.objective == "ppo":
        rho = torch.exp(r)
        clipped = rho.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        per_tok = -torch.minimum(rho * adv[:, None], clipped * adv[:, None])
        return (per_tok * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown objective {cfg.objective!r}")


def warm_start(model, prompts, targets, *, steps: int, lr: float, seed: int) -> float:
    """A few supervised steps so RL starts from a weak but not random policy. Returns final loss."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_val = float("nan")
    for _ in range(steps):
        lp, _, mask = token_logprobs(model, prompts, targets, temperature=1.0)
        loss = -(lp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
    return loss_val
