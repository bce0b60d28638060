"""The exact decomposition of the mismatch, per token and per step (DESIGN §8.1). Pure numpy.

With ``lp_ref`` the sampler's distribution at the token's version and ``lp_ref*`` the
reference under the trainer's identified semantics::

    e_backend = lp_rollout    - lp_ref(v_tok)
    semantics = lp_ref*(v_tok) - lp_ref(v_tok)
    lag       = lp_ref*(v_tr)  - lp_ref*(v_tok)
    e_trainer = lp_trainer    - lp_ref*(v_tr)
    r = lp_trainer - lp_rollout = e_trainer + lag + semantics - e_backend

The arithmetic of the ``tokens`` view (:func:`replay.read.views.tokens_sql`), over the
in-memory reference, so a diagnosis does not go back to SQL per step, with two readings
the view leaves raw: ``-inf - -inf`` (both sides put the token outside the support) is 0,
and a trainer logprob below :data:`replay.diagnose.reference.OUTSIDE_LP` is ``-inf``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from replay.diagnose.sequences import RefSeq
from replay.diagnose.stats import Floor, FloorTest, floor_test

COMPONENTS = ("backend", "semantics", "lag", "trainer")
SEMANTICS = ("sampler", "untruncated")


@dataclass
class Tokens:
    """Per-token arrays of a set of sequences, concatenated (one entry per output token)."""

    step: np.ndarray
    seq: np.ndarray            # index into the sequence list
    pos: np.ndarray
    r: np.ndarray              # lp_trainer - lp_rollout (NaN without a trainer row)
    backend: np.ndarray
    semantics: np.ndarray
    lag: np.ndarray
    trainer: np.ndarray
    lp_ref: np.ndarray
    version: np.ndarray
    trainer_version: np.ndarray  # -1 where not recorded
    seqs: list[RefSeq] = field(default_factory=list)

    def where(self, index: np.ndarray) -> "Tokens":
        """The tokens a boolean mask or an index array selects."""
        return Tokens(**{k: (v[index] if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})

    def component(self, name: str) -> np.ndarray:
        return getattr(self, name)


def _sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b, with -inf - -inf read as 0 (both sides put the token outside the support)."""
    with np.errstate(invalid="ignore"):
        d = a - b
    both = np.isneginf(a) & np.isneginf(b)
    if both.any():
        d = np.where(both, 0.0, d)
    return d


def tokens(seqs: Sequence[RefSeq], semantics: str) -> Tokens:
    """Every token of ``seqs`` with its components under the trainer's ``semantics``."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "seq", "pos", "r", "backend", "semantics", "lag",
                                                        "trainer", "lp_ref", "version", "trainer_version")}
    for i, s in enumerate(seqs):
        star_tok, star_tr = s.star(semantics)
        lt = s.lp_trainer
        lt = np.full(s.n, np.nan) if lt is None else lt
        cols["step"].append(np.full(s.n, s.step, np.int64))
        cols["seq"].append(np.full(s.n, i, np.int64))
        cols["pos"].append(np.arange(s.n))
        cols["r"].append(lt - s.lp_rollout)
        cols["backend"].append(_sub(s.lp_rollout, s.lp_sampler))
        cols["semantics"].append(_sub(star_tok, s.lp_sampler))
        cols["lag"].append(_sub(star_tr, star_tok))
        cols["trainer"].append(_sub(lt, star_tr))
        cols["lp_ref"].append(s.lp_sampler)
        cols["version"].append(s.versions)
        cols["trainer_version"].append(s.tr_versions if s.trainer_version is not None else np.full(s.n, -1))
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    return Tokens(**arrays, seqs=list(seqs))


def identify_semantics(seqs: Iterable[RefSeq]) -> str:
    """Which reference the trainer's logprobs follow: ``"sampler"`` (the sampler's truncated,
    renormalised distribution) or ``"untruncated"`` (``logits / T`` over the whole vocabulary,
    as PipelineRL's trainer computes). The one with the smaller mean |lp_trainer - reference|
    at the trainer's version; ``"sampler"`` when the sampler truncates nothing or no trainer
    row is there."""
    d: dict[str, list[np.ndarray]] = {"sampler": [], "untruncated": []}
    truncated = False
    for s in seqs:
        lt = s.lp_trainer
        if lt is None:
            continue
        truncated |= s.dist.truncated
        for name in SEMANTICS:
            _, star_tr = s.star(name)
            x = np.abs(_sub(lt, star_tr))
            d[name].append(x[~np.isnan(x)])
    if not truncated or not d["sampler"]:
        return "sampler"
    cost = {k: _robust_mean(np.concatenate(v)) for k, v in d.items()}
    return "untruncated" if cost["untruncated"] < cost["sampler"] else "sampler"


def _robust_mean(x: np.ndarray) -> float:
    """Mean with +inf (a token the reference excludes but the trainer gave a value) counted as 10 nats."""
    if x.size == 0:
        return math.inf
    return float(np.where(np.isinf(x), 10.0, x).mean())


def floors(seqs: Sequence[RefSeq]) -> tuple[Floor, Floor]:
    """(the body floor, the trainer floor) pooled over the sampled sequences."""
    body = [s.floor for s in seqs if s.floor is not None]
    trainer = [s.floor_trainer for s in seqs if s.floor_trainer is not None]
    fb = Floor.of(np.concatenate(body) if body else np.zeros(0))
    ft = Floor.of(np.concatenate(trainer)) if trainer else fb
    return fb, ft


@dataclass
class StepRow:
    """One step's components: their sizes and the floor tests of backend and trainer."""

    step: int
    n_tokens: int
    sizes: dict[str, dict[str, float]]      # component -> {"mean", "mean_abs"}
    backend: FloorTest
    trainer: FloorTest

    def as_dict(self) -> dict:
        return {"step": self.step, "n_tokens": self.n_tokens, **{
            f"{c}_{k}": v for c, d in self.sizes.items() for k, v in d.items()},
                "backend_at_floor": self.backend.at_floor, "trainer_at_floor": self.trainer.at_floor,
                "backend_z": max(self.backend.z_mean, self.backend.z_tail) if self.backend.n else None,
                "trainer_z": max(self.trainer.z_mean, self.trainer.z_tail) if self.trainer.n else None}


def size(x: np.ndarray) -> dict[str, float]:
    """Signed mean and mean |x| over the finite values (NaN when none)."""
    x = np.asarray(x, np.float64)
    fin = x[np.isfinite(x)]
    if fin.size == 0:
        return {"mean": math.nan, "mean_abs": math.nan}
    return {"mean": float(fin.mean()), "mean_abs": float(np.abs(fin).mean())}


def per_step(tok: Tokens, body: Floor, trainer: Floor) -> list[StepRow]:
    order = np.argsort(tok.step, kind="stable")
    steps, starts = np.unique(tok.step[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    rows = []
    for step, a, b in zip(steps, starts, ends):
        t = tok.where(order[a:b])
        rows.append(StepRow(int(step), int(len(t.step)), {c: size(t.component(c)) for c in COMPONENTS},
                            floor_test(t.backend, body), floor_test(t.trainer, trainer)))
    return rows
