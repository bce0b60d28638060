"""Logprob arithmetic and result assembly for the vLLM engine (no vLLM import).

vLLM returns logprobs as ``{token_id: Logprob(logprob, rank)}`` dicts. This module
turns them into the engine's wire lists, and turns *raw* prompt logprobs into
*processed* ones (temperature, then top-k, then top-p, as vLLM's sampler does),
which is how :meth:`replay.engines.vllm.engine.VLLMEngine.score` honours
``logprobs_mode="processed_logprobs"``: in vLLM 0.32 prompt logprobs are always
computed from the raw logits, whatever ``logprobs_mode`` says.

Why the transform is exact: a raw logprob is ``l_i - logsumexp(l)``; dividing by
``T`` and normalising again gives ``log_softmax(l / T)_i`` because the constant
``logsumexp(l) / T`` cancels. The inputs must hold the *whole* vocabulary
(``prompt_logprobs=-1``), so the normaliser is exact; vLLM computes them in float32.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from replay.errors import BadInput, EngineError
from replay.engines.base import GenRequest, GenResult


def process_logprobs(raw: np.ndarray, temperature: float = 1.0, top_k: int = -1,
                     top_p: float = 1.0) -> np.ndarray:
    """Processed logprobs from full-vocabulary raw logprobs ``raw`` (shape ``[..., V]``), in float64.

    Same order as vLLM's sampler: divide by ``temperature``, mask all but the ``top_k``
    largest (``top_k <= 0`` = off), mask the tail outside the ``top_p`` nucleus
    (``1.0`` = off), renormalise; the truncation is :func:`replay.engines.sampling.apply_top_k_top_p`.
    Masked tokens get ``-inf``. ``temperature <= 0`` (greedy) is treated as 1: vLLM's processed
    logprobs of a greedy request are raw.
    """
    import torch

    from replay.engines.sampling import apply_top_k_top_p

    x = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    if temperature > 0:
        x = x / float(temperature)
    return torch.log_softmax(apply_top_k_top_p(x, top_k, top_p), -1).numpy()


def sampler_logprobs(row: Any, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The processed logprobs vLLM's sampler computes from one float32 logits ``row``, with
    vLLM's own operations in float32 (``logits.div_(temperature)``, ``apply_top_k_top_p``,
    ``log_softmax(dtype=float32)``, vllm/v1/sample/sampler.py and ops/topk_topp_sampler.py),
    so a forced token's logprob has the bits sampling it would have reported. Greedy
    (``temperature`` ~ 0) is left undivided, as vLLM does. Outside a vLLM install it is
    :func:`process_logprobs` (equal up to float32 rounding)."""
    import torch

    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    except ImportError:
        return process_logprobs(torch.as_tensor(row).numpy(), temperature, top_k, top_p)
    x = torch.as_tensor(row, dtype=torch.float32).clone().unsqueeze(0)
    if temperature >= 1e-5:   # vLLM's _SAMPLING_EPS
        x.div_(torch.tensor([temperature], dtype=torch.float32).unsqueeze(1))
    vocab = x.shape[-1]
    k = torch.tensor([top_k]) if 0 < top_k < vocab else None
    p = torch.tensor([top_p], dtype=torch.float32) if top_p < 1.0 else None
    x = apply_top_k_top_p(x, k, p)
    return x.log_softmax(dim=-1, dtype=torch.float32)[0].numpy()


def full_vocab_row(entry: Mapping[int, Any], vocab_size: int) -> np.ndarray:
    """One position's ``{token_id: Logprob}`` dict holding every token, as a dense row."""
    row = np.full(vocab_size, -np.inf, dtype=np.float64)
    for tok, lp in entry.items():
        if tok < vocab_size:
            row[tok] = lp.logprob
    return row


def sampled_and_topk(entry: Mapping[int, Any], token_id: int,
                     k: int) -> tuple[float, list[int], list[float]]:
    """Logprob of the sampled ``token_id`` and the ``k`` best (rank 1..k) from one dict.

    vLLM puts the sampled token in the dict (with its true rank) next to the top ``k``;
    when the sampled token is outside the top ``k`` the dict has ``k + 1`` entries.
    """
    lp = entry[token_id].logprob
    best = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else math.inf))
    best = [(t, v) for t, v in best if v.rank is not None and v.rank <= k][:k]
    return float(lp), [int(t) for t, _ in best], [float(v.logprob) for _, v in best]


def topk_of_row(row: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` best token ids and logprobs of a dense row, best first (ties: lower id)."""
    if k <= 0:
        return [], []
    order = np.lexsort((np.arange(row.shape[-1]), -row))[:k]
    return [int(i) for i in order], [float(row[i]) for i in order]


def completion_rows(prompt_logprobs: Sequence[Mapping[int, Any] | None], prompt_len: int,
                    n_out: int) -> list[Mapping[int, Any]]:
    """The prompt-logprob dicts that score the ``n_out`` completion tokens of a
    ``prompt + completion`` sequence (entry ``i`` scores token ``i`` given ``< i``)."""
    rows = list(prompt_logprobs[prompt_len:prompt_len + n_out])
    if len(rows) != n_out or any(r is None for r in rows):
        raise ValueError(f"expected {n_out} prompt-logprob entries after position {prompt_len}, "
                         f"got {len(rows)}")
    return rows  # type: ignore[return-value]


# ---------------------------------------------------------------- result assembly


class GenState:
    """What one request has produced so far."""

    def __init__(self, req: GenRequest):
        self.req = req
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.versions: list[int] = []
        self.tk_ids: list[list[int]] = []
        self.tk_lps: list[list[float]] = []
        self.finish_reason = "length"
        self.num_cached = 0

    def add(self, out: Any, version: int | None) -> None:
        comp = out.outputs[0]
        new_ids = list(comp.token_ids)
        new_lps = list(comp.logprobs or [])
        if len(new_lps) != len(new_ids):
            raise EngineError(f"vLLM returned {len(new_ids)} tokens but {len(new_lps)} logprob entries",
                              request_id=self.req.request_id)
        for tok, entry in zip(new_ids, new_lps):
            lp, ids, vals = sampled_and_topk(entry, tok, self.req.num_topk)
            self.ids.append(int(tok))
            self.lps.append(lp)
            self.versions.append(-1 if version is None else int(version))
            self.tk_ids.append(ids)
            self.tk_lps.append(vals)
        if out.num_cached_tokens is not None:
            self.num_cached = int(out.num_cached_tokens)
        if out.finished:
            self.finish_reason = str(comp.finish_reason or "length")

    def reprocess(self, rows: dict[int, Any], vocab_size: int) -> None:
        """Processed logprobs (and top-k) of forced tokens from the kept unforced logits rows."""
        for i, tok in enumerate(self.ids):
            if i not in rows:
                raise EngineError(f"no logits kept for forced position {i}", request_id=self.req.request_id)
            dense = sampler_logprobs(rows[i][:vocab_size], self.req.temperature, self.req.top_k, self.req.top_p)
            self.lps[i] = float(dense[tok])
            self.tk_ids[i], self.tk_lps[i] = topk_of_row(dense, self.req.num_topk)

    def result(self) -> GenResult:
        k = self.req.num_topk > 0
        return GenResult(self.req.request_id, self.ids, self.lps, self.versions, self.finish_reason,
                         self.num_cached, self.tk_ids if k else None, self.tk_lps if k else None)


def unique_ids(requests: Sequence[Any]) -> None:
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise BadInput(f"request_id {r.request_id!r} appears twice in one call", field="request_id",
                           request_id=r.request_id)
        seen.add(r.request_id)
