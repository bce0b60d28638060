"""Per-step and per-sequence mismatch numbers computed with numpy from the list columns.

The ``tokens`` / ``step_metrics`` views unnest every token in SQL; for the timeline
and the step view it is much faster to fetch one row per sequence (its logprob
lists as Arrow), flatten them without copying and aggregate with ``np.bincount``.
The formulas are those of :mod:`replay.metrics` (token-level clip rate, k3
``kl_new_old``, r in float64 from the two logprob columns); the tests check the
numbers against the SQL views.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay.metrics import clip_bounds, latest_scoring_key
from replay.read.recording import quote_ident

SEQ_COLUMNS = ("step", "request_id", "reward", "lr", "lt", "ent")


ROLLOUT_SQL = "SELECT step, request_id, reward, logprobs AS lr{extra} FROM {schema}.rollouts{where}"
TRAINER_SQL = ("SELECT step, request_id, rank, time_ns, logprobs AS lt, entropy AS ent, weight_version "
               "FROM {schema}.trainer{where}")


def fetch(cur, schema: str, step: int | None = None, extra: str = "") -> tuple[pa.Table, pa.Table]:
    """The rollouts (lists of engine logprobs) and trainer rows of ``schema`` (one step, or all)."""
    where, params = (" WHERE step = ?", [step]) if step is not None else ("", None)
    schema = quote_ident(schema)
    r = cur.sql(ROLLOUT_SQL.format(schema=schema, where=where, extra=extra), params=params).to_arrow_table()
    t = cur.sql(TRAINER_SQL.format(schema=schema, where=where), params=params).to_arrow_table()
    return r, t


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    """The values of a list column as one float array (no copy when Arrow allows it)."""
    flat = pc.list_flatten(col)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks() if flat.num_chunks != 1 else flat.chunk(0)
    arr = flat.to_numpy(zero_copy_only=False)
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def match_trainer(rollouts: pa.Table, trainer: pa.Table) -> np.ndarray:
    """For each rollout, the row of its latest trainer scoring (the views' rule,
    :func:`replay.metrics.latest_scoring_sql`), or -1."""
    keys_r = list(zip(rollouts.column("step").to_pylist(), rollouts.column("request_id").to_pylist()))
    keys_t = list(zip(trainer.column("step").to_pylist(), trainer.column("request_id").to_pylist()))
    if keys_r == keys_t and len(set(keys_t)) == len(keys_t):
        return np.arange(len(keys_r))
    order = [latest_scoring_key(*row) for row in zip(trainer.column("weight_version").to_pylist(),
                                                       trainer.column("rank").to_pylist(),
                                                       trainer.column("time_ns").to_pylist())]
    latest: dict = {}
    for j, k in enumerate(keys_t):
        if k not in latest or order[j] >= order[latest[k]]:
            latest[k] = j
    return np.array([latest.get(k, -1) for k in keys_r], dtype=np.int64)


def _aligned(flat: np.ndarray, len_t: np.ndarray, j: np.ndarray, len_r: np.ndarray) -> np.ndarray:
    """Trainer values (``flat`` with lengths ``len_t``) at the rollouts' token positions; NaN where none."""
    n_tok = int(len_r.sum())
    if len(j) == len(len_t) and np.array_equal(len_t, len_r) and np.array_equal(j, np.arange(len(j))):
        return flat                        # trainer rows 1:1 with the rollouts: no gather
    vals = np.full(n_tok, np.nan)
    if not n_tok or not len(len_t):
        return vals
    off_r = np.concatenate([[0], np.cumsum(len_r)[:-1]]).astype(np.int64)
    off_t = np.concatenate([[0], np.cumsum(len_t)[:-1]]).astype(np.int64)
    matched = j >= 0
    jj = np.where(matched, j, 0)
    same = matched & (len_t[jj] == len_r)
    seq = np.repeat(np.arange(len(len_r)), len_r)
    # sequences whose trainer list has the rollout's length: one vectorised gather
    tok_same = same[seq]
    src = (off_t[jj] - off_r)[seq] + np.arange(n_tok)
    vals[tok_same] = flat[src[tok_same]]
    # the rest (trainer list shorter or longer): position by position
    for i in np.nonzero(matched & ~same)[0]:
        n = min(len_t[jj[i]], len_r[i])
        vals[off_r[i]:off_r[i] + n] = flat[off_t[jj[i]]:off_t[jj[i]] + n]
    return vals


def tokens_of(rollouts: pa.Table, trainer: pa.Table) -> dict[str, np.ndarray]:
    """Per-token arrays over the rollouts' output tokens: lr, lt, ent (NaN where the trainer has none), r."""
    len_r = _lengths(rollouts.column("lr"))
    j = match_trainer(rollouts, trainer)
    out = {"lengths": len_r, "lr": _flat(rollouts.column("lr"))}
    for name in ("lt", "ent"):
        col = trainer.column(name)
        out[name] = _aligned(_flat(col), _lengths(col), j, len_r)
    out["r"] = np.subtract(out["lt"], out["lr"], dtype=np.float64)   # r in double, as replay.metrics
    return out


def _div(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    with np.errstate(invalid="ignore", divide="ignore"):
        q = a / b
    return [None if not np.isfinite(x) else float(x) for x in q]


WINDOW = 1 << 20  # tokens per pass: scratch arrays stay small and are reused


class _Groups:
    """Per-step sums over windows of the token axis (segments when the rows come in step order)."""

    def __init__(self, steps_of_seq: np.ndarray, lengths: np.ndarray):
        self.steps, self.seq_group = np.unique(steps_of_seq, return_inverse=True)
        self.k = len(self.steps)
        ordered = bool(np.all(np.diff(self.seq_group) >= 0)) if len(self.seq_group) else True
        per_group = np.bincount(self.seq_group, weights=lengths, minlength=self.k).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_group)[:-1]]).astype(np.int64)
        self.ends = self.starts + per_group
        self.tok_group = None if ordered else np.repeat(self.seq_group, lengths)

    def add(self, out: np.ndarray, values: np.ndarray, a: int) -> None:
        """``out[g] += sum of values of group g`` for the window of tokens starting at ``a``."""
        if not values.size:
            return
        if self.tok_group is not None:
            out += np.bincount(self.tok_group[a:a + values.size], weights=values, minlength=self.k)
            return
        g0 = np.searchsorted(self.ends, a, side="right")
        g1 = np.searchsorted(self.starts, a + values.size, side="left")
        gs = np.arange(g0, g1)
        gs = gs[self.ends[gs] > self.starts[gs]]
        if gs.size:
            out[gs] += np.add.reduceat(values, np.maximum(self.starts[gs] - a, 0), dtype=np.float64)


def _window_source(rollouts: pa.Table, trainer: pa.Table):
    """(number of tokens, get(name, a, b)) reading lr, lt, ent window by window.

    When the trainer rows line up with the rollouts (same order, same lengths) the
    windows are read straight from the Arrow buffers; otherwise the trainer values
    are aligned once (:func:`tokens_of`).
    """
    len_r = _lengths(rollouts.column("lr"))
    n_tok = int(len_r.sum())
    j = match_trainer(rollouts, trainer)
    one_to_one = len(j) == trainer.num_rows and np.array_equal(j, np.arange(len(j)))
    cols = {"lr": pc.list_flatten(rollouts.column("lr"))}
    for name in ("lt", "ent"):
        col = trainer.column(name)
        if one_to_one and np.array_equal(_lengths(col), len_r) and col.null_count == 0:
            cols[name] = pc.list_flatten(col)
        else:
            cols[name] = _aligned(_flat(col), _lengths(col), j, len_r)

    def get(name: str, a: int, b: int) -> np.ndarray:
        c = cols[name]
        if isinstance(c, np.ndarray):
            return c[a:b]
        return c.slice(a, b - a).to_numpy()
    return n_tok, len_r, get


def step_metrics(rollouts: pa.Table, trainer: pa.Table, eps: float = 0.2) -> dict[str, list]:
    """Columns step, n_tokens, mean_abs_log_ratio, kl_new_old, clip_rate, entropy, reward.

    One pass over the tokens in windows of :data:`WINDOW`: r in float64, unscored
    tokens (no trainer logprob) set to r = 0, which adds nothing to |r|, k3 or the
    clip count, and left out of the token count.
    """
    n_tok, len_r, get = _window_source(rollouts, trainer)
    groups = _Groups(rollouts.column("step").to_numpy(zero_copy_only=False).astype(np.int64), len_r)
    k = groups.k
    n, s_abs, s_kl, s_clip, s_ent, n_ent = (np.zeros(k) for _ in range(6))
    lo, hi = clip_bounds(eps, eps)
    for a in range(0, n_tok, WINDOW):
        b = min(a + WINDOW, n_tok)
        r = np.subtract(get("lt", a, b), get("lr", a, b), dtype=np.float64)
        ok = np.isfinite(r)
        if not ok.all():
            r[~ok] = 0.0
        groups.add(n, ok.astype(np.float64), a)
        buf = np.abs(r)
        groups.add(s_abs, buf, a)
        with np.errstate(over="ignore"):
            np.exp(r, out=buf)
        buf -= 1.0
        buf -= r
        groups.add(s_kl, buf, a)
        clip = r < lo
        clip |= r > hi
        groups.add(s_clip, clip.astype(np.float64), a)
        ent = get("ent", a, b).astype(np.float64)
        e_ok = np.isfinite(ent) & ok
        if not e_ok.all():
            ent[~e_ok] = 0.0
        groups.add(s_ent, ent, a)
        groups.add(n_ent, e_ok.astype(np.float64), a)
    reward = rollouts.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    has_rw = np.isfinite(reward)
    g = groups.seq_group
    return {
        "step": [int(x) for x in groups.steps],
        "n_tokens": [int(x) for x in n],
        "mean_abs_log_ratio": _div(s_abs, n),
        "kl_new_old": _div(s_kl, n),
        "clip_rate": _div(s_clip, n),
        "entropy": _div(s_ent, n_ent),
        "reward": _div(np.bincount(g[has_rw], reward[has_rw], minlength=k),
                       np.bincount(g[has_rw], minlength=k).astype(np.float64)),
    }


def sequence_stats(rollouts: pa.Table, trainer: pa.Table) -> dict[str, list]:
    """Per rollout: mean and max |r| over scored tokens (None when none scored)."""
    tok = tokens_of(rollouts, trainer)
    m = len(tok["lengths"])
    r = tok["r"]
    ok = np.isfinite(r)
    s, a = np.repeat(np.arange(m), tok["lengths"])[ok], np.abs(r[ok])
    n = np.bincount(s, minlength=m).astype(np.float64)
    mx = np.full(m, np.nan)
    if a.size:
        np.fmax.at(mx, s, a)
    return {"mean_abs": _div(np.bincount(s, a, minlength=m), n),
            "max_abs": [None if not np.isfinite(x) else float(x) for x in mx]}
