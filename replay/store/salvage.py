"""The salvage of ranks whose writer died.

:func:`salvage` turns the leftover streams of dead ranks (the manifest says ``recording`` but
nobody holds the rank's life lock) into closed files, with the writer's own
:func:`replay.store.segments.stream_to_file`, and marks those ranks ``salvaged`` in the
manifest, all under the manifest lock. A folder that cannot be written is salvaged in memory
only: the caller reads the streams instead. Only a local folder is salvaged (the life locks
are local files).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from replay.errors import RecordingError, one_line
from replay.schema import FILE_SUFFIX
from replay.store.manifest import (listed_segments, now_iso, rank_entries, segment_entry, update_manifest,
                                   writer_alive)
from replay.store.segments import Part, check_file, part_path, read_stream, scan_parts, stream_to_file


@dataclass
class SalvageReport:
    """What :func:`salvage` did (or, for a read-only folder, would have done)."""

    ranks: list[int] = field(default_factory=list)  # ranks salvaged
    streams: int = 0           # leftover streams found on those ranks
    batches: int = 0           # complete batches recovered
    rows: int = 0              # rows recovered
    skipped_bytes: int = 0     # bytes of truncated tails that could not be read
    in_memory: bool = False    # True: the folder is read-only, nothing was written
    reason: str | None = None  # why the salvage stayed in memory

    def as_dict(self) -> dict:
        return {"ranks": self.ranks, "streams": self.streams, "batches": self.batches,
                "rows": self.rows, "skipped_bytes": self.skipped_bytes,
                "in_memory": self.in_memory, "reason": self.reason}


# ---------------------------------------------------------------- salvage

def dead_ranks(root: Path, man: dict, parts: dict[str, list[Part]]) -> list[int]:
    """Ranks whose writer is gone without closing: status ``recording`` (or unlisted with
    leftover streams) and no live holder of the rank's life lock."""
    entries = rank_entries(man)
    with_streams = {p.rank for ps in parts.values() for p in ps if p.stream is not None}
    candidates = {r for r, (_, e) in entries.items() if e.get("status", "recording") == "recording"}
    candidates |= {r for r in with_streams if r not in entries}
    return sorted(r for r in candidates if not writer_alive(root, r))


def _close_stream(part: Part, report: SalvageReport, remove: list[Path],
                  listed: dict[str, dict]) -> dict | None:
    """Turn ``part``'s stream into a closed file; returns its manifest segment entry. The
    stream goes into ``remove``: it is deleted once the manifest lists the file. A closed
    file already beside the stream is kept when it reads and matches what the manifest lists
    for it (if anything); otherwise the stream is the better copy and replaces it."""
    stream = part.stream
    if part.file is not None:
        want = listed.get(part_path(part))
        try:
            _, _, rows = check_file(part.file)
            entry = segment_entry(part.table, part.file, rows)
            if want is not None and want.get("sha256") and want["sha256"] != entry["sha256"]:
                raise RecordingError("changed after it was listed", "corrupt segment")
        except RecordingError:
            part.file = None  # a torn or changed closed file: the stream is the better copy
        else:
            remove.append(stream)  # the close finished but left its stream behind
            part.stream = None
            return entry
    contents = read_stream(stream)
    report.streams += 1
    report.batches += len(contents.batches)
    report.rows += contents.rows
    report.skipped_bytes += contents.skipped_bytes
    if contents.schema is None:
        remove.append(stream)  # not even a header: nothing to keep
        part.stream = None
        return None
    dest = stream.with_suffix(FILE_SUFFIX)
    closed = stream_to_file(stream, dest, warn=False)  # a full disk raises: the stream stays, for later
    remove.append(stream)
    part.file, part.stream = dest, None
    return {"table": part.table, "path": part_path(part), **closed}


def _merge_segments(listed: object, segs: list[dict]) -> dict:
    """A rank's ``segments`` (``{table: [{path, rows, bytes, sha256}]}``) with ``segs`` added."""
    out: dict[str, list] = {}
    if isinstance(listed, dict):
        out = {t: list(v) for t, v in listed.items() if isinstance(v, list)}
    for seg in segs:
        seg = dict(seg)
        table = seg.pop("table")
        kept = [s for s in out.get(table, []) if not (isinstance(s, dict) and s.get("path") == seg["path"])]
        out[table] = kept + [seg]
    return out


def _unlisted_files(man: dict, parts: list[Part]) -> list[dict]:
    """Entries for closed files of a dead rank the manifest does not list: the writer (or an
    earlier salvage) of an older replay died between closing a segment and updating the
    manifest. A copy of a listed segment (same sha256) is not one: doctor sets it aside."""
    listed = listed_segments(man)
    hashes = {s.get("sha256") for s in listed.values()}
    out = []
    for p in parts:
        if p.file is None or p.stream is not None:
            continue
        if part_path(p) in listed:
            continue
        try:
            _, _, rows = check_file(p.file)
        except (RecordingError, FileNotFoundError):
            continue  # unreadable: doctor sets it aside
        entry = segment_entry(p.table, p.file, rows)
        if entry["sha256"] not in hashes:
            out.append(entry)
    return out


def salvage(root: Path, ranks: list[int], *, leftovers: bool = False) -> SalvageReport:
    """Close the leftover streams of ``ranks`` (dead writers) and mark them ``salvaged``.

    Runs under the manifest lock and checks again that each writer is gone. When the
    folder cannot be written, returns a report with ``in_memory=True`` and changes nothing.
    ``leftovers=True`` closes the streams of ranks in any status and leaves the status
    as it is (``replay doctor`` uses it for streams a finished writer left behind).
    """
    root = Path(root)
    report = SalvageReport()
    if not ranks:
        return report
    remove: list[Path] = []  # streams now closed: deleted once the manifest lists their files

    def change(man: dict) -> None:
        entries = rank_entries(man)
        listed = listed_segments(man)
        parts = scan_parts(root)
        for rank in ranks:
            if writer_alive(root, rank):
                continue  # a writer came back for this rank: leave it alone
            key, entry = entries.get(rank, (str(rank), {}))
            if not leftovers and entry.get("status", "recording") != "recording" and rank in entries:
                continue  # another reader salvaged it first
            segs = _unlisted_files(man, [p for t in parts for p in parts[t] if p.rank == rank])
            segs += [s for t in parts for p in parts[t] if p.rank == rank and p.stream is not None
                     and (s := _close_stream(p, report, remove, listed)) is not None]
            entry = dict(entry)
            entry["segments"] = _merge_segments(entry.get("segments"), segs)
            if not leftovers or rank not in entries:
                entry["status"] = "salvaged"
                entry["salvaged_at"] = now_iso()
            man.setdefault("ranks", {})[key] = entry
            report.ranks.append(rank)

    try:
        probe = root / f".salvage-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        update_manifest(root, change)
    except (OSError, pa.ArrowException) as e:
        # A read-only folder, or a full disk half-way through: streams closed so far are
        # files beside their streams, which the manifest does not list: readers read the
        # streams, in memory.
        why = ("is read-only" if not report.streams
               else f"could not be salvaged on disk after {report.streams} segment(s)")
        return memory_salvage(root, ranks, reason=f"{root} {why} ({one_line(e)})")
    for stream in remove:
        stream.unlink(missing_ok=True)
    return report


def memory_salvage(root: Path, ranks: list[int], *, reason: str) -> SalvageReport:
    """The report of a salvage that only reads: counts what the leftover streams hold."""
    report = SalvageReport(ranks=list(ranks), in_memory=True, reason=reason)
    for parts in scan_parts(root).values():
        for p in parts:
            if p.rank in ranks and p.stream is not None:
                try:
                    c = read_stream(p.stream)
                except FileNotFoundError:
                    continue
                report.streams += 1
                report.batches += len(c.batches)
                report.rows += c.rows
                report.skipped_bytes += c.skipped_bytes
    return report
