"""Batches of recorder calls as Arrow record batches, in the writer thread.

``build_rows`` / ``build_topk`` / ``build_simple`` turn a batch of queued calls into one
Arrow record batch of a table, with ``time_ns`` and ``rank`` filled in, running the checks
of :mod:`replay.record.validate` vectorised over the batch (unless the calls were checked on
the caller's thread) and setting refused rows aside. The values themselves were copied and
are converted by :mod:`replay.record.arrays`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from replay.record import validate as v
from replay.record.arrays import (
    KINDS, ConversionError, checked_cast, dtype_fits, flat_column, list_array, resolve, topk_arrays,
)

# ---------------------------------------------------------------- rows -> Arrow batches

# One call of the recorder as queued for the writer thread: a plain tuple
# (table, field names, field values, time_ns, checked, tokens), read with the indexes
# below and :func:`row_of`. A tuple of strings, numbers, arrays and such tuples is
# dropped from the garbage collector's tracking (a dict inside would keep it tracked),
# so the calls waiting in the queue add nothing to the full collections of a process
# that has torch loaded (~100 ms each, measured: one per ~4000 queued calls otherwise).
TABLE, KEYS, VALUES, TIME_NS, CHECKED, TOKENS = range(6)


def Item(table: str, row: dict, time_ns: int, checked: bool, tokens: int = 0) -> tuple:  # noqa: N802
    """table: the table written to; row: field -> value (arrays already snapshotted);
    time_ns: wall clock at call time; checked: validated on the caller's thread (strict);
    tokens: output tokens (or top-k positions) it holds, for batching."""
    return (table, tuple(row), tuple(row.values()), time_ns, checked, tokens)


def row_of(item: tuple) -> dict:
    """The row (field -> value) of a queued item."""
    return dict(zip(item[KEYS], item[VALUES]))


@dataclass
class Built:
    """A batch built from items: the Arrow batch (None if no row survived) and the refused items."""

    batch: pa.RecordBatch | None
    rejects: list[tuple[tuple, Any]]  # (item, validate.Problem)
    tokens: int                      # output tokens (rollouts, trainer) or top-k positions written


def _scalars(schema: pa.Schema, rows: list[dict], names: list[str]) -> dict[str, pa.Array]:
    return {n: pa.array([r.get(n) for r in rows], type=schema.field(n).type) for n in names}


def _common(schema: pa.Schema, items: list[tuple], rank: int) -> dict[str, pa.Array]:
    n = len(items)
    return {"time_ns": pa.array(np.fromiter((it[TIME_NS] for it in items), np.int64, n)),
            "rank": pa.array(np.full(n, rank, np.int32))}


def _batch(schema: pa.Schema, cols: dict[str, pa.Array]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


def build_rows(table: str, schema: pa.Schema, items: list[tuple], rank: int, tracker: Any) -> Built:
    """Rows of a table with list columns (rollouts, trainer, replays, reference): list columns
    flattened per batch, validated unless checked."""
    rows = [row_of(it) for it in items]
    n = len(rows)
    check = not all(it[CHECKED] for it in items)
    scalars, bad = v.check_scalar_columns(table, rows, check)
    cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    present: dict[str, np.ndarray] = {}
    names = list(v.LIST_COLUMNS[table])
    for (name, (kind, required)), vals in zip(v.LIST_COLUMNS[table].items(), v._columns(rows, names)):
        vals = list(vals)
        has = (np.fromiter((x is not None for x in vals), bool, n) if type(None) in set(map(type, vals))
               else np.ones(n, bool))
        if not has.all():
            if required:
                for i in np.flatnonzero(~has).tolist():
                    bad.setdefault(i, v.Problem(name, "required field is missing"))
            empty = np.zeros(0, KINDS[kind][0])
            vals = [x if x is not None else empty for x in vals]
        flat, lengths, conv_bad = flat_column(vals, kind)
        for i, reason in conv_bad.items():
            bad.setdefault(i, v.Problem(name, reason))
        cols[name], present[name] = (flat, lengths), has
    if check:
        for i, p in v.check_arrays(table, cols, present, n).items():
            bad.setdefault(i, p)
        # order checks, in call order, for the rows that passed the rest
        if table in v.ORDERED_TABLES:
            bad.update(tracker.admit(table, scalars["step"], scalars["request_id"], bad))
    rejects = [(items[i], p) for i, p in sorted(bad.items())]
    if bad:
        keep = np.ones(n, bool)
        keep[list(bad)] = False
        for name, (flat, lengths) in cols.items():
            cols[name] = (flat[np.repeat(keep, lengths)], lengths[keep])
            present[name] = present[name][keep]
        keep_l = keep.tolist()
        scalars = {k: [x for x, ok in zip(vals, keep_l) if ok] for k, vals in scalars.items()}
        items = [it for it, ok in zip(items, keep_l) if ok]
    if not items:
        return Built(None, rejects, 0)
    arrays = _common(schema, items, rank)
    for name, (flat, lengths) in cols.items():
        mask = None if present[name].all() else pa.array(~present[name])
        arrays[name] = list_array(flat, lengths, mask)
    for name, vals in scalars.items():
        arrays[name] = pa.array(vals, type=schema.field(name).type)
    tok = {"rollouts": "output_ids", "reference": "lp_sampler"}.get(table, "logprobs")
    return Built(_batch(schema, arrays), rejects, int(cols[tok][1].sum()))


def _topk_columns(rows: list[dict]) -> list[tuple] | None:
    """The arrays of each top-k call (ids, logprobs, positions), not yet cast or range-checked,
    when every call is well-shaped; None otherwise. Dtypes are checked once per distinct
    dtype, so a batch costs a few set operations."""
    ids: list[Any] = [resolve(r.get("ids")) for r in rows]
    lps: list[Any] = [resolve(r.get("logprobs")) for r in rows]
    pos: list[Any] = [resolve(r.get("positions")) for r in rows]
    if not (set(map(type, ids)) == {np.ndarray} == set(map(type, lps))
            and all(nd == 2 and dtype_fits(dt, "int32", empty)
                    for dt, nd, empty in {(a.dtype, a.ndim, a.size == 0) for a in ids})
            and all(dtype_fits(dt, "float32", empty) for dt, empty in {(a.dtype, a.size == 0) for a in lps})
            and [a.shape for a in ids] == [a.shape for a in lps]):
        return None
    types = set(map(type, pos))
    if types == {type(None)}:
        pos = [np.arange(a.shape[0], dtype=np.int32) for a in ids]
    elif not (types == {np.ndarray} and all(nd == 1 and dtype_fits(dt, "int32", empty) for dt, nd, empty in
                                            {(p.dtype, p.ndim, p.size == 0) for p in pos})
              and [len(p) for p in pos] == [a.shape[0] for a in ids]):
        return None
    return list(zip(ids, lps, pos))


def _topk_problem(row: dict) -> Any:
    """The slow, per-call check that names what is wrong with a top-k call (None if nothing)."""
    try:
        return v.check_topk(*topk_arrays(row))
    except ConversionError as e:
        field, _, reason = str(e).partition(": ")
        return v.Problem(field, reason)


def _topk_flats(mats: list, check: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Flat ids, logprobs and positions of several calls; None when ``check`` finds a bad value."""
    try:
        ids = checked_cast(_concat([m[0].ravel() for m in mats], np.int32), "int32")
        pos = checked_cast(_concat([m[2] for m in mats], np.int32), "int32")
    except ConversionError:
        return None
    lps = _concat([m[1].ravel() for m in mats], np.float32).astype(np.float32, copy=False)
    if check and v.check_topk_values(ids, lps, pos) is not None:
        return None
    return ids, lps, pos


def build_topk(schema: pa.Schema, items: list[tuple], rank: int, tracker: Any) -> Built:
    """One row per position of each top-k call; values concatenated and checked per batch."""
    rows = [row_of(it) for it in items]
    check = not all(it[CHECKED] for it in items)
    scalars, bad = v.check_scalar_columns("topk", rows, check)
    whole = _topk_columns(rows)
    mats: dict[int, tuple] = {}
    for i, row in enumerate(rows):
        if i in bad:
            continue
        one = whole[i:i + 1] if whole is not None else _topk_columns([row])
        m = one[0] if one else None
        if m is None:
            bad[i] = _topk_problem(row) or v.Problem("ids", "top-k values of an unexpected kind")
        else:
            mats[i] = m
    n_ok = len(mats)
    flats = _topk_flats(list(mats.values()), check=not all(it[CHECKED] for it in items))
    if flats is None:  # some call holds a bad value: find it, one call at a time
        for i in list(mats):
            if p := _topk_problem(rows[i]):
                bad[i] = p
                del mats[i]
    steps, rids = scalars["step"], scalars["request_id"]
    if check:  # order checks, in call order
        late = tracker.admit("topk", steps, rids, {i: None for i in range(len(rows)) if i not in mats})
        for i, p in late.items():
            bad[i] = p
            del mats[i]
    rejects = [(items[i], p) for i, p in sorted(bad.items())]
    if not mats:
        return Built(None, rejects, 0)
    if flats is None or len(mats) < n_ok:  # calls were dropped after the first concatenation
        flats = _topk_flats(list(mats.values()), check=False)
    assert flats is not None  # every call left converts: each passed _topk_problem's conversions
    ids, lps, pos = flats
    kept = list(mats)
    counts = np.array([mats[i][0].shape[0] for i in kept], np.int64)
    k_len = np.repeat(np.array([mats[i][0].shape[1] for i in kept], np.int64), counts)
    cols = {
        "step": pa.array(np.repeat(np.array([steps[i] for i in kept], np.int64), counts)),
        "request_id": _repeat_str([rids[i] for i in kept], counts),
        "source": _repeat_str([scalars["source"][i] for i in kept], counts),
        "time_ns": pa.array(np.repeat(np.array([items[i][TIME_NS] for i in kept], np.int64), counts)),
        "rank": pa.array(np.full(len(pos), rank, np.int32)),
        "pos": pa.array(pos),
        "ids": list_array(ids, k_len),
        "logprobs": list_array(lps, k_len),
    }
    return Built(_batch(schema, cols), rejects, len(pos))


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _repeat_str(values: list[str], counts: np.ndarray) -> pa.Array:
    """``values[i]`` repeated ``counts[i]`` times."""
    return pa.array(values, type=pa.string()).take(pa.array(np.repeat(np.arange(len(values)), counts)))


def build_simple(table: str, schema: pa.Schema, items: list[tuple], rank: int) -> Built:
    """Events, metrics, weights and rejects: scalar columns only."""
    rows, times, rejects = [], [], []
    for it in items:
        row = row_of(it)
        p = None
        if not it[CHECKED] and table in v.SCALARS:
            p = v.check_scalars(table, row)
            if p is None and table == "metrics":
                p = v.check_metric_values(row.get("values"))
        if p is not None:
            rejects.append((it, p))
            continue
        if table == "metrics":
            for name, value in row["values"].items():
                value = v.scalar(value)
                rows.append({"step": row["step"], "name": name, "source": row.get("source"),
                             "value": None if value is None else float(value)})
                times.append(it[TIME_NS])
        else:
            rows.append(row)
            times.append(it[TIME_NS])
    if not rows:
        return Built(None, rejects, 0)
    cols = {"time_ns": pa.array(np.array(times, np.int64)),
            "rank": pa.array(np.full(len(rows), rank, np.int32))}
    cols.update(_scalars(schema, rows, [f.name for f in schema if f.name not in cols]))
    return Built(_batch(schema, cols), rejects, 0)
