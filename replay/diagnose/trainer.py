"""The trainer-side verdict: the trainer's semantics, then the objective-side hypotheses (DESIGN §8.2).

First the trainer's *semantics* is identified: its logprobs follow the sampler's
distribution, or ``logits / T`` without the sampler's truncation (PipelineRL's
trainer does not renormalise over top-p). That difference is deliberate and is
named with its size (the ``semantics`` component). What is left, ``e_trainer``, is
tested against the floor of the trainer's dtype; when it is above the floor, each
hypothesis below is a cheap re-scoring of a probe of the off-floor tokens, and is
named only when it brings ``e_trainer`` to the floor:

=================== ==========================================================================
``temperature``     the trainer divides the logits by another temperature (estimated)
``truncation``      the trainer truncates with another top-k / top-p than the sampler's (estimated)
``position_shift``  the trainer's logprobs are shifted by one position (a BOS / mask off-by-one)
``stale_version``   the trainer's weights are older than the tokens' (on the record), or another
                    stored version fits its logprobs, not the one it recorded
``loss_mask``       tokens that were not generated (prompt or padding) were scored as if they were:
                    the trainer's rows are longer than the outputs, aligned past the extra values
``lm_head_dtype``   the trainer's final projection runs in bf16
=================== ==========================================================================

Nothing passing leaves the verdict "not explained", with the residual and its worst tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from replay.diagnose.components import Tokens, _sub, size
from replay.diagnose.reference import ReferenceSet
from replay.diagnose.sequences import RefSeq
from replay.diagnose.scoring import LOGITS, Dist, ReferenceScorer, Seq
from replay.diagnose.stats import Floor, cusum_onset, floor_test

HYPOTHESES = ("temperature", "truncation", "position_shift", "stale_version", "loss_mask", "lm_head_dtype")
PROBE_FLOATS = 1 << 25      # probe tokens x vocabulary kept as logits (128 MiB of float32)
PROBE_TOKENS = 4096         # tokens the hypotheses are tested on at most
TRUNC_TOKENS = 512          # of which the truncation grid uses at most this many
TOP_P_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95, 0.98, 0.99, 1.0)
TOP_K_GRID = (-1, 1, 2, 5, 10, 20, 40, 50, 100, 200, 1000)
SEMANTICS_DOC = {
    "sampler": "the trainer's logprobs follow the sampler's distribution (its temperature, renormalised "
               "over its top-k / top-p)",
    "untruncated": "the trainer does not renormalise over the sampler's top-k / top-p (a known, deliberate "
                   "choice, as in PipelineRL's trainer): its logprobs sit log(nucleus mass) below the sampler's",
}


def star_dist(s: RefSeq, semantics: str) -> Dist:
    return s.dist.untruncated() if semantics == "untruncated" else s.dist


def onset(steps: list[int], tests: list) -> int | None:
    """The CUSUM onset over per-step floor tests (z = the larger of the two tests)."""
    z = [max(t.z_mean, t.z_tail) if t.at_floor is not None else 0.0 for t in tests]
    return cusum_onset(steps, z, k=1.0, h=8.0)[0]


def trainer_verdict(ref: ReferenceSet, tok: Tokens, floor: Floor, rows: Sequence[Any], *,
                    scorer: Callable[[], ContextManager[ReferenceScorer]], stored: Sequence[int],
                    progress: Callable[[str], None] | None = None) -> dict:
    """The trainer's semantics, its residual, and which hypotheses bring it to the floor; ``scorer()``
    opens the re-scoring the hypotheses need (only when the residual is off the floor)."""
    semantics = ref.trainer_semantics
    have = [s for s in ref.seqs if s.trainer_row is not None]
    out: dict[str, Any] = {"explained": None, "off_floor": False, "causes": [], "semantics": _semantics(semantics, tok),
                           "residual": None, "onset_step": None, "hypotheses": [], "on_record": {}, "worst": []}
    if not have:
        out["reason"] = ("the recording has no trainer rows at these steps: record the trainer's logprobs "
                         "(rec.trainer(...) or replay.integrations.torch) to test the objective side")
        return out
    residual = floor_test(tok.trainer, floor)
    out["residual"] = residual.as_dict()
    steps = [r.step for r in rows]
    out["onset_step"] = onset(steps, [r.trainer for r in rows])
    on_record = _on_record(ref, tok)
    out["on_record"] = on_record
    causes = ["stale_version"] if on_record["older_than_tokens"] else []
    off = residual.at_floor is False or out["onset_step"] is not None
    out["off_floor"] = off
    if not off:
        out["explained"] = True
        out["causes"] = causes
        return out
    first = out["onset_step"] if out["onset_step"] is not None else min(steps)
    bad_steps = {r.step for r in rows if r.trainer.at_floor is False and r.step >= first} or set(steps)
    probe = _probe([s for s in have if s.step in bad_steps])
    if progress:
        progress(f"trainer: testing {len(HYPOTHESES)} hypotheses on {sum(s.n for s in probe)} tokens")
    tested = _test_all(probe, have, semantics, floor, scorer, set(stored), progress)
    out["hypotheses"] = tested
    passing = [h for h in tested if h["at_floor"]]
    for h in sorted(passing, key=lambda h: h["mean_abs_residual"]):
        if h["id"] not in causes:
            causes.append(h["id"])
    out["causes"] = causes
    out["explained"] = bool(passing)
    if not passing:
        out["reason"] = ("e_trainer is above the floor and none of the objective-side hypotheses "
                         f"({', '.join(HYPOTHESES)}) brings it there: not explained")
        out["worst"] = _worst(tok)
    return out


def _semantics(name: str, tok: Tokens) -> dict:
    return {"name": name, "description": SEMANTICS_DOC[name], **size(tok.semantics)}


def _on_record(ref: ReferenceSet, tok: Tokens) -> dict:
    recorded = tok.trainer_version >= 0
    older = int((recorded & (tok.version > tok.trainer_version)).sum())
    mism = [s for s in ref.seqs if s.trainer_row is not None and len(s.trainer_row) != s.n]
    return {"older_than_tokens": older, "rows_of_other_length": len(mism),
            "rows_without_version": sum(1 for s in ref.seqs if s.trainer_row is not None and s.trainer_version is None),
            "example": None if not mism else {"step": mism[0].step, "request_id": mism[0].request_id,
                                               "values": len(_trainer_row(mism[0])), "tokens": mism[0].n}}


def _probe(seqs: list[RefSeq]) -> list[RefSeq]:
    """Sequences spread over the steps (round robin), up to PROBE_TOKENS tokens."""
    by_step: dict[int, list[RefSeq]] = {}
    for s in seqs:
        by_step.setdefault(s.step, []).append(s)
    queues = [sorted(v, key=lambda s: s.request_id) for _, v in sorted(by_step.items())]
    out, n = [], 0
    while any(queues) and n < PROBE_TOKENS:
        for q in queues:
            if q and n < PROBE_TOKENS:
                s = q.pop(0)
                out.append(s)
                n += s.n
    return out


def _trainer_row(s: RefSeq) -> np.ndarray:
    """The trainer's row of a sequence taken for having one (the probed and the mismatched ones)."""
    assert s.trainer_row is not None
    return s.trainer_row


def _aligned(s: RefSeq) -> np.ndarray:
    return s.lp_trainer if s.lp_trainer is not None else np.full(s.n, np.nan)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _row(hid: str, c: np.ndarray, base: np.ndarray, floor: Floor, *, differs: bool = True, **detail: Any) -> dict:
    """A hypothesis tested on a token set: ``c`` the residual with it, ``base`` without it, on the same
    tokens. Named (``at_floor``) only when it brings the residual to the floor where the unmodified
    residual is not, and its estimate ``differs`` from what the sampler or the record already says."""
    t, b = floor_test(c, floor), floor_test(base, floor)
    named = bool(t.at_floor) and b.at_floor is False and differs
    return {"id": hid, "at_floor": named, "mean_abs_residual": t.mean_abs, "exceed": t.exceed, "n_tokens": t.n,
            "baseline_mean_abs": b.mean_abs, "detail": detail}


def _test_all(probe: list[RefSeq], have: list[RefSeq], semantics: str, floor: Floor,
              scorer_factory: Callable[[], ContextManager[ReferenceScorer]], stored: set[int],
              progress: Callable[[str], None] | None) -> list[dict]:
    out = []

    def base_of(seqs, cut=None):
        """The unmodified residual (the trainer against its identified reference) on these tokens."""
        return _cat([_sub(_aligned(s)[:k], s.star(semantics)[1][:k])
                     for s, k in ((s, cut(s) if cut else s.n) for s in seqs)])

    with scorer_factory() as scorer:
        # temperature and truncation: from the logits at the trainer's version, on a token-capped head
        vocab_cap = max(1, PROBE_FLOATS // max(1, _vocab(scorer)))
        head = _first_tokens(probe, min(vocab_cap, PROBE_TOKENS))
        logits = scorer.score([Seq(i, s.prompt_ids, s.output_ids[:k], [LOGITS], list(s.tr_versions[:k]))
                               for i, (s, k) in enumerate(head)]) if head else {}
        z = [logits[i][0] for i in range(len(head))]
        base_head = _cat([_sub(_aligned(s)[:k], s.star(semantics)[1][:k]) for s, k in head])
        out.append(_temperature(head, z, base_head, floor))
        trunc = _first_tokens([s for s, _ in head], TRUNC_TOKENS)
        trunc = [(s, min(k, kk)) for (s, k), (_, kk) in zip(head, trunc)]
        out.append(_truncation(trunc, z, _cat([_sub(_aligned(s)[:k], s.star(semantics)[1][:k]) for s, k in trunc]),
                               floor))
        # position shift: the trainer's logprob of token t is the reference's of token t +- 1
        for delta in (1, -1):
            parts, base = [], []
            for s in probe:
                _, star_tr = s.star(semantics)
                a = _aligned(s)
                parts.append(_sub(a[:-1], star_tr[1:]) if delta == 1 else _sub(a[1:], star_tr[:-1]))
                base.append(_sub(a[:-1], star_tr[:-1]) if delta == 1 else _sub(a[1:], star_tr[1:]))
            out.append(_row("position_shift", _cat(parts), _cat(base), floor, shift=delta))
        # stale weights: another stored version fits the trainer's logprobs
        for d in (-1, -2, -3, 1):
            cand = [(s, s.trainer_version + d) for s in probe
                    if s.trainer_version is not None and s.trainer_version + d in stored]
            if not cand:
                continue
            res = scorer.score([Seq(i, s.prompt_ids, s.output_ids, [star_dist(s, semantics)], [v] * s.n)
                                for i, (s, v) in enumerate(cand)])
            c = _cat([_sub(_aligned(s), res[i][0]) for i, (s, _) in enumerate(cand)])
            out.append(_row("stale_version", c, base_of([s for s, _ in cand]), floor, version_offset=d))
        # loss mask: rows longer than the outputs, aligned past the extra leading values
        longer = [s for s in probe if len(_trainer_row(s)) > s.n]
        if longer:
            c = _cat([_sub(_trainer_row(s)[len(_trainer_row(s)) - s.n:], s.star(semantics)[1]) for s in longer])
            rest = [s for s in probe if len(_trainer_row(s)) <= s.n]
            c_rest = _cat([_sub(_aligned(s), s.star(semantics)[1]) for s in rest])
            out.append(_row("loss_mask", np.concatenate([c, c_rest]), base_of(longer + rest), floor,
                            rows_longer=len(longer), extra_values=int(np.median([len(_trainer_row(s)) - s.n
                                                                                for s in longer]))))
        # head dtype: the trainer's projection in bf16
        res = scorer.score([Seq(i, s.prompt_ids, s.output_ids, [star_dist(s, semantics)], list(s.tr_versions))
                            for i, s in enumerate(probe)], head_dtype="bfloat16")
        out.append(_row("lm_head_dtype", _cat([_sub(_aligned(s), res[i][0]) for i, s in enumerate(probe)]),
                        base_of(probe), floor, head_dtype="bfloat16"))
    # one row per hypothesis id: the best-fitting variant
    best: dict[str, dict] = {}
    for h in out:
        cur = best.get(h["id"])
        if cur is None or (h["at_floor"], -_nan_big(h["mean_abs_residual"])) > \
                (cur["at_floor"], -_nan_big(cur["mean_abs_residual"])):
            best[h["id"]] = h
    return [best[h] for h in HYPOTHESES if h in best]


def _nan_big(x: float) -> float:
    return math.inf if x is None or math.isnan(x) else x


def _vocab(scorer: ReferenceScorer) -> int:
    from replay.models import load_config

    return int(load_config(scorer.model_path).get("vocab_size") or 1)


def _first_tokens(seqs: list[RefSeq], limit: int) -> list[tuple[RefSeq, int]]:
    """(sequence, tokens of it) pairs covering at most ``limit`` tokens (the last one cut to fit)."""
    out, n = [], 0
    for s in seqs:
        if n >= limit:
            break
        k = min(s.n, limit - n)
        out.append((s, k))
        n += k
    return out


def _lp_tempered(z: np.ndarray, tokens: np.ndarray, t: float) -> np.ndarray:
    x = z.astype(np.float64) / t
    m = x.max(1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
    return x[np.arange(len(tokens)), tokens] - lse


def _temperature(head: list[tuple[RefSeq, int]], z: list[np.ndarray], base: np.ndarray, floor: Floor) -> dict:
    """The temperature that fits the trainer's logprobs best (no truncation), by golden section on
    log T over [0.05, 20], with T = 1 (no division at all) tried as well. Named only when it differs
    from the sampler's by more than 0.1%."""
    if not head:
        return _row("temperature", np.zeros(0), np.zeros(0), floor)
    zz = np.concatenate(z)
    tokens = np.concatenate([np.asarray(s.output_ids[:k]) for s, k in head])
    lt = np.concatenate([_aligned(s)[:k] for s, k in head])
    ok = np.isfinite(lt)

    def cost(t: float) -> float:
        return float(np.mean(np.abs(lt[ok] - _lp_tempered(zz[ok], tokens[ok], t)))) if ok.any() else math.inf

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = cost(math.exp(a)), cost(math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = cost(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = cost(math.exp(b))
    t_best = min((math.exp((lo + hi) / 2), 1.0), key=cost)
    c = np.full(len(lt), np.nan)
    c[ok] = lt[ok] - _lp_tempered(zz[ok], tokens[ok], t_best)
    sampler = sorted({s.dist.temperature for s, _ in head})
    differs = all(abs(t_best - t) > 1e-3 * t for t in sampler)
    return _row("temperature", c, base, floor, differs=differs, temperature=round(t_best, 4),
                sampler_temperature=sampler)


def _truncation(pairs: list[tuple[RefSeq, int]], z: list[np.ndarray], base: np.ndarray, floor: Floor) -> dict:
    """The top-k / top-p (at the sampler's temperature) that fits the trainer's logprobs best,
    over a grid, the sampler's own settings and no truncation left out (they are semantics)."""
    if not pairs:
        return _row("truncation", np.zeros(0), np.zeros(0), floor)
    n = sum(k for _, k in pairs)
    zz = np.concatenate([zi[:k] for zi, (_, k) in zip(z, pairs)]).astype(np.float64)
    tokens = np.concatenate([np.asarray(s.output_ids[:k]) for s, k in pairs])
    temps = np.concatenate([np.full(k, s.dist.temperature if s.dist.temperature >= 1e-5 else 1.0) for s, k in pairs])
    lt = np.concatenate([_aligned(s)[:k] for s, k in pairs])
    x = zz / temps[:, None]
    order = np.argsort(-x, axis=1, kind="stable")
    vals = np.take_along_axis(x, order, 1)
    rank = np.argmax(order == tokens[:, None], axis=1)
    m = vals[:, :1]
    ex = np.exp(vals - m)
    total = ex.sum(1, keepdims=True)
    mass_before = np.concatenate([np.zeros((n, 1)), np.cumsum(ex, 1)[:, :-1]], 1) / total  # D_r
    lse_prefix = m + np.log(np.cumsum(ex, 1))                                             # lse of the r+1 largest
    vocab = x.shape[1]
    own = {(s.dist.top_k, s.dist.top_p) for s, _ in pairs}
    best = None
    for k in TOP_K_GRID:
        kk = k if 0 < k < vocab else vocab
        mk = mass_before[:, kk - 1] + ex[:, kk - 1] / total[:, 0] if kk < vocab else np.ones(n)
        for p in TOP_P_GRID:
            if (k if 0 < k < vocab else -1, p) in own | {(-1, 1.0)}:
                continue
            kept = np.minimum(kk, np.maximum(1, (mass_before[:, :kk] < p * mk[:, None]).sum(1)))
            lp = np.where(rank < kept, vals[np.arange(n), rank] - lse_prefix[np.arange(n), kept - 1], -np.inf)
            c = _sub(lt, lp)
            score = float(np.mean(np.where(np.isfinite(c), np.abs(c), 10.0)))
            if best is None or score < best[0]:
                best = (score, k, p, c)
    if best is None:
        return _row("truncation", np.zeros(0), np.zeros(0), floor)
    return _row("truncation", best[3], base, floor, top_k=best[1], top_p=best[2],
                sampler=[{"top_k": k, "top_p": p} for k, p in sorted(own)])


def _worst(tok: Tokens, n: int = 10) -> list[dict]:
    a = np.abs(np.where(np.isnan(tok.trainer), 0.0, tok.trainer))
    out = []
    for i in np.argsort(-a)[:n]:
        s = tok.seqs[int(tok.seq[i])]
        out.append({"step": s.step, "request_id": s.request_id, "pos": int(tok.pos[i]), "what": "e_trainer",
                    "value": float(tok.trainer[i]), "version": int(tok.version[i]),
                    "trainer_version": s.trainer_version})
    return out
