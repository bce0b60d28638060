"""``replay doctor``: check a recording on disk, and repair what can be repaired.

Checks every closed segment (opens, types, row count and sha256 against the manifest),
every open segment (complete batches, torn tail), every weight blob (sha256 through the
whole delta chain), the manifest's own entries (files gone, paths outside the folder),
closed files the manifest does not list, the state of each rank's writer, and temporary
files an interrupted write left behind (``*.tmp``: never read).

With ``repair=True`` (the default) it leaves a consistent recording, one that readers
open without refusing:

* a lost, cut or replaced manifest is rebuilt from the segments themselves (the run's
  header from ``run.json``), the damaged one kept as ``manifest.json.corrupt``;
* ranks whose writer died are salvaged (their open segments closed and listed);
* closed segments that cannot be read, or differ from the manifest (rows, bytes,
  sha256), are set aside (renamed ``*.arrow.corrupt``: nothing is deleted) and their
  entries dropped; a stream left beside one is closed in its place;
* closed files the manifest does not list are adopted when readable and new, and set
  aside (``*.arrow.duplicate``) when they copy a listed segment;
* entries whose file is gone, or that point outside the recording, are dropped;
* temporary files are removed once no writer of the recording is alive.

Segments of a live writer are never touched. The report is a JSON-ready dict:
``problems`` (each with ``path``, ``reason``, ``repaired`` and, where rows were lost,
``rows_lost``), ``notes`` (the same shape, for what does not touch the data) and
``counts`` (``rows_lost`` in total); ``ok`` is True when no problem is left unrepaired.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from replay.read.views import base_schema, check_types, scan_table
from replay.errors import RecordingError, ReplayError
from replay.errors import one_line
from replay.store.manifest import (listed_segments, manifest_or_error, now_iso, overall_status, rank_entries,
                                   read_manifest, run_header, segment_entry, update_manifest, write_atomic,
                                   writer_alive)
from replay.store.salvage import dead_ranks, salvage
from replay.store.segments import Part, check_file, outside, part_path, read_stream, scan_parts, sha256_file
from replay.schema import MANIFEST, RUN_FILE, SCHEMA_VERSION
from replay.store.weights import WeightStore


class _Report:
    """Problems and counts gathered by :func:`doctor`."""

    def __init__(self) -> None:
        self.problems: list[dict] = []
        self.notes: list[dict] = []             # harmless findings: ``ok`` does not depend on them
        self.counts = {"closed_segments": 0, "open_segments": 0, "rows": 0, "open_rows": 0,
                       "skipped_bytes": 0, "weight_blobs": 0, "salvaged_ranks": 0, "set_aside": 0,
                       "adopted": 0, "dropped_entries": 0, "rows_lost": 0, "tmp_files": 0}

    def add(self, path: str, reason: str, repaired: bool = False, rows_lost: int | None = None) -> None:
        item = {"path": path, "reason": reason, "repaired": repaired}
        if rows_lost:
            item["rows_lost"] = rows_lost
            if repaired:
                self.counts["rows_lost"] += rows_lost
        self.problems.append(item)


class _Edits:
    """Changes to the manifest's segment lists, applied in one update at the end."""

    def __init__(self) -> None:
        self.drop: set[str] = set()                        # paths whose entries go
        self.add: list[tuple[int, dict]] = []              # (rank, segment entry with its table)

    def __bool__(self) -> bool:
        return bool(self.drop or self.add)

    def apply(self, root: Path) -> None:
        def change(man: dict) -> None:
            entries = rank_entries(man)
            for _, entry in entries.values():
                segs = entry.get("segments")
                if isinstance(segs, dict):
                    for t, v in list(segs.items()):
                        if isinstance(v, list):
                            segs[t] = [s for s in v if not (isinstance(s, dict) and s.get("path") in self.drop)]
                elif isinstance(segs, list):
                    entry["segments"] = [s for s in segs if not (isinstance(s, dict) and s.get("path") in self.drop)]
            for rank, seg in self.add:
                if rank in entries:
                    key, entry = entries[rank]
                else:
                    key, entry = str(rank), {"status": "salvaged", "salvaged_at": now_iso()}
                    man.setdefault("ranks", {})[key] = entry
                    entries[rank] = (key, entry)
                seg = dict(seg)
                table = seg.pop("table")
                segs = entry.get("segments")
                if not isinstance(segs, dict):
                    segs = entry["segments"] = {}
                segs.setdefault(table, []).append(seg)
        update_manifest(root, change)


def doctor(path: str | os.PathLike, *, repair: bool = True) -> dict:
    """Check the recording at ``path``; see the module doc for the report."""
    root = Path(path)
    rep = _Report()
    man = _manifest(root, repair, rep)
    parts = scan_parts(root)
    dead = dead_ranks(root, man, parts)
    if dead:
        if _salvage_dead(root, dead, repair, rep):
            man, parts = read_manifest(root), scan_parts(root)
    listed = listed_segments(man)
    alive = {r: writer_alive(root, r) for r in {p.rank for ps in parts.values() for p in ps}}
    edits = _Edits()
    hashes: dict[str, str] = {}  # sha256 -> listed path, of the listed segments that check out
    unlisted: list[Part] = []
    leftover: set[int] = set()  # ranks of finished writers that left open segments
    for table, ps in parts.items():
        for p in ps:
            if alive.get(p.rank):  # a live writer's segments are its own: counted, not touched
                rep.counts["closed_segments"] += p.file is not None
                continue
            is_listed = p.file is not None and part_path(p) in listed
            if is_listed:
                _check_listed_file(root, table, p, listed[part_path(p)], repair, rep, edits, hashes)
            elif p.file is not None and p.stream is None:
                unlisted.append(p)
            if p.stream is not None:
                if is_listed and p.file is not None:  # listed, and it checked out: the stream is spare
                    _leftover_stream(root, p, repair, rep)
                elif _check_open(root, p, repair, rep):  # the salvage closes it (keeping a good file)
                    leftover.add(p.rank)
    for p in unlisted:
        _check_unlisted(root, p, repair, rep, edits, hashes)
    _check_entries(root, listed, parts, repair, rep, edits)
    if repair and edits:
        edits.apply(root)
    if leftover:
        done = salvage(root, sorted(leftover), leftovers=True)
        if done.in_memory:
            for pr in rep.problems:
                if pr["repaired"] and pr["reason"].startswith("open segment"):
                    pr["repaired"] = False
                    pr["reason"] += f" (not done: {done.reason})"
    _check_weights(root, rep)
    _check_model(root, rep)
    if not man.pop("_rebuilt", False):
        man = read_manifest(root)
    _check_tmp(root, man, repair, rep)
    return {"path": str(root), "status": overall_status(man), "repair": repair,
            "ok": all(p["repaired"] for p in rep.problems),
            "problems": rep.problems, "notes": rep.notes, "counts": rep.counts}


# ---------------------------------------------------------------- the manifest

def _manifest(root: Path, repair: bool, rep: _Report) -> dict:
    """The manifest; a lost or corrupt one is rebuilt from the segments (written when repairing,
    else only in memory, marked ``_rebuilt``)."""
    try:
        return manifest_or_error(root)
    except RecordingError as e:
        if e.title not in ("corrupt manifest", "damaged recording") or not root.is_dir():
            raise  # not a folder, or one with neither a manifest nor segments: no recording at all
        why = e.msg.split("; run `replay doctor")[0]
    man, note = _rebuilt_manifest(root)
    if not repair:
        rep.add(MANIFEST, f"{why}: it can be rebuilt from the segments ({note})")
        man["_rebuilt"] = True
        return man
    path = root / MANIFEST
    if path.exists():
        os.replace(path, _aside(path, "corrupt"))
    write_atomic(path, json.dumps(man, indent=1, sort_keys=True).encode())
    kept = f"; the damaged one is kept as {MANIFEST}.corrupt" if (root / f"{MANIFEST}.corrupt").exists() else ""
    rep.add(MANIFEST, f"{why}: rebuilt from the segments ({note}){kept}", repaired=True)
    return read_manifest(root)


def _rebuilt_manifest(root: Path) -> tuple[dict, str]:
    """A manifest from ``run.json`` and the closed segments on disk (one entry per readable,
    distinct file); ranks left with open segments stay ``recording`` for the salvage."""
    head, note = run_header(root), f"run header from {RUN_FILE}"
    if head is None:
        head, note = {}, f"no readable {RUN_FILE}: the run config is lost"
    man: dict[str, Any] = {"schema_version": head.get("schema_version") if isinstance(head.get("schema_version"), int)
                           else SCHEMA_VERSION, "run_id": head.get("run_id") or root.resolve().name,
                           "created_at": head.get("created_at"), "run_config": head.get("run_config") or {},
                           "ranks": {}, "rebuilt_at": now_iso()}
    seen: set[str] = set()
    n = 0
    for table, ps in scan_parts(root).items():
        for p in ps:
            entry = man["ranks"].setdefault(str(p.rank), {"status": "salvaged", "segments": {}})
            if p.stream is not None and not writer_alive(root, p.rank) and p.file is None:
                entry["status"] = "recording"  # the salvage closes its streams next
            if writer_alive(root, p.rank):
                entry["status"] = "recording"
            if p.file is None:
                continue
            try:
                schema, _, rows = check_file(p.file, hint=False)
                check_types(schema, base_schema(table), p.file)
            except RecordingError:
                continue  # left unlisted: the checks below set it aside
            seg = segment_entry(table, p.file, rows)
            if seg["sha256"] in seen:
                continue  # a copy: left unlisted, set aside below
            seen.add(seg["sha256"])
            entry["segments"].setdefault(seg.pop("table"), []).append(seg)
            n += 1
    man["status"] = overall_status(man)
    return man, f"{n} segments listed; {note}"


# ---------------------------------------------------------------- segments

def _aside(path: Path, tag: str) -> Path:
    """A free name beside ``path`` to set it aside under (``part-00002.arrow.corrupt``, ``.corrupt.1``)."""
    dest = path.with_name(f"{path.name}.{tag}")
    i = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.{tag}.{i}")
        i += 1
    return dest


def _set_aside(root: Path, p: Part, tag: str, why: str, rep: _Report, *, rows_lost: int | None = None,
               edits: _Edits | None = None) -> bool:
    """Rename ``p``'s closed file out of the readers' way; True when done."""
    rel = part_path(p)
    dest = _aside(p.file, tag)
    try:
        os.replace(p.file, dest)
    except OSError as err:
        rep.add(rel, f"{why} (cannot set it aside: {one_line(err)})", rows_lost=rows_lost)
        return False
    rep.counts["set_aside"] += 1
    extra = ""
    if p.stream is not None:
        extra = f"; its stream {p.stream.name} is closed in its place"
        rows_lost = None  # the stream holds the rows
    if edits is not None:
        edits.drop.add(rel)
        rep.counts["dropped_entries"] += 1
    lost = f"; {rows_lost} rows lost" if rows_lost else ""
    rep.add(rel, f"{why}: set aside as {dest.name}{extra}{lost}", repaired=True, rows_lost=rows_lost)
    p.file = None
    return True


def _readable(table: str, p: Part) -> tuple[int | None, str | None]:
    """(rows, None) for a closed segment that opens with its table's types, else (None, why)."""
    try:
        schema, _, rows = check_file(p.file, hint=False)
        check_types(schema, base_schema(table), p.file)
    except RecordingError as e:
        return None, e.msg
    return rows, None


def _check_listed_file(root: Path, table: str, p: Part, want: dict, repair: bool, rep: _Report,
                       edits: _Edits, hashes: dict[str, str]) -> None:
    """A closed segment the manifest lists: readable, and the rows, bytes and hash it lists."""
    rel = part_path(p)
    listed_rows = want.get("rows") if isinstance(want.get("rows"), int) else None
    rows, why = _readable(table, p)
    if why is None:
        size = p.file.stat().st_size
        if isinstance(want.get("bytes"), int) and want["bytes"] != size:
            why = f"has {size} bytes, the manifest says {want['bytes']}"
        elif want.get("sha256") and want["sha256"] != sha256_file(p.file):
            why = "its sha256 differs from the manifest's: the file changed after it was closed"
    if why is None:
        assert rows is not None  # _readable gives the rows whenever it finds nothing wrong
        rep.counts["closed_segments"] += 1
        rep.counts["rows"] += rows
        if want.get("sha256"):
            hashes.setdefault(want["sha256"], rel)
        if listed_rows is not None and listed_rows != rows:  # the bytes are the recorded ones: the entry is wrong
            if repair:
                edits.drop.add(rel)
                edits.add.append((p.rank, segment_entry(table, p.file, rows)))
            rep.add(rel, f"the manifest says {listed_rows} rows, the file (whose sha256 matches) holds "
                    f"{rows}" + (": entry corrected" if repair else ""), repaired=repair)
        return
    if not repair:
        rep.add(rel, f"{why} (readers refuse the recording until it is set aside)", rows_lost=listed_rows)
        return
    _set_aside(root, p, "corrupt", why, rep, rows_lost=listed_rows, edits=edits)


def _check_unlisted(root: Path, p: Part, repair: bool, rep: _Report, edits: _Edits,
                    hashes: dict[str, str]) -> None:
    """A closed file of a finished writer that the manifest does not list (never read)."""
    rel = part_path(p)
    rows, why = _readable(p.table, p)
    if why is not None:
        if repair:
            _set_aside(root, p, "corrupt", f"not listed in the manifest and {why}", rep)
        else:
            rep.add(rel, f"not listed in the manifest (not read) and {why}")
        return
    assert rows is not None  # _readable gives the rows whenever it finds nothing wrong
    sha = sha256_file(p.file)
    copy_of = hashes.get(sha)
    if copy_of is not None:
        why = f"not listed in the manifest: a byte-for-byte copy of {copy_of} (not read)"
        if repair:
            _set_aside(root, p, "duplicate", why, rep)
        else:
            rep.add(rel, why)
        return
    if not repair:
        rep.add(rel, f"not listed in the manifest (its {rows} rows are not read): repair adopts it")
        return
    seg = segment_entry(p.table, p.file, rows)
    edits.add.append((p.rank, seg))
    hashes[sha] = rel
    rep.counts["adopted"] += 1
    rep.counts["closed_segments"] += 1
    rep.counts["rows"] += rows
    rep.add(rel, f"not listed in the manifest: adopted with its {rows} rows", repaired=True)


def _check_entries(root: Path, listed: dict[str, dict], parts: dict[str, list[Part]], repair: bool,
                   rep: _Report, edits: _Edits) -> None:
    """Entries whose file is gone, or that point outside the recording (never read)."""
    inside = root.resolve()
    on_disk = {part_path(p) for ps in parts.values() for p in ps if p.file is not None}
    for rel in sorted(listed):
        rows = listed[rel].get("rows") if isinstance(listed[rel].get("rows"), int) else None
        if outside(rel) or not (root / rel).resolve().is_relative_to(inside):
            why, lost = "the manifest lists a segment outside the recording (never read)", None
        elif rel in on_disk or rel in edits.drop or rel.split("/")[0] not in parts:
            continue  # checked above; or a table this replay does not read
        else:
            why, lost = "listed in the manifest but missing from the recording", rows
        if not repair:
            rep.add(rel, f"{why}: readers refuse the recording until the entry is dropped", rows_lost=lost)
            continue
        edits.drop.add(rel)
        rep.counts["dropped_entries"] += 1
        rep.add(rel, f"{why}: entry dropped" + (f"; {lost} rows lost" if lost else ""),
                repaired=True, rows_lost=lost)


def _salvage_dead(root: Path, dead: list[int], repair: bool, rep: _Report) -> bool:
    """Report (and with ``repair``, salvage) ranks whose writer died; True if files changed."""
    where = ", ".join(f"rank-{r:04d}" for r in dead)
    if not repair:
        rep.add(where, "writer is gone without closing (status recording): its complete batches "
                "are read in place; repair salvages it")
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


def _leftover_stream(root: Path, p: Part, repair: bool, rep: _Report) -> None:
    """A stream beside its closed file, which a finished close did not remove."""
    srel = _rel(root, p.stream)
    if not repair:
        rep.add(srel, "left over next to its closed file (the listed file is read)")
        return
    try:
        p.stream.unlink(missing_ok=True)
        rep.add(srel, "left over next to its closed file: removed (the closed file holds its rows)",
                repaired=True)
    except OSError as err:
        rep.add(srel, f"left over next to its closed file (cannot remove it: {one_line(err)})")
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


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------- the rest

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


def _check_weights(root: Path, rep: _Report) -> None:
    try:
        table = scan_table("weights", scan_parts(root, tables=("weights",))["weights"]).dataset.to_table(
            columns=["version", "sha256", "blob"], filter=pc.field("blob").is_valid())
    except (RecordingError, OSError, pa.ArrowException) as e:
        rep.add("weights", f"weights table unreadable: {one_line(e)}")
        return
    store = WeightStore(root)
    seen = set()
    for row in table.to_pylist():
        key = (row["blob"], row["sha256"])
        if key in seen:
            continue
        seen.add(key)
        rep.counts["weight_blobs"] += 1
        try:
            store.load_bytes(row["blob"], row["sha256"])
        except ReplayError as e:
            rep.add(row["blob"], f"weight version {row['version']}: {e}")


def _check_model(root: Path, rep: _Report) -> None:
    """The model the recording carries (``Recorder.model``): every file against its sha256.
    Nothing to repair: a replay then needs ``--model``."""
    from replay.store.model import stored_model

    try:
        stored_model(root)
    except RecordingError as e:
        rep.add("model", e.msg)
