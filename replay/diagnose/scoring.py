"""Exact teacher-forced scoring of recorded tokens under stored weights (DESIGN §8.1).

:class:`ReferenceScorer` runs the checkpoint's transformers model (any architecture
transformers loads) over ``prompt + output`` and returns, per output token, its
logprob under one or more *distributions*: the sampler's own (temperature, then
top-k and top-p renormalised over what survives, as vLLM's sampler and
:func:`replay.engines._ref_sampling.apply_top_k_top_p` do), the tempered one without
truncation, or any other a hypothesis needs.

**Versions.** Each output token is scored with the weights of the version it was
stamped with. When a sequence's tokens carry several versions (a weight update landed
while it was being generated), each position is computed by the version that was
serving when the engine computed it: the prompt by the first token's version, output
token ``t`` (as the input of the next step) by token ``t + 1``'s, attending to the keys
and values the earlier positions got from their own versions. That is the
distribution a sampler draws from across a clean update that keeps the requests' KV
(``pause_generation(mode="keep")``, V0's blocking update); it follows from the stamped
versions alone. Nothing else of the engine's path is modelled: no prefix cache, no
async scheduling, no in-flight numerics.

Speed comes from what a plain forward does not do: sequences sharing a prompt (a GRPO
group) run it once and copy its KV cache to every member; the final projection and
the softmax run only at positions that predict an output token, in row chunks (a 150k
vocabulary never holds a whole batch's logits); sequences are bucketed by prompt
length, so no prompt is padded.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import BadInput


@dataclass(frozen=True)
class Dist:
    """A distribution over the vocabulary made from the logits: ``softmax(trunc(logits / T))``."""

    temperature: float = 1.0     # logits are divided by it (< 1e-5: greedy, scored as T = 1)
    top_k: int = -1              # keep the k largest (-1: off)
    top_p: float = 1.0           # keep the nucleus of this mass (1.0: off)

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def untruncated(self) -> "Dist":
        return Dist(self.temperature)


@dataclass
class Seq:
    """One sequence to score."""

    key: Any                     # the caller's key (e.g. (step, request_id))
    prompt_ids: list[int]
    output_ids: list[int]
    dists: Sequence[Dist]        # one logprob array per distribution comes back
    versions: Sequence[int]      # the version of each output token

    def segments(self) -> list[tuple[int, int, int]]:
        """``(version, start, end)`` runs over the input positions ``[0, P + n - 1)``."""
        p, n = len(self.prompt_ids), len(self.output_ids)
        pv = [int(self.versions[0])] * p + [int(self.versions[t + 1]) for t in range(n - 1)]
        runs, start = [], 0
        for i in range(1, len(pv) + 1):
            if i == len(pv) or pv[i] != pv[start]:
                runs.append((pv[start], start, i))
                start = i
        return runs


@dataclass
class ScoringStats:
    """What a scorer did: positions run through the body, and the time it took."""

    sequences: int = 0
    body_positions: int = 0      # prompt positions (once per distinct prompt) + output positions
    scored_tokens: int = 0
    seconds: float = 0.0
    weight_loads: dict[str, int] = field(default_factory=dict)  # dtype -> versions loaded


class ReferenceScorer:
    """Teacher-forced logprobs of recorded tokens under the stored weights of their versions.

    ``weights(version)`` returns a HF-named state dict. The model runs in ``dtype``
    (float32 for the reference; float64 or a body dtype to measure the floor); the final
    projection runs in float32 unless ``head_dtype`` says otherwise.
    """

    def __init__(self, model_path: Any, weights: Callable[[int], dict], *, device: str = "cpu",
                 batch_tokens: int = 16384, head_rows: int = 2048):
        self.model_path = model_path
        self.weights = weights
        self.device = device
        self.batch_tokens = batch_tokens   # body positions per forward (bounds activation memory)
        self.head_rows = head_rows         # rows projected and soft-maxed at once (bounds logits memory)
        self.stats = ScoringStats()
        self._models: dict[str, Any] = {}
        self._loaded: dict[str, int | None] = {}

    # ------------------------------------------------------------------ models
    def _model(self, version: int, dtype: str) -> Any:
        import torch

        from ..models import load_model

        model = self._models.get(dtype)
        if model is None:
            model = load_model(self.model_path, dtype="float32" if dtype == "float64" else dtype,
                               device=self.device)
            if dtype == "float64":
                model = model.to(torch.float64)
            self._models[dtype] = model
            self._loaded[dtype] = None
        if self._loaded[dtype] != version:
            sd = self.weights(version)
            target = next(model.parameters()).dtype
            missing, unexpected = model.load_state_dict({k: torch.as_tensor(v).to(target) for k, v in sd.items()},
                                                        strict=False)
            unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
            if unexpected or [k for k in missing if not _tied(model, k)]:
                name = (unexpected or missing)[0]
                raise BadInput(f"weight version {version} does not fit the checkpoint's architecture "
                               f"({len(unexpected)} unexpected, {len(missing)} missing names, e.g. {name})",
                               field="weights")
            self._loaded[dtype] = version
            self.stats.weight_loads[dtype] = self.stats.weight_loads.get(dtype, 0) + 1
        return model

    def close(self) -> None:
        self._models.clear()
        self._loaded.clear()

    # ------------------------------------------------------------------ scoring
    def score(self, seqs: Sequence[Seq], *, dtype: str = "float32",
              head_dtype: str | None = "float32") -> dict[Any, list[np.ndarray]]:
        """``{seq.key: [logprobs per dist]}`` (float64 arrays, one value per output token),
        each token under the weights of its version; ``-inf`` where a truncated distribution
        excludes the token."""
        import torch

        t0 = time.perf_counter()
        out: dict[Any, list[np.ndarray]] = {}
        # Sequences with the same prompt and the same version segments share the prompt's run;
        # groups with the same prompt length and segments share every forward.
        groups: dict[tuple, list[Seq]] = {}
        for s in seqs:
            if not s.output_ids:
                out[s.key] = [np.zeros(0) for _ in s.dists]
                continue
            if not s.prompt_ids:
                raise BadInput("a sequence with an empty prompt cannot be scored (its first token has no "
                               "context)", field="prompt_ids", request_id=str(s.key))
            if len(s.versions) != len(s.output_ids):
                raise BadInput(f"{len(s.versions)} versions for {len(s.output_ids)} output tokens",
                               field="token_versions", request_id=str(s.key))
            groups.setdefault((tuple(s.prompt_ids), _shape(s)), []).append(s)
        shapes: dict[tuple, list[list[Seq]]] = {}
        for (_, shape), members in groups.items():
            shapes.setdefault(shape, []).append(members)
        batches = [b for shape in sorted(shapes) for b in self._cut(shapes[shape])]
        with torch.no_grad():
            self._walk(batches, dtype, head_dtype, out)
        done = [s for s in seqs if s.output_ids]
        self.stats.sequences += len(done)
        self.stats.scored_tokens += sum(len(s.output_ids) for s in done)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _cut(self, groups: list[list[Seq]]) -> Iterable[list[list[Seq]]]:
        """Groups of one shape cut into batches of about ``batch_tokens`` body positions."""
        batch: list[list[Seq]] = []
        size = 0
        for members in groups:
            cost = len(members[0].prompt_ids) + sum(len(s.output_ids) for s in members)
            if batch and size + cost > self.batch_tokens:
                yield batch
                batch, size = [], 0
            batch.append(members)
            size += cost
        if batch:
            yield batch

    def _walk(self, batches: list[list[list[Seq]]], dtype: str, head_dtype: str | None,
              out: dict[Any, list[np.ndarray]]) -> None:
        """Run every batch through its version segments in order, all batches together in
        version order, so each version's weights load once per round."""
        import torch

        from ..trainer import _base_and_head

        states = [{"groups": b, "members": [s for g in b for s in g],
                   "owner": [gi for gi, g in enumerate(b) for _ in g], "segs": b[0][0].segments(), "k": 0,
                   "cache": None, "parts": [[] for g in b for _ in g]} for b in batches]
        while True:
            pending = [st for st in states if st["k"] < len(st["segs"])]
            if not pending:
                break
            version = min(st["segs"][st["k"]][0] for st in pending)
            base, head = _base_and_head(self._model(version, dtype))
            for st in (st for st in pending if st["segs"][st["k"]][0] == version):
                members, (_, start, end) = st["members"], st["segs"][st["k"]]
                plen = len(members[0].prompt_ids)
                last_seg = st["k"] == len(st["segs"]) - 1
                hidden: list[list[Any]] = [[] for _ in members]
                if st["k"] == 0:   # the distinct prompts once, then the outputs up to the first switch
                    st["cache"], first = self._prompt(base, [list(g[0].prompt_ids) for g in st["groups"]],
                                                      st["owner"])
                    for i in range(len(members)):
                        hidden[i].append(first[i][None])
                    start = plen
                rows = [list(s.output_ids[start - plen:(len(s.output_ids) - 1 if last_seg else end - plen)])
                        for s in members]
                if any(rows):
                    h = self._continue(base, st["cache"], rows, start)
                    for i, r in enumerate(rows):
                        hidden[i].append(h[i, :len(r)])
                # The tokens these positions predict, projected by this version's head.
                first_tok = start - plen + (1 if st["k"] > 0 else 0)
                part = [Seq(i, s.prompt_ids, s.output_ids[first_tok:first_tok + sum(len(x) for x in hidden[i])],
                            s.dists, ()) for i, s in enumerate(members)]
                vals: dict[Any, list[np.ndarray]] = {}
                self._project(head, part, [torch.cat(x, 0) for x in hidden], head_dtype, vals)
                for i in range(len(members)):
                    st["parts"][i].append(vals[i])
                st["k"] += 1
        for st in states:
            for s, parts in zip(st["members"], st["parts"]):
                out[s.key] = [np.concatenate([p[j] for p in parts]) for j in range(len(s.dists))]

    def _prompt(self, base: Any, prompts: list[list[int]], owner: list[int]) -> tuple[Any, Any]:
        """Run distinct prompts of one length once; (their KV cache copied to each member,
        the last prompt position's hidden state of each member)."""
        import torch

        dev = self._device(base)
        res = base(input_ids=torch.tensor(prompts, dtype=torch.long, device=dev), use_cache=True)
        idx = torch.tensor(owner, dtype=torch.long, device=dev)
        cache = res.past_key_values
        cache.reorder_cache(idx)
        self.stats.body_positions += len(prompts) * len(prompts[0])
        return cache, res.last_hidden_state[:, -1][idx]

    def _continue(self, base: Any, cache: Any, rows: list[list[int]], start: int) -> Any:
        """Feed each member's ``rows`` (right-padded) at positions from ``start`` on top of
        ``cache``; the hidden states ``[members, longest, hidden]``."""
        import torch

        dev = self._device(base)
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
        mask = torch.ones((len(rows), start + width), dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            if r:
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, start + len(r):] = 0
        pos = torch.arange(start, start + width, device=dev).expand(len(rows), -1)
        self.stats.body_positions += sum(len(r) for r in rows)
        return base(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state

    @staticmethod
    def _device(base: Any) -> Any:
        return next(base.parameters()).device

    def _project(self, head: Any, members: list[Seq], hidden: list[Any], head_dtype: str | None,
                 out: dict[Any, list[np.ndarray]]) -> None:
        """Logprobs of each member's output tokens under each of its distributions, from the
        hidden states that predict them (one row per output token)."""
        import torch

        dev = head.weight.device
        rows = torch.cat(hidden, 0)
        tokens = torch.tensor([t for s in members for t in s.output_ids], dtype=torch.long, device=dev)
        offsets = np.cumsum([0] + [len(s.output_ids) for s in members])
        dist_rows: dict[Dist, list[int]] = {}
        for i, s in enumerate(members):
            for d in s.dists:
                dist_rows.setdefault(d, []).extend(range(offsets[i], offsets[i + 1]))
        values: dict[Any, np.ndarray] = {}
        for d, idx in dist_rows.items():
            sel = torch.tensor(idx, dtype=torch.long, device=dev)
            if d is LOGITS:
                vals = np.full((len(rows), head.weight.shape[0]), np.nan, np.float32)
                for a in range(0, len(idx), self.head_rows):
                    vals[idx[a:a + self.head_rows]] = _logits(rows[sel[a:a + self.head_rows]], head,
                                                              head_dtype).float().cpu().numpy()
            else:
                vals = np.full(len(rows), np.nan)
                for a in range(0, len(idx), self.head_rows):
                    chunk = sel[a:a + self.head_rows]
                    vals[idx[a:a + self.head_rows]] = token_logprobs(rows[chunk], head, tokens[chunk], d,
                                                                     head_dtype).cpu().numpy()
            values[d] = vals
        for i, s in enumerate(members):
            out[s.key] = [values[d][offsets[i]:offsets[i + 1]].copy() for d in s.dists]


class _Logits:
    """Stands in a sequence's ``dists`` for its raw logits: ``[n_tokens, vocab]`` float32 rows."""

    def __repr__(self) -> str:
        return "LOGITS"


LOGITS: Any = _Logits()


def _logits(hidden: Any, head: Any, head_dtype: str | None) -> Any:
    import torch

    from ..trainer import _project

    if hidden.dtype == torch.float64:   # the exact path: a float64 model, float64 logits
        return head(hidden)
    return _project(hidden, head, head_dtype)


def token_logprobs(hidden: Any, head: Any, tokens: Any, dist: Dist, head_dtype: str | None) -> Any:
    """Logprob of ``tokens`` under ``dist`` of the logits ``head(hidden)`` (float64 out)."""
    import torch

    from ..engines._ref_sampling import GREEDY_EPS, apply_top_k_top_p

    logits = _logits(hidden, head, head_dtype)
    t = dist.temperature if dist.temperature >= GREEDY_EPS else 1.0
    z = logits / t
    if dist.truncated:
        z = apply_top_k_top_p(z, dist.top_k, dist.top_p)
    return torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0].double()


def _shape(s: Seq) -> tuple:
    """What sequences must share to run in one batch: the prompt length and the version
    segments (the last one's end aside: outputs are right-padded)."""
    segs = s.segments()
    return (len(s.prompt_ids), tuple(segs[:-1]), segs[-1][0], segs[-1][1])


def _tied(model: Any, name: str) -> bool:
    """A missing name that the model ties to another (lm_head to the embeddings)."""
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def finite_mean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else math.nan
