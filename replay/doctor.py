"""``replay doctor``: check a recording on disk, and repair what can be repaired.

Checks every closed segment (opens, row count and sha256 match the manifest), every
open segment (complete batches, torn tail), every weight blob (sha256 through the
whole delta chain), the state of each rank's writer, and temporary files an
interrupted write left behind (``*.tmp``: never read). With ``repair=True`` it
salvages ranks whose writer died, sets aside closed segments that cannot be read
(renamed ``*.arrow.corrupt``, so the recording opens again), rebuilding them from
their stream when one is left, and removes the temporary files once no writer of the
recording is alive.

The report is a JSON-ready dict: ``problems`` (each with ``path``, ``reason`` and
``repaired``), ``notes`` (the same shape, for what does not touch the data, such as
temporary files) and ``counts``; ``ok`` is True when no problem is left unrepaired.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from ._views import base_schema, check_types, scan_table
from .errors import RecordingError, ReplayError
from .manifest import overall_status, read_manifest, writer_alive
from .salvage import (Part, check_file, dead_ranks, manifest_or_error, one_line, rank_entries,
                      read_stream, salvage, scan_parts, sha256_file)
from .weights import WeightStore


def _listed_segments(man: dict) -> dict[str, dict]:
    """Closed segments the manifest lists, by path relative to the recording."""
    out: dict[str, dict] = {}
    for _, entry in rank_entries(man).values():
        segs = entry.get("segments")
        items: list = []
        if isinstance(segs, list):
            items = segs
        elif isinstance(segs, dict):  # {table: [entries]}
            items = [s for v in segs.values() if isinstance(v, list) for s in v]
        for s in items:
            if isinstance(s, dict) and isinstance(s.get("path"), str):
                out[s["path"]] = s
    return out


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class _Report:
    """Problems and counts gathered by :func:`doctor`."""

    def __init__(self) -> None:
        self.problems: list[dict] = []
        self.notes: list[dict] = []             # harmless findings: ``ok`` does not depend on them
        self.counts = {"closed_segments": 0, "open_segments": 0, "rows": 0, "open_rows": 0,
                       "skipped_bytes": 0, "weight_blobs": 0, "salvaged_ranks": 0, "set_aside": 0,
                       "tmp_files": 0}

    def add(self, path: str, reason: str, repaired: bool = False) -> None:
        self.problems.append({"path": path, "reason": reason, "repaired": repaired})


def doctor(path: str | os.PathLike, *, repair: bool = True) -> dict:
    """Check the recording at ``path``; see the module doc for the report."""
    root = Path(path)
    man = manifest_or_error(root)
    rep = _Report()
    parts = scan_parts(root)
    dead = dead_ranks(root, man, parts)
    if dead:  # salvage first, so the checks below see the result
        if _salvage_dead(root, dead, repair, rep):
            man, parts = read_manifest(root), scan_parts(root)
    listed = _listed_segments(man)
    alive = {r: writer_alive(root, r) for r in {p.rank for ps in parts.values() for p in ps}}
    lists_segments = {r for r, (_, e) in rank_entries(man).items() if e.get("segments") is not None}
    leftover: set[int] = set()  # ranks of finished writers that left open segments
    for table, ps in parts.items():
        for p in ps:
            if p.file is not None:
                _check_closed(root, table, p, listed, p.rank in lists_segments and not alive.get(p.rank),
                              repair and not alive.get(p.rank), rep)
            if p.stream is not None and not alive.get(p.rank):  # a live writer's tail is not a problem
                if _check_open(root, p, repair, rep):
                    leftover.add(p.rank)
    if leftover:
        done = salvage(root, sorted(leftover), leftovers=True)
        if done.in_memory:
            for pr in rep.problems:
                if pr["repaired"] and pr["reason"].startswith("open segment"):
                    pr["repaired"] = False
                    pr["reason"] += f" (not done: {done.reason})"
    _check_listed(root, listed, rep)
    _check_weights(root, rep.problems, rep.counts)
    man = read_manifest(root)
    _check_tmp(root, man, repair, rep)
    return {"path": str(root), "status": overall_status(man), "repair": repair,
            "ok": all(p["repaired"] for p in rep.problems),
            "problems": rep.problems, "notes": rep.notes, "counts": rep.counts}


def _salvage_dead(root: Path, dead: list[int], repair: bool, rep: _Report) -> bool:
    """Report (and with ``repair``, salvage) ranks whose writer died; True if files changed."""
    where = ", ".join(f"rank-{r:04d}" for r in dead)
    if not repair:
        rep.add(where, "writer is gone without closing (status recording): run doctor with "
                "repair to salvage it")
        return False
    done = salvage(root, dead)
    if done.in_memory:
        rep.add(where, f"writer is gone and {done.reason}: cannot salvage")
        return False
    rep.counts["salvaged_ranks"] = len(done.ranks)
    rep.counts["skipped_bytes"] += done.skipped_bytes
    rep.add(where, f"writer is gone without closing: salvaged {done.rows} rows in {done.batches} "
            f"batches, {done.skipped_bytes} bytes of torn tails skipped", repaired=True)
    return True


def _check_closed(root: Path, table: str, p: Part, listed: dict[str, dict], must_be_listed: bool,
                  repair: bool, rep: _Report) -> None:
    """Check one closed segment against the manifest; set it aside when unreadable."""
    rel = _rel(root, p.file)
    try:
        schema, _, rows = check_file(p.file)
        check_types(schema, base_schema(table), p.file)
    except RecordingError as e:
        if not repair:
            rep.add(rel, e.msg)
            return
        aside = p.file.with_name(p.file.name + ".corrupt")
        try:
            os.replace(p.file, aside)
        except OSError as err:
            rep.add(rel, f"{e.msg} (cannot set it aside: {one_line(err)})")
            return
        rep.counts["set_aside"] += 1
        extra = "; its open stream is read instead" if p.stream else ""
        rep.add(rel, f"{e.msg}: set aside as {aside.name}{extra}", repaired=True)
        p.file = None
        return
    rep.counts["closed_segments"] += 1
    rep.counts["rows"] += rows
    want = listed.get(rel)
    if want is not None:
        if want.get("rows") is not None and want["rows"] != rows:
            rep.add(rel, f"has {rows} rows, the manifest says {want['rows']}")
        if want.get("sha256") and want["sha256"] != sha256_file(p.file):
            rep.add(rel, "sha256 differs from the manifest's: the file changed after it was closed")
    elif must_be_listed:
        rep.add(rel, "not listed in the manifest (its rows are still read)")
    if p.stream is not None:  # the closed file wins; its stream is a leftover of the close
        srel = _rel(root, p.stream)
        if repair:
            try:
                p.stream.unlink(missing_ok=True)
                rep.add(srel, "left over next to its closed file: removed (the closed file "
                        "holds its rows)", repaired=True)
            except OSError as err:
                rep.add(srel, f"left over next to its closed file (cannot remove it: {one_line(err)})")
        else:
            rep.add(srel, "left over next to its closed file (the closed file is read)")
        p.stream = None


def _check_open(root: Path, p: Part, repair: bool, rep: _Report) -> bool:
    """Check one open segment of a finished writer; True if it should be closed."""
    rel = _rel(root, p.stream)
    try:
        c = read_stream(p.stream)
    except FileNotFoundError:
        return False
    rep.counts["open_segments"] += 1
    rep.counts["open_rows"] += c.rows
    rep.counts["skipped_bytes"] += c.skipped_bytes
    tail = f"; {c.error} ({c.skipped_bytes} bytes unreadable)" if c.error else ""
    if not repair:
        rep.add(rel, f"open segment of a finished writer{tail} (its rows are read)")
        return False
    rep.add(rel, f"open segment of a finished writer{tail}: closed as "
            f"{p.stream.with_suffix('.arrow').name} with its {c.rows} rows", repaired=True)
    return True


def _check_listed(root: Path, listed: dict[str, dict], rep: _Report) -> None:
    """Segments the manifest lists but that are gone, or that point outside the recording
    (never read: readers list the folder, not the manifest)."""
    inside = root.resolve()
    for rel in sorted(listed):
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not (root / rel).resolve().is_relative_to(inside):
            rep.add(rel, "the manifest lists a segment outside the recording: refused, never read")
        elif not (root / rel).exists() and not (root / (rel + ".corrupt")).exists():
            rep.add(rel, "listed in the manifest but missing from the recording: its rows are lost")


def _check_tmp(root: Path, man: dict, repair: bool, rep: _Report) -> None:
    """Temporary files of writes that never finished (atomic replace not reached)."""
    tmp = sorted(p for p in root.rglob("*.tmp") if p.is_file())
    if not tmp:
        return
    rep.counts["tmp_files"] = len(tmp)
    if any(writer_alive(root, r) for r in rank_entries(man)):
        return  # a live writer may be in the middle of one of these writes
    for p in tmp:
        rel = _rel(root, p)
        what = f"temporary file of an interrupted write ({p.stat().st_size} bytes, never read)"
        if not repair:
            rep.notes.append({"path": rel, "reason": what, "repaired": False})
            continue
        try:
            p.unlink()
            rep.notes.append({"path": rel, "reason": what + ": removed", "repaired": True})
        except OSError as err:
            rep.notes.append({"path": rel, "reason": f"{what} (cannot remove it: {one_line(err)})",
                              "repaired": False})


def _check_weights(root: Path, problems: list[dict], counts: dict) -> None:
    try:
        table = scan_table("weights", scan_parts(root, ("weights",))["weights"]).dataset.to_table(
            columns=["version", "sha256", "blob"], filter=pc.field("blob").is_valid())
    except (RecordingError, OSError, pa.ArrowException) as e:
        problems.append({"path": "weights", "reason": f"weights table unreadable: {one_line(e)}",
                         "repaired": False})
        return
    store = WeightStore(root)
    seen = set()
    for row in table.to_pylist():
        key = (row["blob"], row["sha256"])
        if key in seen:
            continue
        seen.add(key)
        counts["weight_blobs"] += 1
        try:
            store.load_bytes(row["blob"], row["sha256"])
        except ReplayError as e:
            problems.append({"path": row["blob"], "reason": f"weight version {row['version']}: "
                             f"{e}", "repaired": False})
