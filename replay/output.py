"""Output of the ``replay`` command line: aligned tables, JSON and CSV.

The JSON shapes are an API (scripts parse them):

* a query result: ``{"columns": [names], "types": [DuckDB types], "rows": [[values]]}``;
* ``info`` and ``doctor``: the dict the library returns, keys sorted.

Values keep their JSON type; lists stay lists; bytes become hex; non-finite floats
become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers).
CSV lists and nested values as JSON text; a ``NULL`` is an empty field.
"""
from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

FORMATS = ("table", "json", "csv")
CELL_WIDTH = 40   # widest table cell before it is cut with an ellipsis
LIST_ITEMS = 6    # list items a table cell shows before "… +N"


@dataclass
class Rows:
    """A query result to print."""

    columns: list[str]   # column names
    types: list[str]     # DuckDB type names, as text
    rows: list[tuple]    # the values


# ---------------------------------------------------------------- values

def jsonable(v: Any) -> Any:
    """``v`` as plain JSON values (see the module doc)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, decimal.Decimal):
        return jsonable(float(v))
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return jsonable(v.tolist())
    return str(v)


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(1, width - 1)] + "…"


def cell(v: Any, width: int = CELL_WIDTH) -> str:
    """One value as a short, readable table cell."""
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        shown = ", ".join(cell(x, width) for x in v[:LIST_ITEMS])
        more = f", … +{len(v) - LIST_ITEMS}" if len(v) > LIST_ITEMS else ""
        return _cut(f"[{shown}{more}]", width)
    if isinstance(v, dict):
        return _cut(json.dumps(jsonable(v), sort_keys=True), width)
    return _cut(" ".join(str(jsonable(v)).split()) if not isinstance(v, str) else
                v.replace("\n", "\\n"), width)


def _csv_field(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(jsonable(v))
    j = jsonable(v)
    return j if not isinstance(j, (list, dict)) else json.dumps(j)


# ---------------------------------------------------------------- renderers

def table(columns: list[str], rows: Iterable[Iterable[Any]], *,
          max_rows: int | None = None) -> str:
    """An aligned text table; numbers right-aligned, long values cut.

    With ``max_rows``, rows past it are not shown (pass one extra row to have the
    table say that more exist).
    """
    listed = [list(r) for r in rows]
    shown = listed if max_rows is None else listed[:max_rows]
    cells = [[cell(v) for v in r] for r in shown]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in shown if r[i] is not None) for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    if len(listed) > len(shown):
        out.append(f"… more rows (first {len(shown)} shown; --max-rows to show more)")
    else:
        out.append(f"({len(listed)} row{'s' if len(listed) != 1 else ''})")
    return "\n".join(out)


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``[("a.b", 1), ("c.0", x), ("c.1", y)]``."""
    if isinstance(d, dict) and d:
        out = []
        for k in d:
            out += flatten(d[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = []
        for i, x in enumerate(d):
            out += flatten(x, f"{prefix}.{i}")
        return out
    return [(prefix, d)]


def mapping(d: dict, *, skip: tuple[str, ...] = ()) -> str:
    """A dict as aligned ``key  value`` lines (nested keys dotted)."""
    pairs = [(k, v) for k, v in flatten({k: v for k, v in d.items() if k not in skip})]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v, 80)}".rstrip() for k, v in pairs)


def to_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, sort_keys=isinstance(obj, dict))


def to_csv(columns: list[str], rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_field(v) for v in r])
    return buf.getvalue()


def rows_output(res: Rows, fmt: str, *, max_rows: int | None = None) -> str:
    if fmt == "json":
        return json.dumps({"columns": res.columns, "types": res.types,
                           "rows": [jsonable(list(r)) for r in res.rows]}, indent=None)
    if fmt == "csv":
        return to_csv(res.columns, res.rows).rstrip("\n")
    return table(res.columns, res.rows, max_rows=max_rows)


def info_output(info: dict, fmt: str) -> str:
    if fmt == "json":
        return to_json(info)
    if fmt == "csv":
        return to_csv(["key", "value"], flatten(info)).rstrip("\n")
    head = mapping(info, skip=("ranks", "run_config", "warnings"))
    ranks = table(["rank", "status", "writer_alive", "closed_segments", "open_segments"],
                  [[r.get(k) for k in ("rank", "status", "writer_alive", "closed_segments",
                                       "open_segments")] for r in info.get("ranks", [])])
    parts = [head, "", "ranks:", ranks]
    if info.get("warnings"):
        parts += ["", "warnings:"] + [f"  {w}" for w in info["warnings"]]
    if info.get("run_config") is not None:
        parts += ["", "run_config:", mapping({"run_config": info["run_config"]})]
    return "\n".join(parts)


def doctor_output(report: dict, fmt: str) -> str:
    cols = ["path", "reason", "repaired"]
    probs = [[p.get(c) for c in cols] for p in report.get("problems", [])]
    if fmt == "json":
        return to_json(report)
    if fmt == "csv":
        return to_csv(cols, probs).rstrip("\n")
    head = mapping(report, skip=("problems", "notes"))
    notes = [f"  [{'removed' if n.get('repaired') else 'note'}] {n.get('path')}: {n.get('reason')}"
             for n in report.get("notes", [])]
    tail = ["", "notes:"] + notes if notes else []
    if not probs:
        return "\n".join([head, "", "no problems found"] + tail)
    lines = [f"  [{'repaired' if r else 'PROBLEM'}] {p}: {why}" for p, why, r in probs]
    return "\n".join([head, "", "problems:"] + lines + tail)
