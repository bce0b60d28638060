"""Row validation for the recorder: what a row must look like before it is written.

Checks, per table (schema in :mod:`replay.schema`):

* scalars: ``step`` an int >= 0, ``request_id`` a non-empty str, optional fields of
  the right type (numbers are Python, numpy or 0-d tensor scalars; bool is no number);
  top-k ``source`` one of engine / trainer / replay;
* arrays (vectorised over a whole batch): numeric dtypes, ids integers in int32 and
  >= 0, logprobs finite and <= :data:`LOGPROB_MAX` (a tiny positive rounding is
  allowed), the per-token columns of one row of equal length, top-k ids and logprobs
  of equal shape ``[n, k]``. ``-inf`` is a real logprob (probability zero) where a
  distribution was truncated: top-k entries under processed logprobs (outside top-k /
  top-p) and replayed logprobs of forced tokens outside a config's support; it is
  accepted in ``topk`` and ``replays``, never NaN or ``+inf``;
* order (:class:`StepTracker`): a request seen at step ``s`` of a table cannot
  appear there again at a smaller step, and ``(step, request_id)`` is unique in rollouts.

Every check returns a :class:`Problem` (field and reason) instead of raising, so one
function serves both modes: strict raises :class:`~replay.errors.BadInput` from it
on the caller's thread, lenient writes it to the ``rejects`` table.
"""
from __future__ import annotations

import json
import math
from operator import itemgetter
from dataclasses import dataclass
from typing import Any

import numpy as np

from replay.record.arrays import ConversionError, HostCopy, is_torch, resolve, row_array, topk_arrays

LOGPROB_MAX = 1e-6  # largest logprob accepted: log(1) plus rounding
TOPK_SOURCES = ("engine", "trainer", "replay")

# list columns per table: name -> (kind for replay.record.convert, required)
LIST_COLUMNS: dict[str, dict[str, tuple[str, bool]]] = {
    "rollouts": {"prompt_ids": ("int32", True), "output_ids": ("int32", True),
                 "logprobs": ("float32", True), "token_versions": ("int64", False)},
    "trainer": {"logprobs": ("float32", True), "entropy": ("float32", False)},
    "replays": {"logprobs": ("float32", False), "output_ids": ("int32", False)},
    "reference": {"token_versions": ("int64", False), "lp_sampler": ("float32", True),
                  "lp_tempered": ("float32", True), "lp_sampler_tr": ("float32", False),
                  "lp_tempered_tr": ("float32", False), "floor": ("float32", False),
                  "floor_trainer": ("float32", False)},
}
# columns that must have one value per output token, per table
SAME_LENGTH: dict[str, tuple[str, ...]] = {
    "rollouts": ("output_ids", "logprobs", "token_versions"),
    "trainer": ("logprobs", "entropy"),
    "replays": ("output_ids", "logprobs"),
    "reference": ("lp_sampler", "lp_tempered", "token_versions", "lp_sampler_tr", "lp_tempered_tr", "floor",
                  "floor_trainer"),
}
# tables whose (step, request_id) order is checked: a request's steps never go back
ORDERED_TABLES = ("rollouts", "trainer", "topk")
# tables whose logprobs may be -inf (a token outside a truncated distribution)
NEG_INF_OK = ("topk", "replays", "reference")
ID_COLUMNS = ("prompt_ids", "output_ids")
LOGPROB_COLUMNS = ("logprobs", "lp_sampler", "lp_tempered", "lp_sampler_tr", "lp_tempered_tr")

# scalar columns per table: name -> (type tag, required); tags checked by _scalar_reason
SCALARS: dict[str, dict[str, tuple[str, bool]]] = {
    "events": {"kind": ("str", True), "step": ("step", False), "weight_version": ("int", False),
               "request_id": ("str", False)},
    "rollouts": {"step": ("step", True), "request_id": ("str", True), "group_id": ("str", False),
                 "reward": ("real", False), "finish_reason": ("str", False),
                 "temperature": ("real", False), "top_p": ("real", False), "top_k": ("int", False),
                 "seed": ("int", False), "logprobs_mode": ("str", False), "engine": ("str", False),
                 "engine_config": ("str", False), "num_cached_tokens": ("count", False)},
    "trainer": {"step": ("step", True), "request_id": ("str", True),
                "weight_version": ("int", False), "advantage": ("real", False)},
    "topk": {"step": ("step", True), "request_id": ("str", True), "source": ("source", True)},
    "metrics": {"step": ("step", True), "source": ("str", False)},
    "weights": {"version": ("step", True), "step": ("step", False), "sha256": ("str", True),
                "path": ("str", False)},
    "replays": {"step": ("step", True), "request_id": ("str", True), "engine_config": ("str", True),
                "config": ("str", False), "engine": ("str", False), "mode": ("str", True),
                "replay_id": ("str", True), "first_diff": ("count", False)},
    "reference": {"step": ("step", True), "request_id": ("str", True), "ref_key": ("str", True),
                  "generation": ("count", True), "trainer_version": ("int", False),
                  "floor_dtype": ("str", False), "trainer_semantics": ("str", False)},
}


@dataclass(frozen=True)
class Problem:
    """Why one row is refused."""

    field: str   # the offending field
    reason: str  # what is wrong with it, in words


def scalar(x: Any) -> Any:
    """A Python scalar for numpy scalars, 0-d / 1-element arrays and tensors; anything else unchanged."""
    if is_torch(x) or isinstance(x, HostCopy):
        x = resolve(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray) and x.size == 1:
        return x.reshape(()).item()
    return x


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _scalar_reason(tag: str, x: Any) -> str | None:
    if tag == "str":
        if not isinstance(x, str) or not x:
            return f"expected a non-empty str, got {x!r:.80}"
    elif tag in ("step", "count"):
        if not _is_int(x) or x < 0:
            return f"expected an int >= 0, got {x!r:.80}"
    elif tag == "int":
        if not _is_int(x):
            return f"expected an int, got {x!r:.80}"
    elif tag == "real":
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"expected a number, got {x!r:.80}"
    elif tag == "source":
        if x not in TOPK_SOURCES:
            return f"expected one of {', '.join(TOPK_SOURCES)}, got {x!r:.80}"
    return None


# the Python types each tag accepts without a closer look (the common case, kept cheap)
_FAST = {"str": (str,), "step": (int,), "count": (int,), "int": (int,), "real": (float, int), "source": (str,)}
_SCALAR_ITEMS = {t: [(n, tag, req, _FAST[tag]) for n, (tag, req) in f.items()] for t, f in SCALARS.items()}


def check_scalars(table: str, row: dict) -> Problem | None:
    """Normalise the scalar fields of ``row`` in place (numpy/tensor -> Python) and check them:
    :func:`check_scalar_columns` for one call, on the caller's thread in strict mode (the batch
    function costs 5x more per call); both apply :func:`_checked` to each value."""
    for item in _SCALAR_ITEMS.get(table, ()):
        x = row.get(item[0])
        if x is None or type(x) not in item[3] or item[1] != "real":
            value, problem = _checked(item, x)
            if problem:
                return problem
            if value is not x:
                row[item[0]] = value
    return None


def _checked(item: tuple, x: Any) -> tuple[Any, Problem | None]:
    """One scalar value under its field's rule (``item``: name, tag, required, fast types):
    the value as a Python scalar, and its problem or None."""
    name, tag, required, fast = item
    if x is None:
        return None, Problem(name, "required field is missing") if required else None
    if type(x) not in fast:
        x = scalar(x)
    elif tag == "real":
        return x, None   # a float or an int: nothing more to check
    reason = _scalar_reason(tag, x)
    return x, Problem(name, reason) if reason else None


_NONE = type(None)
_FAST_SETS = {tag: frozenset(types) | {_NONE} for tag, types in _FAST.items()}


def check_scalar_columns(table: str, rows: list[dict], check: bool = True) -> tuple[dict[str, list], dict[int, Problem]]:
    """The scalar columns of a batch ({name: values}) and {row index: first problem}.

    The same rules as :func:`check_scalars`, a column at a time: a column of plain
    Python values passes with a few C-level set and min operations; only a column
    holding something else (numpy scalars, tensors, bad values) is walked row by row.
    """
    cols: dict[str, list] = {}
    bad: dict[int, Problem] = {}
    items = _SCALAR_ITEMS.get(table, ())
    for item, vals in zip(items, _columns(rows, [it[0] for it in items])):
        vals = cols[item[0]] = list(vals)
        if not check:
            continue
        types = set(map(type, vals))
        if types <= _FAST_SETS[item[1]] and _column_ok(item[1], item[2], vals, types):
            continue
        for i, x in enumerate(vals):
            vals[i], problem = _checked(item, x)
            if problem:
                bad.setdefault(i, problem)
    return cols, bad


def _columns(rows: list[dict], names: list[str]) -> list:
    """The values of ``names`` in ``rows``, one sequence per name (missing keys give None)."""
    if len(names) > 1 and rows:
        try:  # rows made by the recorder hold every field: transpose them in C
            return list(zip(*map(itemgetter(*names), rows)))
        except KeyError:
            pass
    return [[r.get(n) for r in rows] for n in names]


def _column_ok(tag: str, required: bool, vals: list, types: set) -> bool:
    """True when a column of plain Python values (or None) needs no row-by-row look."""
    if _NONE in types:
        if required:
            return False
        vals = [v for v in vals if v is not None]
    if tag in ("step", "count"):
        return not vals or min(vals) >= 0
    if tag == "str":
        return "" not in vals
    if tag == "source":
        return set(vals) <= set(TOPK_SOURCES)
    return True


def check_metric_values(values: Any) -> Problem | None:
    if not isinstance(values, dict) or not values:
        return Problem("values", f"expected a non-empty dict of name -> number, got {values!r:.80}")
    for name, v in values.items():
        if not isinstance(name, str) or not name:
            return Problem("values", f"metric name {name!r:.80} is not a non-empty str")
        v = scalar(v)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return Problem("values", f"metric {name!r} is {v!r:.80}, not a number")
    return None


def _rows_of(idx: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row index of each flat element index, given per-row lengths."""
    return np.searchsorted(np.cumsum(lengths), idx, side="right")


def check_arrays(table: str, cols: dict[str, tuple[np.ndarray, np.ndarray]],
                 present: dict[str, np.ndarray], n: int) -> dict[int, Problem]:
    """Vectorised checks of a batch's list columns: {row index: problem}.

    ``cols[name]`` is (flat values, length per row); ``present[name]`` marks the rows
    that gave a value for an optional column.
    """
    bad: dict[int, Problem] = {}

    def mark(rows: np.ndarray, field: str, reason: str) -> None:
        for i in np.unique(rows).tolist():
            bad.setdefault(i, Problem(field, reason))

    for name in ID_COLUMNS:
        if name in cols:
            flat, lengths = cols[name]
            neg = np.flatnonzero(flat < 0)
            if neg.size:
                mark(_rows_of(neg, lengths), name, "negative token id")
    for name in LOGPROB_COLUMNS:
        if name in cols:
            flat, lengths = cols[name]
            ok = np.isfinite(flat)
            if not ok.all() and table in NEG_INF_OK:  # the rare path: one more pass only here
                ok |= np.isneginf(flat)
            if not ok.all():
                mark(_rows_of(np.flatnonzero(~ok), lengths), name,
                     "logprob is NaN or +inf" if table in NEG_INF_OK else "logprob is NaN or infinite")
            over = np.flatnonzero(flat > LOGPROB_MAX)
            if over.size:
                mark(_rows_of(over, lengths), name, f"logprob > 0 (above {LOGPROB_MAX:g})")
    if "entropy" in cols:
        flat, lengths = cols["entropy"]
        nonfinite = np.flatnonzero(~np.isfinite(flat))
        if nonfinite.size:
            mark(_rows_of(nonfinite, lengths), "entropy", "entropy is NaN or infinite")
    same = [c for c in SAME_LENGTH.get(table, ()) if c in cols]
    if len(same) > 1:
        ref = cols[same[0]][1]
        for name in same[1:]:
            lengths = cols[name][1]
            diff = (lengths != ref) & present.get(name, np.ones(n, bool))
            if diff.any():
                mark(np.flatnonzero(diff), name, f"length differs from {same[0]}")
    return bad


def check_topk(ids: np.ndarray, logprobs: np.ndarray, pos: np.ndarray) -> Problem | None:
    """Checks of one top-k call: ids and logprobs ``[n, k]`` of equal shape, positions ``[n]``."""
    if ids.ndim != 2:
        return Problem("ids", f"expected shape [n_tokens, k], got {list(ids.shape)}")
    if logprobs.shape != ids.shape:
        return Problem("logprobs", f"shape {list(logprobs.shape)} differs from ids {list(ids.shape)}")
    if pos.shape != (ids.shape[0],):
        return Problem("positions", f"expected {ids.shape[0]} positions, got shape {list(pos.shape)}")
    return check_topk_values(ids, logprobs, pos)


def check_topk_values(ids: np.ndarray, logprobs: np.ndarray, pos: np.ndarray) -> Problem | None:
    """The value rules of top-k calls, on one call's arrays or on several calls' concatenated:
    ids and positions >= 0, logprobs neither NaN nor +inf (-inf: outside the support) nor above 0."""
    if ids.size and ids.min() < 0:
        return Problem("ids", "negative token id")
    if pos.size and pos.min() < 0:
        return Problem("positions", "negative position")
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
        return Problem("logprobs", "logprob is NaN or +inf")
    if logprobs.size and logprobs.max() > LOGPROB_MAX:
        return Problem("logprobs", f"logprob > 0 (above {LOGPROB_MAX:g})")
    return None


def check_row(table: str, row: dict, tracker: "StepTracker") -> Problem | None:
    """All checks of one call, on the caller's thread (strict mode).

    Converts the row's arrays in place (so the writer only concatenates) and, when the
    row passes, records its step in ``tracker``.
    """
    p = check_scalars(table, row)
    if p is None and table == "metrics":
        p = check_metric_values(row.get("values"))
    if p is not None:
        return p
    if table == "topk":
        try:
            ids, lps, pos = topk_arrays(row)
        except ConversionError as e:
            field, _, reason = str(e).partition(": ")
            return Problem(field, reason)
        row.update(ids=ids, logprobs=lps, positions=pos)
        p = check_topk(ids, lps, pos)
    elif table in LIST_COLUMNS:
        cols, present = {}, {}
        for name, (kind, required) in LIST_COLUMNS[table].items():
            value = row.get(name)
            if value is None:
                if required:
                    return Problem(name, "required field is missing")
                continue
            try:
                arr = row[name] = row_array(value, kind)
            except ConversionError as e:
                return Problem(name, str(e))
            cols[name] = (arr, np.array([len(arr)]))
            present[name] = np.ones(1, bool)
        p = check_arrays(table, cols, present, 1).get(0)
    if p is None and table in ORDERED_TABLES:
        p = tracker.check(table, row["step"], row["request_id"])
        if p is None:
            tracker.commit(table, row["step"], row["request_id"])
    return p


class StepTracker:
    """Per-table order checks: steps of a request never go back; rollouts (step, request) unique.

    Keeps the largest step seen per (table, request_id). Not thread-safe: one owner.
    """

    def __init__(self) -> None:
        self._last: dict[str, dict[str, int]] = {}

    def check(self, table: str, step: int, request_id: str) -> Problem | None:
        last = self._last.get(table, {}).get(request_id)
        if last is None:
            return None
        if step < last:
            return Problem("step", f"request {request_id!r} was already recorded at step {last} "
                                   f"in {table}: steps cannot go backwards")
        if table == "rollouts" and step == last:
            return Problem("request_id", f"duplicate rollout: step {step}, request {request_id!r} "
                                         "was already recorded")
        return None

    def commit(self, table: str, step: int, request_id: str) -> None:
        seen = self._last.setdefault(table, {})
        if seen.get(request_id, -1) < step:
            seen[request_id] = step

    def admit(self, table: str, steps: list, request_ids: list, skip: dict) -> dict[int, Problem]:
        """Check and commit a batch's rows in order (rows in ``skip`` are left out): {row: problem}."""
        seen = self._last.setdefault(table, {})
        bad: dict[int, Problem] = {}
        get = seen.get
        for i, (step, rid) in enumerate(zip(steps, request_ids)):
            if i in skip:
                continue
            last = get(rid)
            if last is None or step > last:
                seen[rid] = step
            elif (p := self.check(table, step, rid)) is not None:
                bad[i] = p
        return bad


# ---------------------------------------------------------------- rejected rows as JSON

def _plain(x: Any) -> Any:
    """``x`` as JSON-safe Python: arrays as lists, NaN/inf as strings, unknown types as repr."""
    if is_torch(x) or isinstance(x, HostCopy):
        try:
            x = resolve(x)
        except Exception:  # noqa: BLE001 - a row that cannot even be copied is still described
            return repr(x)
    if isinstance(x, np.ndarray):
        x = x.tolist()
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)  # 'nan', 'inf', '-inf'
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return repr(x)


def row_json(row: dict) -> str:
    """The row as a JSON object that keeps everything the caller gave."""
    return json.dumps(_plain(row), allow_nan=False)
