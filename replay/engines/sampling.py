"""Logit processing, logprob modes and seeded sampling of the reference engine.

Follows vLLM V1's sampler on one request's float32 logits row:

* temperature: ``logits / T``; a temperature below :data:`GREEDY_EPS` is greedy (argmax,
  and no processing: vLLM skips temperature, top-k and top-p for greedy requests);
* top-k then top-p, as vLLM's ``apply_top_k_top_p``: sort ascending, mask values below
  the k-th largest (ties kept), then mask the low tail whose cumulative probability
  is ``<= 1 - p`` (the most likely token always survives); masked logits are ``-inf``;
* sampling by the exponential race vLLM uses: ``argmax(probs / q)`` with
  ``q ~ Exp(1)`` drawn from the request's own ``torch.Generator``;
* ``raw_logprobs``: ``log_softmax`` of the raw logits; ``processed_logprobs``:
  ``log_softmax`` of the processed logits (masked tokens get ``-inf``).
"""
from __future__ import annotations

import hashlib

import torch

GREEDY_EPS = 1e-5


def apply_top_k_top_p(x: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p`` over the last dim of float32 logits ``[..., V]``: masked = -inf."""
    vocab = x.shape[-1]
    use_k = 0 < top_k < vocab
    use_p = top_p < 1.0
    if not (use_k or use_p):
        return x
    sorted_x, order = torch.sort(x, dim=-1, descending=False)
    if use_k:
        kth = sorted_x[..., vocab - top_k:vocab - top_k + 1]
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    if use_p:
        cum = torch.cumsum(torch.softmax(sorted_x, -1), -1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float32 raw logits ``[..., V]`` → logits after temperature, top-k and top-p (masked = -inf)."""
    if temperature < GREEDY_EPS:
        return logits
    return apply_top_k_top_p(logits / temperature, top_k, top_p)


def logprobs_of(raw: torch.Tensor, processed: torch.Tensor, mode: str) -> torch.Tensor:
    """Logprobs of every token under the config's ``logprobs_mode``."""
    return torch.log_softmax(processed if mode == "processed_logprobs" else raw, -1)


def sample(processed: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """One token id from processed logits (greedy below GREEDY_EPS), using ``gen`` only."""
    if temperature < GREEDY_EPS:
        return int(torch.argmax(processed))
    probs = torch.softmax(processed, -1)
    q = torch.empty_like(probs).exponential_(generator=gen)
    return int(torch.argmax(probs / q))


def request_generator(seed: int | None, engine_seed: int, request_id: str) -> torch.Generator:
    """The request's own generator: from its seed, else from (engine seed, request id), so
    a request samples the same tokens whatever else is in the batch."""
    if seed is None:
        digest = hashlib.sha256(f"{engine_seed}:{request_id}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(int(seed))


def top_logprobs(lp: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` largest logprobs (ties broken by lower id) with their token ids."""
    if k <= 0:
        return [], []
    k = min(k, lp.shape[-1])
    vals, ids = torch.topk(lp, k, sorted=True)
    return [int(i) for i in ids], [float(v) for v in vals]
