"""Exact teacher-forced scoring of recorded tokens under stored weights (DESIGN §8.1).

:class:`ReferenceScorer` runs the checkpoint's transformers model (any architecture
transformers loads) over ``prompt + output`` and returns, per output token, its
logprob under one or more *distributions*: the sampler's own (temperature, then
top-k and top-p renormalised over what survives, as vLLM's sampler and
:func:`replay.engines.sampling.apply_top_k_top_p` do), the tempered one without
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
vocabulary never holds a whole batch's logits); prompts of one batch are left-padded to
the longest (batches are cut shortest first, so little is padded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from replay.errors import BadInput, ReplayError


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

    def runs(self) -> list[tuple[int, int, int]]:
        """``(version, first slot, end slot)`` runs over the input slots: slot -1 is the prompt
        (computed by the first token's version), slot ``t`` the output token ``t`` fed back (computed
        by the version of token ``t + 1``, which it predicts). The last run ends at ``n - 1``."""
        n = len(self.output_ids)
        slots = [int(self.versions[0])] + [int(self.versions[t + 1]) for t in range(n - 1)]
        out, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                out.append((slots[start], start - 1, i - 1))
                start = i
        return out


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

    ``weights(version)`` returns a HF-named state dict; ``prefetch(version)``, when given, is told
    the next version a walk needs while it computes with the current one. The model runs in ``dtype``
    (float32 for the reference; float64 or a body dtype to measure the floor); the final
    projection runs in float32 unless ``head_dtype`` says otherwise.
    """

    def __init__(self, model_path: Any, weights: Callable[[int], dict], *,
                 prefetch: Callable[[int], None] | None = None, device: str = "cpu",
                 batch_tokens: int = 16384, head_rows: int = 2048):
        self.model_path = model_path
        self.weights = weights
        self.prefetch = prefetch
        self.device = device
        self.batch_tokens = batch_tokens   # body positions per forward (bounds activation memory)
        self.head_rows = head_rows         # rows projected and soft-maxed at once (bounds logits memory)
        self.stats = ScoringStats()
        self._models: dict[str, Any] = {}
        self._loaded: dict[str, int | None] = {}

    # ------------------------------------------------------------------ models
    def _model(self, version: int, dtype: str) -> Any:
        try:
            import torch

            from replay.models import check_device, load_model
        except ImportError as e:
            raise ReplayError(f"reference scoring needs torch and transformers ({e}); install the project "
                              "with its engines extra (pip install -e '.[engines]')", "missing dependency") from e
        model = self._models.get(dtype)
        if model is None:
            check_device(self.device)
            try:
                model = load_model(self.model_path, dtype="float32" if dtype == "float64" else dtype,
                                   device=self.device)
            except ReplayError:
                raise
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise BadInput(f"transformers cannot load the model folder {self.model_path}: "
                               f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", field="model") from e
            if dtype == "float64":
                model = model.to(torch.float64)
            self._models[dtype] = model
            self._loaded[dtype] = None
        if self._loaded[dtype] != version:
            sd = self.weights(version)
            target = next(model.parameters()).dtype
            try:
                missing, unexpected = model.load_state_dict(
                    {k: torch.as_tensor(v).to(target) for k, v in sd.items()}, strict=False)
            except RuntimeError as e:   # shapes that do not fit: weights of another model than this folder's
                raise BadInput(f"weight version {version} does not fit the model at {self.model_path} "
                               f"({' '.join(str(e).split())[:300]}); give the run's model with --model",
                               field="weights") from e
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
        """Groups of one shape, shortest prompt first, cut into batches of about ``batch_tokens``
        positions: every prompt padded to the batch's longest, and its KV copied to each member."""
        batch: list[list[Seq]] = []
        width = members = outputs = 0
        for g in sorted(groups, key=lambda g: len(g[0].prompt_ids)):
            w = max(width, len(g[0].prompt_ids))
            m, o = members + len(g), outputs + sum(len(s.output_ids) for s in g)
            if batch and w * (len(batch) + 1 + m) + o > self.batch_tokens:
                yield batch
                batch, w, m, o = [], len(g[0].prompt_ids), len(g), sum(len(s.output_ids) for s in g)
            batch.append(g)
            width, members, outputs = w, m, o
        if batch:
            yield batch

    def _walk(self, batches: list[list[list[Seq]]], dtype: str, head_dtype: str | None,
              out: dict[Any, list[np.ndarray]]) -> None:
        """Run every batch through its version runs in order, all batches together in version
        order, so each version's weights load once per round."""
        import torch

        from replay.trainer.scoring import _base_and_head

        states = [_Batch(b) for b in batches]
        while True:
            pending = [st for st in states if st.k < len(st.runs)]
            if not pending:
                break
            version = min(st.runs[st.k][0] for st in pending)
            base, head = _base_and_head(self._model(version, dtype))
            after = [st.runs[st.k + (st.runs[st.k][0] == version)][0] for st in pending
                     if st.k + (st.runs[st.k][0] == version) < len(st.runs)]
            if after and self.prefetch is not None:   # the next version's weights load while this one computes
                self.prefetch(min(after))
            for st in (st for st in pending if st.runs[st.k][0] == version):
                _, ts, te = st.runs[st.k]
                last = st.k == len(st.runs) - 1
                m = len(st.members)
                parts, counts = [], np.zeros(m, np.int64)
                if ts < 0:   # the distinct prompts, once (left-padded to one width)
                    parts.append(self._prompt(base, st)[:, None])
                    counts += 1
                    ts = 0
                lens = np.array([max(0, (len(x.output_ids) - 1 if last else te) - ts) for x in st.members])
                if lens.any():
                    parts.append(self._continue(base, st, ts, lens))
                stacked = torch.cat(parts, 1)                       # [members, slots, hidden]
                valid = np.arange(stacked.shape[1])[None, :] < (counts + lens)[:, None]
                rows = stacked[torch.from_numpy(valid).to(stacked.device)]   # member by member, in order
                # slot t predicts token t + 1 (the prompt, token 0), scored by this version's head
                first_tok = st.runs[st.k][1] + 1
                self._project(head, st, rows, first_tok, counts + lens, head_dtype)
                st.k += 1
        for st in states:
            for i, x in enumerate(st.members):
                out[x.key] = [np.concatenate([p[j] for p in st.parts[i]]) for j in range(len(x.dists))]

    def _prompt(self, base: Any, st: "_Batch") -> Any:
        """Run the batch's distinct prompts once, left-padded to one width, and copy their KV
        cache to every member; the hidden state of each member's last prompt position."""
        import torch

        dev = self._device(base)
        prompts = [g[0].prompt_ids for g in st.groups]
        lens = np.array([len(p) for p in prompts])
        width = int(lens.max())
        ids = np.zeros((len(prompts), width), np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
        cols = np.arange(width)[None, :]
        mask = torch.from_numpy(cols >= (width - lens)[:, None]).to(dev).long()
        pos = torch.from_numpy(np.maximum(cols - (width - lens)[:, None], 0)).to(dev)
        res = base(input_ids=torch.from_numpy(ids).to(dev), attention_mask=mask, position_ids=pos, use_cache=True)
        idx = torch.tensor(st.owner, dtype=torch.long, device=dev)
        st.cache = res.past_key_values
        st.cache.reorder_cache(idx)
        st.mask = mask[idx]
        st.pos = torch.from_numpy(lens[st.owner]).to(dev)
        self.stats.body_positions += int(lens.sum())
        return res.last_hidden_state[:, -1][idx]

    def _continue(self, base: Any, st: "_Batch", start: int, lens: np.ndarray) -> Any:
        """Feed each member's output tokens ``start .. start + lens`` (right-padded) after what
        its cache holds; the hidden states ``[members, longest, hidden]``."""
        import torch

        dev = self._device(base)
        width = int(lens.max())
        ids = np.zeros((len(lens), width), np.int64)
        for i, x in enumerate(st.members):
            ids[i, :lens[i]] = x.output_ids[start:start + lens[i]]
        new = torch.from_numpy(np.arange(width)[None, :] < lens[:, None]).to(dev).long()
        st.mask = torch.cat([st.mask, new], 1)
        pos = st.pos[:, None] + torch.arange(width, device=dev)[None, :]
        st.pos = st.pos + torch.from_numpy(lens).to(dev)
        self.stats.body_positions += int(lens.sum())
        return base(input_ids=torch.from_numpy(ids).to(dev), attention_mask=st.mask, position_ids=pos,
                    past_key_values=st.cache, use_cache=True).last_hidden_state

    @staticmethod
    def _device(base: Any) -> Any:
        return next(base.parameters()).device

    def _project(self, head: Any, st: "_Batch", rows: Any, first_tok: int, counts: np.ndarray,
                 head_dtype: str | None) -> None:
        """Logprobs, under each member's distributions, of the tokens its ``counts`` rows predict
        (from ``first_tok`` on), appended to its parts."""
        import torch

        dev = head.weight.device
        offsets = np.concatenate([[0], np.cumsum(counts)])
        tokens = np.concatenate([np.asarray(x.output_ids[first_tok:first_tok + c], np.int64)
                                 for x, c in zip(st.members, counts)])
        tokens_t = torch.from_numpy(tokens).to(dev)
        dist_rows: dict[Any, list[np.ndarray]] = {}
        for i, x in enumerate(st.members):
            for d in x.dists:
                dist_rows.setdefault(d, []).append(np.arange(offsets[i], offsets[i + 1]))
        values: dict[Any, np.ndarray] = {}
        for d, parts in dist_rows.items():
            idx = np.concatenate(parts)
            sel = torch.from_numpy(idx).to(dev)
            if d is LOGITS:
                vals = np.full((len(rows), head.weight.shape[0]), np.nan, np.float32)
                for a in range(0, len(idx), self.head_rows):
                    vals[idx[a:a + self.head_rows]] = _logits(rows[sel[a:a + self.head_rows]], head,
                                                              head_dtype).float().cpu().numpy()
            else:
                vals = np.full(len(rows), np.nan)
                for a in range(0, len(idx), self.head_rows):
                    chunk = sel[a:a + self.head_rows]
                    vals[idx[a:a + self.head_rows]] = token_logprobs(rows[chunk], head, tokens_t[chunk], d,
                                                                     head_dtype).cpu().numpy()
            values[d] = vals
        for i, x in enumerate(st.members):
            st.parts[i].append([values[d][offsets[i]:offsets[i + 1]] for d in x.dists])


class _Logits:
    """Stands in a sequence's ``dists`` for its raw logits: ``[n_tokens, vocab]`` float32 rows."""

    def __repr__(self) -> str:
        return "LOGITS"


LOGITS: Any = _Logits()


def _logits(hidden: Any, head: Any, head_dtype: str | None) -> Any:
    import torch

    from replay.trainer.scoring import _project

    if hidden.dtype == torch.float64:   # the exact path: a float64 model, float64 logits
        return head(hidden)
    return _project(hidden, head, head_dtype)


def token_logprobs(hidden: Any, head: Any, tokens: Any, dist: Dist, head_dtype: str | None) -> Any:
    """Logprob of ``tokens`` under ``dist`` of the logits ``head(hidden)`` (float64 out)."""
    import torch

    from replay.engines.sampling import GREEDY_EPS, apply_top_k_top_p

    logits = _logits(hidden, head, head_dtype)
    t = dist.temperature if dist.temperature >= GREEDY_EPS else 1.0
    z = logits / t
    if dist.truncated:
        z = apply_top_k_top_p(z, dist.top_k, dist.top_p)
    return torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0].double()


def _shape(s: Seq) -> tuple:
    """What sequences must share to run in one batch: their version runs (the last one's end
    aside: outputs are right-padded; prompts of any length are left-padded)."""
    runs = s.runs()
    return (tuple(runs[:-1]), runs[-1][0], runs[-1][1])


class _Batch:
    """Groups (sequences sharing a prompt) of one shape walking their runs together."""

    def __init__(self, groups: list[list[Seq]]):
        self.groups = groups
        self.members = [s for g in groups for s in g]
        self.owner = [gi for gi, g in enumerate(groups) for _ in g]
        self.runs = groups[0][0].runs()
        self.k = 0                  # the run to compute next
        self.cache: Any = None      # the KV cache of every member
        self.mask: Any = None       # attention mask over what the cache holds [members, length]
        self.pos: Any = None        # each member's next position
        self.parts: list[list] = [[] for _ in self.members]   # logprobs per run, per member


def _tied(model: Any, name: str) -> bool:
    """A missing name that the model ties to another (lm_head to the embeddings)."""
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


