"""Segments on disk, open streams, and the salvage of ranks whose writer died.

A table's data lies in ``<table>/rank-NNNN/part-NNNNN.arrow`` (closed Arrow IPC
files) and ``part-NNNNN.arrows`` (open Arrow IPC streams). :func:`scan_parts` lists
them; when a part has both, the closed file wins (the writer died between writing
the file and removing the stream). :func:`read_stream` reads every complete batch of
a stream and stops cleanly at a truncated tail, counting the bytes it skipped.

:func:`salvage` turns the leftover streams of dead ranks (the manifest says
``recording`` but nobody holds the rank's life lock) into closed files and marks
those ranks ``salvaged`` in the manifest, all under the manifest lock. A folder that
cannot be written is salvaged in memory only: the caller reads the streams instead.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.ipc as ipc

from replay.errors import RecordingError
from replay.store.manifest import now_iso, rank_number, read_manifest, update_manifest, writer_alive
from replay.schema import RUN_FILE, FILE_SUFFIX, RANK_DIR_RE, SEGMENT_RE, STREAM_SUFFIX, TABLES

_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


@dataclass
class Part:
    """One segment slot of one table and rank: its closed file, its open stream, or both."""

    table: str                 # table name, e.g. "rollouts"
    rank: int                  # writer rank
    part: int                  # segment number within the rank
    file: Path | None = None   # part-NNNNN.arrow, when present
    stream: Path | None = None  # part-NNNNN.arrows, when present


@dataclass
class StreamContents:
    """What :func:`read_stream` could read from one ``.arrows`` stream."""

    path: Path                                  # the stream read
    schema: pa.Schema | None                    # None when even the header is unreadable
    batches: list[pa.RecordBatch] = field(default_factory=list)  # every complete batch
    good_bytes: int = 0                         # bytes up to the end of the last complete batch
    size: int = 0                               # file size when read
    error: str | None = None                    # why reading stopped before the end, if it did

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    @property
    def skipped_bytes(self) -> int:
        return max(0, self.size - self.good_bytes)


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


# ---------------------------------------------------------------- listing

def scan_parts(root: Path, tables: tuple[str, ...] = TABLES) -> dict[str, list[Part]]:
    """Every segment slot of every table, ordered by (rank, part)."""
    out: dict[str, list[Part]] = {}
    inside = Path(root).resolve()
    for table in tables:
        parts: dict[tuple[int, int], Part] = {}
        tdir = Path(root) / table
        _refuse_escape(tdir, inside)
        try:
            rank_dirs = [d for d in tdir.iterdir() if RANK_DIR_RE.match(d.name) and d.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            rank_dirs = []
        for rdir in rank_dirs:
            rank = int(RANK_DIR_RE.match(rdir.name).group(1))
            _refuse_escape(rdir, inside)
            try:
                entries = list(os.scandir(rdir))
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                m = SEGMENT_RE.match(name)
                if m is None:
                    continue
                if entry.is_symlink():
                    _refuse_escape(rdir / name, inside)
                num = int(m.group(1))
                p = parts.setdefault((rank, num), Part(table, rank, num))
                if name.endswith(STREAM_SUFFIX):
                    p.stream = rdir / name
                else:
                    p.file = rdir / name
        out[table] = [parts[k] for k in sorted(parts)]
    return out


def _refuse_escape(path: Path, inside: Path) -> None:
    """A symbolic link in a recording must stay inside it: a RecordingError otherwise."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(inside):
            raise RecordingError(f"{path} is a symbolic link to {target}, outside the recording "
                                 f"{inside}: refused; remove the link", "path outside recording")


def ranks_on_disk(parts: dict[str, list[Part]]) -> set[int]:
    return {p.rank for ps in parts.values() for p in ps}


def rank_entries(man: dict) -> dict[int, tuple[str, dict]]:
    """The manifest's rank entries by rank number: ``{rank: (key, entry)}``.

    Keys may be written ``"0"`` or ``"rank-0000"``; anything else is ignored.
    """
    out = {}
    for key, entry in (man.get("ranks") or {}).items():
        rank = rank_number(key)
        if rank is not None:
            out[rank] = (key, entry if isinstance(entry, dict) else {})
    return out


# ---------------------------------------------------------------- what a reader reads

def listed_segments(man: dict) -> dict[str, dict]:
    """Closed segments the manifest lists, by path relative to the recording
    (``table/rank-NNNN/part-NNNNN.arrow``), each with its ``rows``, ``bytes``, ``sha256``."""
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


def part_path(p: Part, path: Path | None = None) -> str:
    """The path of ``p``'s closed file (or ``path``) relative to its recording."""
    f = path if path is not None else p.file
    return f"{p.table}/{f.parent.name}/{f.name}"


def outside(rel: str) -> bool:
    """Whether a manifest path leaves the recording (absolute, or through ``..``)."""
    pp = PurePosixPath(rel)
    return pp.is_absolute() or ".." in pp.parts or "\\" in rel


@dataclass
class Selection:
    """The segments a reader reads (:func:`select_parts`), and what it leaves out."""

    parts: dict[str, list[Part]]                        # slot by slot: the file or the stream to read
    unlisted: list[str] = field(default_factory=list)   # closed files the manifest does not list: not read
    damage: list[str] = field(default_factory=list)     # why the recording cannot be read as it is
    warnings: list[str] = field(default_factory=list)   # damage worked around (a stream read instead)


# (filesystem key, path, size, mtime_ns, sha256) -> whether the file has that hash. A segment
# is hashed once per process while it is unchanged (closed segments never change).
_VERIFIED: dict[tuple, bool] = {}
_VERIFY_THREADS = 4


class LocalFiles:
    """How :func:`select_parts` sees files: here, the local file system."""

    key = "local"

    @staticmethod
    def stat(path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    @staticmethod
    def sha256(path) -> str:
        return sha256_file(Path(path))


def select_parts(man: dict, parts: dict[str, list[Part]], files=LocalFiles) -> Selection:
    """What a reader reads: each closed file the manifest lists, checked against its recorded
    size and sha256; the stream of a slot whose file is not listed yet (a writer, or a salvage,
    lists a file before it deletes the stream); nothing else. A listed file that is gone,
    changed, or outside the recording is ``damage`` (unless its stream is still there: then
    the stream is read, with a warning); closed files no entry lists are ``unlisted`` and left
    out. List the parts before reading the manifest: a file closed in between is then
    listed, or still has its stream."""
    listed = listed_segments(man)
    sel = Selection({t: [] for t in parts})
    seen: set[str] = set()
    todo: list[tuple[str, Part, dict, tuple[int, int]]] = []
    for table, ps in parts.items():
        for p in ps:
            p = Part(p.table, p.rank, p.part, p.file, p.stream)
            if p.file is not None:
                rel = part_path(p)
                want = listed.get(rel)
                st = files.stat(p.file) if want is not None else None
                if want is None:
                    if p.stream is None:
                        sel.unlisted.append(rel)
                    p.file = None
                elif st is None:
                    p.file = None  # removed since the listing: reported below as missing
                else:
                    seen.add(rel)
                    if isinstance(want.get("bytes"), int) and want["bytes"] != st[0]:
                        _bad(sel, p, rel, f"has {st[0]} bytes, the manifest says {want['bytes']}")
                    else:
                        todo.append((rel, p, want, st))
            if p.file is not None or p.stream is not None:
                sel.parts[table].append(p)
    _verify(todo, sel, files)
    for p in (q for ps in sel.parts.values() for q in ps):
        if p.file is not None:
            p.stream = None  # the listed file holds the rows; a leftover stream is not read
    # slots seen as a stream only: a live writer may have closed and listed it since the
    # listing (the stream is read, or, once gone, the listed file: see scan_table's admit)
    streaming = {part_path(p, p.stream.with_suffix(FILE_SUFFIX)) for ps in parts.values() for p in ps
                 if p.stream is not None}
    for rel, want in sorted(listed.items()):
        if rel in seen or rel in streaming:
            continue
        if outside(rel):
            sel.damage.append(f"the manifest lists {rel!r}, outside the recording")
        elif rel.split("/")[0] in parts:
            sel.damage.append(f"segment {rel} is listed in the manifest but missing "
                              f"({want.get('rows', '?')} rows)")
    return sel


def _bad(sel: Selection, p: Part, rel: str, why: str) -> None:
    """A listed file that does not match its entry: read its stream if one is left, else damage."""
    p.file = None
    if p.stream is not None:
        sel.warnings.append(f"segment {rel} {why}: its stream {p.stream.name} is read instead")
    else:
        sel.damage.append(f"segment {rel} {why}")


def _matches(item, files) -> bool:
    """Whether a listed file has its recorded sha256 (once per process while unchanged)."""
    sha = item[2].get("sha256")
    if not isinstance(sha, str):
        return True  # an entry without a hash: only its size could be checked
    key = _key(item, files)
    ok = _VERIFIED.get(key)
    if ok is None:
        try:
            ok = files.sha256(item[1].file) == sha
        except FileNotFoundError:
            ok = False
        _VERIFIED[key] = ok
    return ok


def _verify(todo: list, sel: Selection, files) -> None:
    unknown = [t for t in todo if _key(t, files) not in _VERIFIED]
    if len(unknown) > 1:  # hashing releases the GIL: several segments at once
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(_VERIFY_THREADS, len(unknown)), thread_name_prefix="replay-sha") as pool:
            list(pool.map(lambda t: _matches(t, files), unknown))
    for t in todo:
        if not _matches(t, files):
            rel, p = t[0], t[1]
            _bad(sel, p, rel, "differs from the manifest's sha256 (changed or damaged after it was closed)")
            if p.stream is None:
                sel.parts[p.table] = [q for q in sel.parts[p.table] if q is not p]


def listed_and_intact(man: dict, p: Part, path, files=LocalFiles) -> bool:
    """Whether ``path``, the closed file of slot ``p``, is listed in ``man`` with its size and hash
    (for a stream that its live writer closed between the listing and the read)."""
    rel = part_path(p, path)
    want = listed_segments(man).get(rel)
    st = files.stat(path)
    if want is None or st is None:
        return False
    if isinstance(want.get("bytes"), int) and want["bytes"] != st[0]:
        return False
    return _matches((rel, Part(p.table, p.rank, p.part, file=path), want, st), files)


def _key(item, files) -> tuple:
    _, p, want, (size, mtime) = item
    return (files.key, str(p.file), size, mtime, want.get("sha256"))


# ---------------------------------------------------------------- reading

def read_stream(path: Path) -> StreamContents:
    """Every complete batch of the Arrow IPC stream at ``path``; never raises on bad bytes.

    A missing file raises FileNotFoundError (the writer may just have closed it).
    """
    size = os.path.getsize(path)
    out = StreamContents(path=Path(path), schema=None, size=size)
    with pa.OSFile(str(path), "rb") as src:
        try:
            reader = ipc.open_stream(src)
            out.schema = reader.schema
            out.good_bytes = src.tell()
        except Exception as e:  # any malformed header: nothing readable
            out.error = f"unreadable stream header: {one_line(e)}" if size else None
            return out
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                out.good_bytes = src.tell()  # a clean end (with or without the end marker)
                break
            except Exception as e:  # a torn or corrupt tail
                out.error = f"stopped at byte {out.good_bytes}: {one_line(e)}"
                break
            out.batches.append(batch)
            out.good_bytes = src.tell()
    return out


@contextlib.contextmanager
def _closed_segment(path: Path, hint: bool = True):
    """An IPC file reader of a closed segment; a RecordingError (with the way out, unless
    ``hint`` is False) if unreadable."""
    try:
        with pa.OSFile(str(path), "rb") as src:
            yield ipc.open_file(src)
    except FileNotFoundError:
        raise
    except RecordingError:
        raise
    except Exception as e:
        way_out = f"; run `replay doctor {path.parents[2]}` to set it aside" if hint else ""
        raise RecordingError(f"segment {path} is not a readable Arrow file ({one_line(e)}){way_out}",
                             "corrupt segment") from None


def check_file(path: Path, *, hint: bool = True) -> tuple[pa.Schema, int, int]:
    """(schema, batches, rows) of a closed segment; RecordingError if it is not readable."""
    with _closed_segment(path, hint) as reader:
        n = reader.num_record_batches
        rows = sum(reader.get_batch(i).num_rows for i in range(n))
        return reader.schema, n, rows


def file_schema(path: Path) -> pa.Schema:
    """The schema of a closed segment, read from its footer only."""
    with _closed_segment(path) as reader:
        return reader.schema


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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
    tmp = dest.with_name(f".{dest.name}.salvage.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            with ipc.new_file(sink, contents.schema, options=_IPC_OPTIONS) as writer:
                for b in contents.batches:
                    writer.write_batch(b)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:  # a full disk: the stream stays as it is, for a later salvage
        tmp.unlink(missing_ok=True)
        raise
    remove.append(stream)
    part.file, part.stream = dest, None
    return segment_entry(part.table, dest, contents.rows)


def segment_entry(table: str, path: Path, rows: int) -> dict:
    """The manifest record of one closed segment (``table`` says where it is listed)."""
    return {"table": table, "path": f"{table}/{path.parent.name}/{path.name}", "rows": rows,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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


def manifest_or_error(root: Path) -> dict:
    """read_manifest, with a plain message when the path is not even a folder."""
    root = Path(root)
    if not root.exists():
        raise RecordingError(f"{root} does not exist", "not a recording")
    if not root.is_dir():
        raise RecordingError(f"{root} is not a folder (a recording is a folder with a manifest.json)",
                             "not a recording")
    try:
        man = read_manifest(root)
    except RecordingError as e:
        if e.title == "corrupt manifest":
            raise RecordingError(f"{e.msg}; run `replay doctor {root}` to rebuild it from the "
                                 "segments", e.title) from None
        if e.title == "not a recording" and any((root / t).is_dir() for t in TABLES):
            raise RecordingError(f"{root} has segments but no manifest.json; run `replay doctor "
                                 f"{root}` to rebuild it from them", "damaged recording") from None
        raise
    ranks = man.get("ranks")
    if not isinstance(ranks, dict) or not all(isinstance(e, dict) for e in ranks.values()):
        raise RecordingError(f"{root / 'manifest.json'} is corrupt: 'ranks' must map each rank "
                             f"to an object; run `replay doctor {root}` to rebuild it", "corrupt manifest")
    head = run_header(root)
    if head is not None:
        got = (man.get("run_id"), man.get("created_at"))
        want = (head.get("run_id"), head.get("created_at"))
        if got != want:
            raise RecordingError(f"{root / 'manifest.json'} is not this recording's: it is run "
                                 f"{got[0]!r} created {got[1]}, while {RUN_FILE} says run {want[0]!r} "
                                 f"created {want[1]}; run `replay doctor {root}` to rebuild it",
                                 "corrupt manifest")
    return man


def run_header(root: Path) -> dict | None:
    """The run's header (``run.json``: run_id, created_at, schema_version, run_config), or None
    when the recording has none (older recordings) or it cannot be read."""
    try:
        head = json.loads((Path(root) / RUN_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None
