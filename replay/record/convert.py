"""Array conversion for the recorder: cheap caller-side copies, columnar Arrow in the writer.

Three parts:

* :func:`snapshot` runs on the caller's thread. It copies what the caller may reuse
  (a list, a numpy array, a torch tensor): a list of numbers becomes a numpy array
  (``np.array``: the copy and the conversion in one pass over the Python objects, so
  the writer thread needs the GIL only briefly; measured cheaper end to end than
  copying the list and converting a whole batch with ``pa.array`` in the writer), a
  list it cannot convert is copied as is for validation to reject, a numpy array is
  copied, a CPU tensor is copied into a new numpy array (bfloat16 widened to
  float32). A CUDA tensor is copied into a pinned host buffer with
  ``non_blocking=True`` on the tensor's current stream and a CUDA event is recorded
  after the copy; the writer thread waits on that event, so the caller never
  synchronises the device.
* :func:`flat_column` runs on the writer thread. It turns one list column of a batch
  (one value per row) into a flat numpy array plus per-row lengths with one
  ``np.concatenate``, and Arrow list arrays are built from flat values + offsets
  (:func:`list_array`), so no per-element Python work happens there. A value that
  cannot be converted fails only its own row.
* ``build_rows`` / ``build_topk`` / ``build_simple`` turn a batch of queued calls
  into one Arrow record batch of a table, with ``time_ns`` and ``rank`` filled in,
  running the checks of :mod:`replay.record.validate` vectorised over the batch (unless the
  calls were checked on the caller's thread) and setting refused rows aside.

torch is imported only when a value is a torch tensor (``type(x).__module__``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# What a list column holds: the numpy dtype it is stored with, and whether its values
# must be integers (ids, versions) or may be any real number (logprobs, entropy).
KINDS: dict[str, tuple[np.dtype, bool]] = {
    "int32": (np.dtype(np.int32), True),
    "int64": (np.dtype(np.int64), True),
    "float32": (np.dtype(np.float32), False),
}
_INT_LIMITS = {k: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for k, (d, integral) in KINDS.items() if integral}


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


# numpy dtype a CPU tensor is copied into (bfloat16, which numpy lacks, widens to float32)
_NUMPY_OF_TORCH = {"torch.float32": np.float32, "torch.float64": np.float64, "torch.float16": np.float16,
                   "torch.bfloat16": np.float32, "torch.int64": np.int64, "torch.int32": np.int32,
                   "torch.int16": np.int16, "torch.int8": np.int8, "torch.uint8": np.uint8, "torch.bool": np.bool_}


@dataclass
class HostCopy:
    """A device-to-host copy in flight: ``buf`` is valid once ``event`` has completed."""

    buf: Any     # pinned CPU torch tensor receiving the copy
    event: Any   # torch.cuda.Event recorded on the source stream after the copy

    def wait(self) -> Any:
        self.event.synchronize()
        return self.buf


def _torch_snapshot(x: Any) -> Any:
    import torch

    t = x.detach()
    if t.device.type == "cpu":  # straight into a numpy array of our own: the copy, and no more work
        dtype = _NUMPY_OF_TORCH.get(str(t.dtype))
        if dtype is None:  # a dtype numpy lacks: validation names it
            return t.clone()
        out = np.empty(tuple(t.shape), dtype)
        torch.from_numpy(out).copy_(t)  # out owns its memory: no tensor stays alive (or GC-tracked)
        return out
    if t.device.type != "cuda":
        return t.to("cpu")  # other devices (mps, xpu): a blocking copy is all torch offers
    with torch.cuda.device(t.device):
        stream = torch.cuda.current_stream(t.device)
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        buf.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return HostCopy(buf, event)


def snapshot(x: Any) -> Any:
    """A copy of ``x`` the caller may not change any more; cheap, never raises for odd types.

    Values of types the recorder does not know pass through untouched, so that
    validation (not the caller's call) decides what to do with them.
    """
    if type(x) is list or type(x) is tuple:
        # One pass over the Python objects, here: the copy the caller needs is also the
        # conversion the writer needs, and the writer thread then holds the GIL only briefly.
        try:
            arr = np.array(x)
        except (ValueError, TypeError, OverflowError):  # ragged or odd: the writer names the problem
            arr = None
        if arr is not None and arr.dtype.kind in "iuf" and arr.ndim <= 2:
            return arr
        if x and isinstance(x[0], (list, tuple)):
            return list(map(list, x))  # 2-D (top-k): copy the rows too
        return list(x)
    if isinstance(x, np.ndarray):
        return x.copy()
    if is_torch(x):
        return _torch_snapshot(x)
    return x


def snapshot_scalar(x: Any) -> Any:
    """:func:`snapshot` for a value that is usually a Python number (kept as is, cheaply)."""
    if x is None or type(x) in (float, int):
        return x
    return snapshot(x)


def resolve(x: Any) -> Any:
    """Writer side: finish a :func:`snapshot` (wait for the device copy, torch -> numpy)."""
    if isinstance(x, HostCopy):
        x = x.wait()
    if is_torch(x):
        import torch

        if x.dtype == torch.bfloat16:
            return x.float().numpy()
        return x.numpy()
    return x


class ConversionError(ValueError):
    """One row's value could not be converted; ``reason`` says why."""


def _dtype_ok(dtype: np.dtype, kind: str) -> bool:
    return dtype.kind in ("iu" if KINDS[kind][1] else "iuf")


def _dtype_reason(arr: np.ndarray, kind: str) -> str | None:
    k = arr.dtype.kind
    if KINDS[kind][1]:
        if k not in "iu" and not (k == "f" and arr.size == 0):  # np.array([]) is float64
            return f"dtype {arr.dtype} is not an integer dtype"
    elif k not in "iuf":
        return f"dtype {arr.dtype} is not numeric"
    return None


def row_array(value: Any, kind: str, ndim: int = 1) -> np.ndarray:
    """One row's value as a numpy array of ``kind``'s dtype; :class:`ConversionError` if it cannot be."""
    value = resolve(value)
    if isinstance(value, np.ndarray):
        arr = value
        reason = _dtype_reason(arr, kind)
        if reason:
            raise ConversionError(reason)
    elif isinstance(value, (list, tuple)):
        try:
            arr = np.array(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConversionError(f"not a numeric sequence: {e}") from None
        reason = _dtype_reason(arr, kind)
        if reason:
            raise ConversionError(reason.replace("dtype object", "a value that is not a number")
                                  if arr.dtype.kind == "O" else reason)
    else:
        raise ConversionError(f"expected a list, numpy array or torch tensor, got {type(value).__name__}")
    if arr.ndim != ndim:
        raise ConversionError(f"expected {ndim}-D values, got shape {arr.shape}")
    return _checked_cast(arr, kind)


def _checked_cast(arr: np.ndarray, kind: str) -> np.ndarray:
    """Cast to ``kind``'s dtype, refusing integers the cast would change (2**40 -> int32)."""
    dtype, integral = KINDS[kind]
    if integral and arr.size and arr.dtype != dtype:
        lo, hi = _INT_LIMITS[kind]
        if int(arr.min()) < lo or int(arr.max()) > hi:
            raise ConversionError(f"value out of range for {dtype}")
    return arr.astype(dtype, copy=False)


def flat_column(values: list[Any], kind: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(flat values, length per row, {row index: reason}) for one list column of a batch.

    Rows that fail get length 0 and a reason. When every row is a 1-D array of a
    fitting dtype (the usual case: :func:`snapshot` turns lists into arrays) the
    column is one ``np.concatenate`` and one vectorised range check.
    """
    dtype = KINDS[kind][0]
    if set(map(type, values)) != {np.ndarray}:
        values = [resolve(v) for v in values]
    if values and set(map(type, values)) == {np.ndarray} and all(
            nd == 1 and _dtype_ok(dt, kind) for dt, nd in {(v.dtype, v.ndim) for v in values}):
        try:
            flat = np.concatenate(values) if len(values) > 1 else values[0]
            lengths = np.fromiter(map(len, values), np.int64, len(values))
            return _checked_cast(flat, kind), lengths, {}
        except ConversionError:
            pass  # one row is out of range: find it below
    parts, lengths, bad = [], np.zeros(len(values), np.int64), {}
    for i, v in enumerate(values):
        try:
            a = row_array(v, kind)
        except ConversionError as e:
            bad[i] = str(e)
            continue
        parts.append(a)
        lengths[i] = len(a)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), lengths, bad


def list_array(flat: np.ndarray, lengths: np.ndarray, mask: pa.Array | None = None) -> pa.ListArray:
    """An Arrow list array from flat values and per-row lengths (no per-element Python work)."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask)


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
    from replay.record import validate as v

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


def topk_arrays(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n,k] int32, logprobs [n,k] float32, positions [n] int32) of one top-k call."""
    ids = _field_array(row.get("ids"), "int32", 2, "ids")
    lps = _field_array(row.get("logprobs"), "float32", 2, "logprobs")
    pos = row.get("positions")
    pos = np.arange(ids.shape[0], dtype=np.int32) if pos is None else _field_array(pos, "int32", 1, "positions")
    return ids, lps, pos


def _field_array(value: Any, kind: str, ndim: int, field: str) -> np.ndarray:
    try:
        return row_array(value, kind, ndim)
    except ConversionError as e:
        raise ConversionError(f"{field}: {e}") from None


def _topk_fast(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The arrays of a well-shaped top-k call, not yet cast or range-checked; None otherwise."""
    ids, lps, pos = (resolve(row.get(k)) for k in ("ids", "logprobs", "positions"))
    if not (type(ids) is np.ndarray and type(lps) is np.ndarray and ids.ndim == 2 and lps.shape == ids.shape
            and _dtype_reason(ids, "int32") is None and _dtype_reason(lps, "float32") is None):
        return None
    if pos is None:
        return ids, lps, np.arange(ids.shape[0], dtype=np.int32)
    if type(pos) is np.ndarray and pos.shape == (ids.shape[0],) and _dtype_reason(pos, "int32") is None:
        return ids, lps, pos
    return None


def _topk_columns(rows: list[dict]) -> list[tuple] | None:
    """:func:`_topk_fast` for a whole batch with a few set operations; None unless all are well-shaped."""
    ids = [r.get("ids") for r in rows]
    lps = [r.get("logprobs") for r in rows]
    pos = [r.get("positions") for r in rows]
    if not (set(map(type, ids)) == {np.ndarray} == set(map(type, lps))
            and all(nd == 2 and _dtype_ok(dt, "int32") for dt, nd in {(a.dtype, a.ndim) for a in ids})
            and all(_dtype_ok(dt, "float32") for dt in {a.dtype for a in lps})
            and [a.shape for a in ids] == [a.shape for a in lps]):
        return None
    types = set(map(type, pos))
    if types == {type(None)}:
        pos = [np.arange(a.shape[0], dtype=np.int32) for a in ids]
    elif not (types == {np.ndarray} and all(nd == 1 and _dtype_ok(dt, "int32") for dt, nd in
                                            {(p.dtype, p.ndim) for p in pos})
              and [len(p) for p in pos] == [a.shape[0] for a in ids]):
        return None
    return list(zip(ids, lps, pos))


def _topk_problem(row: dict) -> Any:
    """The slow, per-call check that names what is wrong with a top-k call (None if nothing)."""
    from replay.record import validate as v

    try:
        return v.check_topk(*topk_arrays(row))
    except ConversionError as e:
        field, _, reason = str(e).partition(": ")
        return v.Problem(field, reason)


def _topk_flats(mats: list, check: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Flat ids, logprobs and positions of several calls; None when ``check`` finds a bad value."""
    from replay.record.validate import LOGPROB_MAX

    try:
        ids = _checked_cast(_concat([m[0].ravel() for m in mats], np.int32), "int32")
        pos = _checked_cast(_concat([m[2] for m in mats], np.int32), "int32")
    except ConversionError:
        return None
    lps = _concat([m[1].ravel() for m in mats], np.float32).astype(np.float32, copy=False)
    if check and lps.size and not (ids.min() >= 0 and np.isfinite(lps).all() and lps.max() <= LOGPROB_MAX
                                   and (pos.size == 0 or pos.min() >= 0)):
        return None
    return ids, lps, pos


def build_topk(schema: pa.Schema, items: list[tuple], rank: int, tracker: Any) -> Built:
    """One row per position of each top-k call; values concatenated and checked per batch."""
    from replay.record import validate as v

    rows = [row_of(it) for it in items]
    check = not all(it[CHECKED] for it in items)
    scalars, bad = v.check_scalar_columns("topk", rows, check)
    whole = _topk_columns(rows)
    mats: dict[int, tuple] = {}
    for i, row in enumerate(rows):
        if i in bad:
            continue
        m = whole[i] if whole is not None else _topk_fast(row)
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
    from replay.record import validate as v

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
