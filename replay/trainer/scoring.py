"""Trainer-side scoring: the logprobs and entropy an RL trainer computes for rollouts.

This mirrors PipelineRL's trainer: one HF forward over ``prompt + output``, the
logits of the positions that predict output tokens divided by the sampling
temperature, ``log_softmax``, gather of the output tokens; entropy of the same
(tempered) distribution. With ``lm_head_dtype="float32"`` the final projection
runs in float32 (hidden state and lm_head weight cast up), as PipelineRL does to
keep logits precise; ``"bfloat16"`` forces a bf16 projection; ``None`` uses the
model's own lm_head as loaded.

``top_k`` / ``top_p`` (off by default, as in PipelineRL's trainer) apply the sampler's
truncation to the tempered logits before ``log_softmax``, the way vLLM's
``processed_logprobs`` does. With ``top_p < 1`` the engine's processed logprobs are
renormalized over the nucleus and sit ``-log(nucleus mass)`` above the plain tempered
logprobs; pass the same ``top_p`` to compare like with like.

Two entry points:

* :func:`trainer_logprobs` — no grad, micro-batched, returns numpy arrays per sequence.
* :func:`sequence_logprobs_tensor` — keeps the autograd graph (for a training step),
  returns right-padded tensors and a mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from replay.errors import BadInput
from replay.fixes import HEAD_DTYPES


@dataclass
class TrainerScores:
    """Per-sequence results of :func:`trainer_logprobs` (float32 arrays, one value per output token)."""

    logprobs: list[np.ndarray]               # logprob of each output token under the tempered distribution
    entropy: list[np.ndarray] | None = None  # entropy (nats) of that distribution at each output position


@dataclass
class SequenceLogprobs:
    """Right-padded tensors of :func:`sequence_logprobs_tensor`; padded slots hold 0."""

    logprobs: Any          # torch.Tensor [batch, max_output_len], float32, differentiable
    mask: Any              # torch.Tensor [batch, max_output_len], bool, True on real output tokens
    entropy: Any = None    # torch.Tensor like logprobs, or None when not requested


def _check_inputs(prompt_ids_list: Sequence[Sequence[int]], output_ids_list: Sequence[Sequence[int]],
                  temperature: float, lm_head_dtype: str | None, top_p: float = 1.0) -> None:
    if len(prompt_ids_list) != len(output_ids_list):
        raise BadInput(f"{len(prompt_ids_list)} prompts but {len(output_ids_list)} outputs; "
                       "give one output per prompt", field="output_ids")
    for i, prompt in enumerate(prompt_ids_list):
        if len(prompt) == 0:
            raise BadInput(f"sequence {i} has an empty prompt; the first output token needs a context",
                           field="prompt_ids")
    if not 0 < top_p <= 1:
        raise BadInput(f"top_p must be in (0, 1], not {top_p!r}", field="top_p")
    if not temperature > 0:
        raise BadInput(f"temperature must be > 0, not {temperature!r}", field="temperature")
    if lm_head_dtype is not None and lm_head_dtype not in HEAD_DTYPES:
        raise BadInput(f"lm_head_dtype must be one of {', '.join(map(repr, HEAD_DTYPES))} or None (the model's "
                       f"own), not {lm_head_dtype!r}", field="lm_head_dtype")


def _base_and_head(model: Any) -> tuple[Any, Any]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise BadInput(f"{type(model).__name__} is not a causal LM with a base model and an lm_head",
                       field="model")
    return base, head


def _project(hidden: Any, head: Any, lm_head_dtype: str | None) -> Any:
    """Logits of ``hidden`` through ``head`` in the requested dtype, returned as float32."""
    import torch
    import torch.nn.functional as F

    if lm_head_dtype is None:
        return head(hidden).float()
    dt = torch.float32 if lm_head_dtype == "float32" else torch.bfloat16
    bias = head.bias.to(dt) if getattr(head, "bias", None) is not None else None
    return F.linear(hidden.to(dt), head.weight.to(dt), bias).float()


def sequence_logprobs_tensor(model: Any, prompt_ids_list: Sequence[Sequence[int]],
                             output_ids_list: Sequence[Sequence[int]], *, temperature: float = 1.0,
                             lm_head_dtype: str | None = "float32", return_entropy: bool = False,
                             top_k: int = -1, top_p: float = 1.0, pad_id: int = 0) -> SequenceLogprobs:
    """Differentiable logprobs of each output token given its prompt and the outputs before it.

    One right-padded batch (attention mask on padding; right padding leaves real
    positions untouched under causal attention). Runs under whatever grad mode the
    caller set, so a training step can backpropagate through ``.logprobs``.
    """
    import torch

    _check_inputs(prompt_ids_list, output_ids_list, temperature, lm_head_dtype, top_p)
    base, head = _base_and_head(model)
    device = head.weight.device
    n = len(prompt_ids_list)
    out_lens = [len(o) for o in output_ids_list]
    max_out = max(out_lens, default=0)
    if n == 0 or max_out == 0:
        empty = torch.zeros(n, max_out, dtype=torch.float32, device=device)
        return SequenceLogprobs(empty, empty.bool(), empty.clone() if return_entropy else None)
    seqs = [list(p) + list(o) for p, o in zip(prompt_ids_list, output_ids_list)]
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    hidden = base(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
    # Gather only the rows that predict output tokens: position len(prompt)+j-1 predicts output j.
    rows = torch.zeros((n, max_out), dtype=torch.long)
    targets = torch.zeros((n, max_out), dtype=torch.long)
    mask = torch.zeros((n, max_out), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids_list, output_ids_list)):
        k = len(o)
        rows[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
        targets[i, :k] = torch.tensor(list(o), dtype=torch.long)
        mask[i, :k] = True
    rows, targets, mask = rows.to(device), targets.to(device), mask.to(device)
    picked = torch.gather(hidden, 1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = _project(picked, head, lm_head_dtype) / temperature
    if top_k > 0 or top_p < 1.0:
        from replay.engines.sampling import apply_top_k_top_p

        logits = apply_top_k_top_p(logits, top_k, top_p)
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    ent = None
    if return_entropy:
        finite = logp_all.masked_fill(torch.isinf(logp_all), 0.0)  # truncated tokens add 0, without NaN grads
        ent = -(logp_all.exp() * finite).sum(-1)
        ent = torch.where(mask, ent, torch.zeros_like(ent))
    return SequenceLogprobs(lp, mask, ent)


def trainer_logprobs(model: Any, prompt_ids_list: Sequence[Sequence[int]],
                     output_ids_list: Sequence[Sequence[int]], *, temperature: float = 1.0,
                     lm_head_dtype: str | None = "float32", return_entropy: bool = True,
                     top_k: int = -1, top_p: float = 1.0, batch_size: int = 32,
                     pad_id: int = 0) -> TrainerScores:
    """Logprobs (and entropy) of every output token, as the trainer computes them, without grad.

    Sequences run in micro-batches of ``batch_size``; each result array has one
    float32 value per output token of its sequence.
    """
    import torch

    _check_inputs(prompt_ids_list, output_ids_list, temperature, lm_head_dtype, top_p)
    if batch_size < 1:
        raise BadInput(f"batch_size must be >= 1, not {batch_size}", field="batch_size")
    logprobs: list[np.ndarray] = []
    entropy: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids_list), batch_size):
            prompts = prompt_ids_list[start:start + batch_size]
            outputs = output_ids_list[start:start + batch_size]
            res = sequence_logprobs_tensor(model, prompts, outputs, temperature=temperature,
                                           lm_head_dtype=lm_head_dtype, return_entropy=return_entropy,
                                           top_k=top_k, top_p=top_p, pad_id=pad_id)
            lp = res.logprobs.float().cpu().numpy()
            ent = res.entropy.float().cpu().numpy() if return_entropy else None
            for i, o in enumerate(outputs):
                logprobs.append(lp[i, :len(o)].astype(np.float32, copy=True))
                if ent is not None:
                    entropy.append(ent[i, :len(o)].astype(np.float32, copy=True))
    return TrainerScores(logprobs, entropy if return_entropy else None)
