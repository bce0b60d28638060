"""The reference of every recorded token, scored once and kept in the recording (DESIGN §8.1).

For each rollout token the reference is its logprob under the sampler's own
distribution (the request's recorded temperature, top-k and top-p, renormalised as
the sampler does) with the stored weights of the version the token was stamped
with, computed exactly: float32, teacher-forced prefill, nothing of the engine's
decode path (:mod:`replay.diagnose.scoring`). Four values per token go into the ``reference`` table:

``lp_sampler`` / ``lp_tempered``
    at the token's version, under the sampler's distribution / under ``logits / T``
    without truncation (what a trainer that does not renormalise computes);
``lp_sampler_tr`` / ``lp_tempered_tr``
    the same two at the trainer's recorded version.

plus ``floor``: for a sample of sequences (about :data:`FLOOR_TOKENS` tokens from
:data:`FLOOR_STEPS` steps), the difference between the reference computed in the run's
body dtype and computed exactly (float64 for a float32 body, float32 for a bf16 body):
the numerics no fix removes
(DESIGN §8.3). ``trainer_semantics`` says which of the two distributions the trainer's
logprobs follow (:func:`replay.diagnose.components.identify_semantics`).

Rows are keyed by a hash of everything they depend on (weights of the versions used,
token and trainer versions, the distribution, the floor's dtype), so a later command
reuses them and recomputes only what changed; a row with a higher ``generation`` wins.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from replay.errors import BadInput, RecordingError
from replay.store.manifest import AUX_RANKS
from replay.models import dtype_name
from replay.diagnose.components import identify_semantics
from replay.diagnose.scoring import Dist, ReferenceScorer, ScoringStats, Seq
from replay.diagnose.sequences import RefSeq

SCORING_VERSION = 1            # bumped when the stored values of a key would change
REFERENCE_RANK = AUX_RANKS + 1  # the writer rank of reference rows (replays use AUX_RANKS)
FLOOR_STEPS = 8                # steps the floor is measured at, spread over the run ...
FLOOR_TOKENS = 1024            # ... on at least this many tokens ...
FLOOR_SEQUENCES = 16           # ... and sequences, where the steps hold them
EXACT_OF = {"float32": "float64", "bfloat16": "float32", "float16": "float32"}
# A trainer that masks tokens outside its support with a large finite fill (torch.finfo.min,
# -1e9, -1e4) writes logprobs no softmax of realistic logits gives (that needs two logits 1000
# apart): below this they are read as -inf, "outside the support".
OUTSIDE_LP = -1e3


@dataclass
class ReferenceSet:
    """The reference of the sequences of some steps of one recording."""

    path: Path
    seqs: list[RefSeq]
    body_dtype: str                       # the dtype the floor stands for
    body_dtype_source: str                # "recorded" | "given" | "assumed"
    trainer_dtype: str
    trainer_semantics: str                # sampler | untruncated
    scored: int = 0                       # sequences scored now (the rest came from the recording)
    stats: ScoringStats = field(default_factory=ScoringStats)
    seconds: dict[str, float] = field(default_factory=dict)  # read, score (both versions), floor, write
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return sorted({s.step for s in self.seqs})


def body_dtype_of(run_config: dict, given: str | None = None) -> tuple[str, str]:
    """(the engine's body dtype, where it came from): given, recorded in the engine config, or
    assumed bfloat16 (vLLM's default on a GPU; the more tolerant floor)."""
    if given:
        return dtype_name(given), "given"
    cfg = ((run_config.get("engine") or {}).get("config") or {})
    if cfg.get("dtype"):
        return dtype_name(cfg["dtype"]), "recorded"
    return "bfloat16", "assumed"


def trainer_dtype_of(run_config: dict, body: str, given: str | None = None) -> str:
    if given:
        return dtype_name(given)
    tr = run_config.get("trainer") or {}
    return dtype_name(tr["dtype"]) if isinstance(tr, dict) and tr.get("dtype") else body


# ------------------------------------------------------------------------ loading

def load_sequences(rec: Any, steps: Sequence[int] | None, notes: list[str] | None = None) -> list[RefSeq]:
    """The rollouts of ``steps`` (all when None) with the trainer's latest row of each; what had to
    be assumed goes to ``notes``."""
    from replay.read.views import latest_trainer_sql

    where = "" if steps is None else f"WHERE r.step IN ({', '.join(str(int(s)) for s in steps) or 'NULL'})"
    rows = rec.query(f"""
        WITH tr AS ({latest_trainer_sql('main')})
        SELECT r.step, r.request_id, r.group_id, r.prompt_ids, r.output_ids, r.logprobs, r.token_versions,
               r.temperature, r.top_p, r.top_k, r.num_cached_tokens, t.logprobs, t.weight_version
        FROM rollouts r LEFT JOIN tr t ON r.step = t.step AND r.request_id = t.request_id
        {where} ORDER BY r.step, r.request_id""").fetchall()
    serving = dict(rec.query("SELECT step, arg_min(weight_version, seq) FROM events "
                           "WHERE kind = 'step_start' AND weight_version IS NOT NULL GROUP BY step").fetchall())
    out, assumed = [], []
    for (step, rid, gid, prompt, output, lps, tv, temp, top_p, top_k, cached, tlp, tver) in rows:
        n = len(output)
        if tv is not None and (len(tv) != n or any(v is None for v in tv)):
            raise BadInput(f"token_versions of request {rid!r} has {len(tv)} entries for {n} tokens"
                           + (" and holds NULLs" if any(v is None for v in tv) else "")
                           + ": the reference needs each token's version", field="token_versions",
                           step=step, request_id=rid)
        if tv is None:
            if step not in serving:
                raise BadInput(f"the tokens of request {rid!r} carry no weight versions (token_versions) "
                               "and no step_start event names the version serving the step: the reference "
                               "needs each token's version; record token_versions with each rollout",
                               field="token_versions", step=step, request_id=rid)
            tv = [serving[step]] * n
            assumed.append(step)
        dist = Dist(float(temp) if temp is not None else 1.0, int(top_k) if top_k is not None else -1,
                    float(top_p) if top_p is not None else 1.0)
        out.append(RefSeq(step=int(step), request_id=rid, group_id=gid, prompt_ids=list(prompt),
                          output_ids=list(output), versions=np.asarray(tv, np.int64),
                          trainer_version=None if tver is None else int(tver),
                          lp_rollout=np.asarray(lps, np.float64),
                          trainer_row=None if tlp is None else _support(np.asarray(tlp, np.float64)),
                          num_cached_tokens=cached, dist=dist))
    if notes is not None and assumed:
        from replay.rerun.plans import step_ranges

        notes.append(f"rollouts of steps {step_ranges(sorted(set(assumed)))} carry no token_versions: each token is "
                     "taken as generated by the version serving when the step began (an update inside the step, "
                     "if any, is not seen)")
    if notes is not None:
        blind = sum(1 for s in out if s.trainer_row is not None and s.trainer_version is None)
        if blind:
            notes.append(f"{blind} trainer rows carry no weight_version: their tokens are taken as scored at the "
                         "tokens' own versions, so lag cannot be told from trainer error there")
    return out


def _support(lp: np.ndarray) -> np.ndarray:
    if lp.size and lp.min() < OUTSIDE_LP:
        return np.where(lp < OUTSIDE_LP, -np.inf, lp)
    return lp


def stored_weights(rec: Any) -> dict[int, dict]:
    """version -> {"sha256", "blob", "path"} of the weights table (the latest row of each)."""
    rows = rec.query("SELECT version, arg_max(sha256, time_ns), arg_max(blob, time_ns), arg_max(path, time_ns) "
                   "FROM weights GROUP BY version").fetchall()
    return {int(v): {"sha256": sha, "blob": blob, "path": p} for v, sha, blob, p in rows}


def _floor_sample(seqs: list[RefSeq]) -> set[tuple[int, str]]:
    """The sequences whose floor is measured: from FLOOR_STEPS steps spread evenly over the run
    (fewer versions to load), taken round-robin over those steps (each step's spread by request
    id) until FLOOR_TOKENS tokens and FLOOR_SEQUENCES sequences, or all there are."""
    by_step: dict[int, list[RefSeq]] = {}
    for s in seqs:
        by_step.setdefault(s.step, []).append(s)
    steps = sorted(by_step)
    if len(steps) > FLOOR_STEPS:
        steps = sorted({steps[round(i * (len(steps) - 1) / (FLOOR_STEPS - 1))] for i in range(FLOOR_STEPS)})
    queues = []
    for step in steps:
        members = sorted(by_step[step], key=lambda s: s.request_id)
        # every k-th first, then the rest: the first picks of a step spread over its requests
        stride = max(1, len(members) // 16)
        queues.append([m for r in range(stride) for m in members[r::stride]])
    out: set[tuple[int, str]] = set()
    tokens = 0
    while any(queues) and (tokens < FLOOR_TOKENS or len(out) < FLOOR_SEQUENCES):
        for q in queues:
            if q:
                s = q.pop(0)
                out.add((s.step, s.request_id))
                tokens += s.n
    return out


def _key(s: RefSeq, setting: str, shas: dict[int, str]) -> str:
    """What a sequence's stored scores depend on: its versions, its sampling settings, the weights
    of those versions, and ``setting`` (the floors' dtypes, the device, the model's architecture)."""
    used = sorted({*map(int, s.versions), *([s.trainer_version] if s.trainer_version is not None else [])})
    blob = json.dumps([SCORING_VERSION, [int(v) for v in s.versions], s.trainer_version,
                       [s.dist.temperature, s.dist.top_k, s.dist.top_p], setting,
                       [shas.get(v) for v in used]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ scoring

def reference_scores(path: str | Path, steps: Sequence[int] | None = None, *, dtype: str | None = None,
                     trainer_dtype: str | None = None, device: str = "cpu", write: bool = True,
                     model_path: str | Path | None = None, weights_from: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> ReferenceSet:
    """The reference of every rollout of ``steps`` (default: all), from the recording where it
    is already there, scored (and, with ``write``, stored) where it is not."""
    from replay.models import recorded_model, recording_model
    from replay.read.recording import open_recording

    path = Path(path)
    t_start = time.perf_counter()
    with open_recording(path, weights_from=weights_from) as rec:
        run_config = rec.run_config()
        body, source = body_dtype_of(run_config, dtype)
        tr_dtype = trainer_dtype_of(run_config, body, trainer_dtype)
        notes: list[str] = []
        seqs = load_sequences(rec, steps, notes)
        if not seqs:
            known = [s for (s,) in rec.query("SELECT DISTINCT step FROM rollouts ORDER BY step").fetchall()]
            raise BadInput(f"no rollouts at the steps asked for ({_show(steps)}); steps with rollouts: "
                           f"{_show(known)}", field="steps")
        weights = stored_weights(rec)
        need = sorted({int(v) for s in seqs for v in s.versions}
                      | {s.trainer_version for s in seqs if s.trainer_version is not None})
        # a version recorded by hash only is read from --weights-from, where one is given
        absent = [v for v in need if v not in weights or not (weights[v]["blob"] or rec.weights_from)]
        if absent:
            raise RecordingError(_no_weights_message(path, absent, weights), "no stored weights")
        shas = {v: weights[v]["sha256"] for v in need}
        sample = _floor_sample(seqs)
        folder = Path(model_path) if model_path else recorded_model(path, run_config)[1]
        arch = (hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]
                if folder is not None and (folder / "config.json").is_file() else "unresolved")
        setting = f"body={body} trainer={tr_dtype} device={device} arch={arch}"
        keys = {(s.step, s.request_id): _key(s, setting, shas) for s in seqs}
        cached, generation, semantics_before = _stored(rec, steps)
        todo = []
        for s in seqs:
            k = (s.step, s.request_id)
            row = cached.get(k)
            # a stored row serves when it scores the same things and holds a floor if one is wanted here
            if row is not None and row["ref_key"] == keys[k] and (row["floor"] is not None or k not in sample):
                _fill(s, row)
            else:
                todo.append(s)
        ref = ReferenceSet(path=path, seqs=seqs, body_dtype=body, body_dtype_source=source,
                           trainer_dtype=tr_dtype, trainer_semantics="sampler", scored=len(todo), notes=notes)
        ref.seconds["read"] = time.perf_counter() - t_start
        if todo:
            folder = Path(model_path) if model_path else recording_model(path, run_config)
            _score(rec, folder, todo, sample, device, ref, progress)
    # The trainer's semantics is one per run: identified over all steps, kept when only some are scored.
    ref.trainer_semantics = (semantics_before if steps is not None and semantics_before in ("sampler", "untruncated")
                             else identify_semantics(seqs))
    if source == "assumed":
        ref.notes.append("the run config records no engine dtype: the floor is measured for bfloat16, vLLM's "
                         "default on a GPU (give --dtype to measure another)")
    changed = ref.trainer_semantics != semantics_before
    if write and (todo or changed):
        t0 = time.perf_counter()
        rows = seqs if changed else todo
        _write(path, rows, keys, generation + 1, ref.trainer_semantics, body)
        ref.seconds["write"] = time.perf_counter() - t0
    for s in seqs:   # the floor is this sample's, whatever earlier commands stored for other sequences
        if (s.step, s.request_id) not in sample:
            s.floor = s.floor_trainer = None
    return ref


def _show(steps: Sequence[int] | None) -> str:
    from replay.rerun.plans import step_ranges

    return "all" if steps is None else (step_ranges(sorted(steps)) or "none")


def _no_weights_message(path: Path, absent: list[int], weights: dict[int, dict]) -> str:
    hashed = [v for v in absent if v in weights]
    have = sorted(v for v in weights if weights[v]["blob"])
    msg = (f"{path} stores no weights for version(s) {', '.join(map(str, absent[:12]))}"
           f"{' ...' if len(absent) > 12 else ''} (stored: {', '.join(map(str, have[:12])) or 'none'}"
           f"{'; recorded by hash only: ' + ', '.join(map(str, hashed[:12])) if hashed else ''}). The reference "
           "needs the weights of every version a token or the trainer used. Without them, what can still be "
           "told: the mismatch per step (`replay sql PATH \"SELECT * FROM step_metrics\"`) and where the run "
           "leaves a reference run (`replay bisect PATH --by steps --against REF`). To supply them, record "
           "each version with `rec.weights(version=v, state_dict=..., delta=True)`"
           + ("; for those recorded by hash only, give the folder holding their checkpoints with "
              "--weights-from DIR." if hashed else "."))
    return msg


def _stored(rec: Any, steps: Sequence[int] | None) -> tuple[dict, int, str | None]:
    """The latest reference row of each (step, request_id), the highest generation, and the
    trainer semantics of that generation."""
    where = "" if steps is None else f"WHERE step IN ({', '.join(str(int(s)) for s in steps) or 'NULL'})"
    top = rec.query("SELECT max(generation), arg_max(trainer_semantics, generation) FROM reference").fetchall()[0]
    generation = int(top[0]) if top[0] is not None else 0
    rel = rec.query(f"""
        SELECT step, request_id, ref_key, token_versions, trainer_version, lp_sampler, lp_tempered,
               lp_sampler_tr, lp_tempered_tr, floor, floor_trainer
        FROM reference {where}
        QUALIFY row_number() OVER (PARTITION BY step, request_id ORDER BY generation DESC, time_ns DESC) = 1""")
    cols = rel.columns
    cached = {(r[0], r[1]): dict(zip(cols, r)) for r in rel.fetchall()}
    return cached, generation, top[1]


def _fill(s: RefSeq, row: dict) -> None:
    s.lp_sampler = np.asarray(row["lp_sampler"], np.float64)
    s.lp_tempered = np.asarray(row["lp_tempered"], np.float64)
    s.lp_sampler_tr = np.asarray(row["lp_sampler_tr"], np.float64)
    s.lp_tempered_tr = np.asarray(row["lp_tempered_tr"], np.float64)
    s.floor = None if row["floor"] is None else np.asarray(row["floor"], np.float64)
    s.floor_trainer = None if row["floor_trainer"] is None else np.asarray(row["floor_trainer"], np.float64)


class _WeightCache:
    """State dicts by version, the most recent kept within ``budget`` bytes (a big model's
    versions do not all fit; a small one's do, so a second pass over them loads nothing).
    :meth:`prefetch` reads a version on a background thread while the caller computes (reading
    a version — decompression, delta, hash check — costs about what scoring with it does)."""

    def __init__(self, rec: Any, budget: int = 1 << 30):
        from concurrent.futures import ThreadPoolExecutor

        self.rec, self.budget = rec, budget
        self.cache: OrderedDict[int, tuple[dict, int]] = OrderedDict()  # version -> (state dict, bytes)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="replay-weights")
        self._pending: dict[int, Any] = {}

    def prefetch(self, version: int) -> None:
        if version not in self.cache and version not in self._pending:
            self._pending[version] = self._pool.submit(self.rec.load_weights, version)

    def __call__(self, version: int) -> dict:
        if version in self.cache:
            self.cache.move_to_end(version)
            return self.cache[version][0]
        pending = self._pending.pop(version, None)
        sd = pending.result() if pending is not None else self.rec.load_weights(version)
        self.cache[version] = (sd, sum(int(t.numel()) * t.element_size() for t in sd.values()))
        while len(self.cache) > 1 and sum(n for _, n in self.cache.values()) > self.budget:
            self.cache.popitem(last=False)
        return sd

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def _score(rec: Any, model_path: Path, todo: list[RefSeq], sample: set, device: str, ref: ReferenceSet, progress: Callable[[str], None] | None) -> None:
    weights = _WeightCache(rec)
    scorer = ReferenceScorer(model_path, weights, prefetch=weights.prefetch, device=device)
    try:
        jobs = []
        for s in todo:
            dists = [s.dist, s.dist.untruncated()]
            jobs.append(Seq((s.step, s.request_id, "tok"), s.prompt_ids, s.output_ids, dists, list(s.versions)))
            if s.trainer_version is not None and not (s.versions == s.trainer_version).all():
                jobs.append(Seq((s.step, s.request_id, "tr"), s.prompt_ids, s.output_ids, dists,
                                [s.trainer_version] * s.n))
        if progress:
            progress(f"reference: {len(todo)} sequences at their own and the trainer's versions")
        t0 = time.perf_counter()
        values = scorer.score(jobs)
        ref.seconds["score"] = time.perf_counter() - t0
        for s in todo:
            k = (s.step, s.request_id)
            # Rounded as stored, so a verdict from fresh scores equals one from stored scores.
            s.lp_sampler, s.lp_tempered = map(_f32, values[k + ("tok",)])
            s.lp_sampler_tr, s.lp_tempered_tr = map(_f32, values.get(k + ("tr",), values[k + ("tok",)]))
        sampled = [s for s in todo if (s.step, s.request_id) in sample]
        t0 = time.perf_counter()
        for dt, attr in ((ref.body_dtype, "floor"), (ref.trainer_dtype, "floor_trainer")):
            if attr == "floor_trainer" and dt == ref.body_dtype:
                continue
            for s, f in zip(sampled, _measure_floor(scorer, sampled, dt, progress).values()):
                setattr(s, attr, f.astype(np.float32).astype(np.float64))
        ref.seconds["floor"] = time.perf_counter() - t0
        ref.stats = scorer.stats
    finally:
        scorer.close()
        weights.close()


def _measure_floor(scorer: ReferenceScorer, seqs: list[RefSeq], dtype: str,
                   progress: Callable[[str], None] | None) -> dict[int, np.ndarray]:
    """Per sampled sequence (by ``id``), per token: |the reference computed in ``dtype``
    (fp32 head) - the reference computed exactly| (``inf`` where the two disagree on
    whether the token is inside the truncated support)."""
    other = EXACT_OF[dtype] if dtype == "float32" else dtype   # the float32 side is the reference itself
    if progress:
        progress(f"floor: {dtype} against {EXACT_OF[dtype]}, {len(seqs)} sequences")
    res = scorer.score([Seq(id(s), s.prompt_ids, s.output_ids, [s.dist], list(s.versions)) for s in seqs],
                       dtype=other, head_dtype="float32")
    floors = {}
    for s in seqs:
        a, b = res[id(s)][0], s.lp_sampler
        with np.errstate(invalid="ignore"):
            d = np.abs(a - b)
        same_support = np.isneginf(a) == np.isneginf(b)
        floors[id(s)] = np.where(np.isfinite(a) & np.isfinite(b), d, np.where(same_support, 0.0, np.inf))
    return floors


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float64)


def _write(path: Path, seqs: list[RefSeq], keys: dict, generation: int, semantics: str, floor_dtype: str) -> None:
    from replay.record.recorder import Recorder
    from replay.rerun.replayer import _interrupt_after

    with _interrupt_after(), Recorder(path, rank=REFERENCE_RANK, mode="append", strict=True) as w:
        for s in seqs:
            w.reference(step=s.step, request_id=s.request_id, ref_key=keys[(s.step, s.request_id)],
                        generation=generation, token_versions=s.versions.astype(np.int64),
                        trainer_version=s.trainer_version,
                        lp_sampler=s.lp_sampler.astype(np.float32), lp_tempered=s.lp_tempered.astype(np.float32),
                        lp_sampler_tr=s.lp_sampler_tr.astype(np.float32),
                        lp_tempered_tr=s.lp_tempered_tr.astype(np.float32),
                        floor=None if s.floor is None else s.floor.astype(np.float32),
                        floor_trainer=None if s.floor_trainer is None else s.floor_trainer.astype(np.float32),
                        floor_dtype=floor_dtype, trainer_semantics=semantics)
