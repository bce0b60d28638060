"""Segment files: the one implementation of writing, listing and reading them.

A table's data lies in ``<table>/rank-NNNN/part-NNNNN.arrow`` (closed Arrow IPC files) and
``part-NNNNN.arrows`` (open Arrow IPC streams).

Writing: a :class:`Segment` is an open stream (zstd buffers, flushed to the OS after every
batch). :func:`stream_to_file` closes one into a file: the stream's bytes plus a footer
(re-encoded when the stream cannot be indexed), under a temporary name, fsync,
``os.replace``. The caller deletes the stream once the manifest lists the file
(:func:`remove_stream`): a reader that sees a closed file with no stream beside it can count
on the manifest listing it. The writer and the salvage of a dead writer close segments with
this same function.

Reading, through any filesystem (:class:`replay.store.files.Files`): :func:`scan_parts` lists
the segment slots; :func:`read_stream` reads every complete batch of a stream and stops
cleanly at a torn tail, counting only the bytes after the last complete batch as skipped;
:func:`check_file` / :func:`file_schema` / :func:`read_file` read closed files.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from replay.errors import RecordingError, one_line
from replay.schema import RANK_DIR_RE, SEGMENT_RE, STREAM_SUFFIX, TABLES, rank_dir
from replay.store.files import LOCAL, Files

log = logging.getLogger("replay.record.recorder")
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd", use_threads=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# An IPC file is the IPC stream between a magic prefix and a footer that indexes the
# record-batch messages. So a closed segment is the stream's bytes, copied as they are
# (no decompression, no second compression), plus a footer: the footer pyarrow writes
# for the same schema and as many (empty) batches, with the index entries set to the
# real messages. Checked against pyarrow's own file writer in the tests; anything
# unexpected falls back to re-encoding the batches.
_MAGIC = b"ARROW1\x00\x00"
_CONT = b"\xff\xff\xff\xff"
_EOS = _CONT + b"\x00\x00\x00\x00"
_SCHEMA_MSG, _BATCH_MSG = 1, 3  # flatbuffer MessageHeader union tags


def _table_field(buf: bytes | bytearray, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table`` (None when absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if 4 + 2 * index >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    off = struct.unpack_from("<H", buf, vtable + 4 + 2 * index)[0]
    return table + off if off else None


def _message(meta: bytes) -> tuple[int, int, int]:
    """(header type, body length, rows) of one IPC Message flatbuffer."""
    root = struct.unpack_from("<I", meta, 0)[0]
    f_type, f_header, f_body = (_table_field(meta, root, i) for i in (1, 2, 3))
    kind = meta[f_type] if f_type is not None else 0
    body = struct.unpack_from("<q", meta, f_body)[0] if f_body is not None else 0
    rows = 0
    if kind == _BATCH_MSG and f_header is not None:
        header = f_header + struct.unpack_from("<I", meta, f_header)[0]
        f_len = _table_field(meta, header, 0)
        rows = struct.unpack_from("<q", meta, f_len)[0] if f_len is not None else 0
    return kind, body, rows


def _index_stream(data: memoryview) -> tuple[list[tuple[int, int, int, int]], int]:
    """([(offset, metadata bytes, body bytes, rows)] of the complete batches, end of the last one)."""
    pos, blocks, n = 0, [], len(data)
    while pos + 8 <= n and data[pos:pos + 4] == _CONT:
        size = struct.unpack_from("<i", data, pos + 4)[0]
        if size <= 0 or pos + 8 + size > n:
            break  # end-of-stream marker, or a torn message
        kind, body, rows = _message(bytes(data[pos + 8:pos + 8 + size]))
        if pos + 8 + size + body > n:
            break
        if kind == _BATCH_MSG:
            blocks.append((pos, 8 + size, body, rows))
        elif kind != _SCHEMA_MSG or pos:
            raise ValueError(f"unexpected IPC message type {kind}")
        pos += 8 + size + body
    return blocks, pos


def _footer(schema: pa.Schema, blocks: list[tuple[int, int, int, int]]) -> bytes:
    """The file footer for ``blocks`` (offsets are into the file, after the magic)."""
    sink = pa.BufferOutputStream()
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    with pa.ipc.new_file(sink, schema, options=IPC_OPTIONS) as w:
        for _ in blocks:
            w.write_batch(empty)
    data = sink.getvalue().to_pybytes()
    size = struct.unpack_from("<i", data, len(data) - 10)[0]
    footer = bytearray(data[len(data) - 10 - size:len(data) - 10])
    root = struct.unpack_from("<I", footer, 0)[0]
    field = _table_field(footer, root, 3)  # Footer.recordBatches: [Block]
    if field is None:
        raise ValueError("unexpected footer layout")
    vec = field + struct.unpack_from("<I", footer, field)[0]
    if struct.unpack_from("<I", footer, vec)[0] != len(blocks):
        raise ValueError("unexpected footer layout")
    for k, (offset, meta, body, _) in enumerate(blocks):
        struct.pack_into("<qi4xq", footer, vec + 4 + 24 * k, len(_MAGIC) + offset, meta, body)
    return bytes(footer)


def _copy_as_file(stream: Path, tmp: Path, warn: bool = True) -> tuple[int, str]:
    """Write the IPC file of ``stream`` to ``tmp`` from the stream's bytes; (rows, sha256)."""
    data = stream.read_bytes()
    schema = pa.ipc.open_stream(pa.py_buffer(data)).schema
    blocks, end = _index_stream(memoryview(data))
    if warn and data[end:] not in (b"", _EOS):
        log.warning("segment %s ends in a torn batch (%d bytes): kept the %d batches before it",
                    stream, len(data) - end, len(blocks))
    footer = _footer(schema, blocks)
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in (_MAGIC, memoryview(data)[:end], _EOS, footer, struct.pack("<i", len(footer)), b"ARROW1"):
            f.write(part)
            h.update(part)
        f.flush()
        os.fsync(f.fileno())
    back = pa.ipc.open_file(str(tmp))  # the footer reads back: index and schema agree
    if back.num_record_batches != len(blocks) or not back.schema.equals(schema, check_metadata=True):
        raise ValueError("the rebuilt file does not read back")
    return sum(b[3] for b in blocks), h.hexdigest()


def _reencode_as_file(stream: Path, tmp: Path) -> tuple[int, str]:
    """Write the IPC file of ``stream`` to ``tmp`` batch by batch (decode, encode); (rows, sha256)."""
    contents = read_stream(stream)
    if contents.schema is None:
        raise RecordingError(f"segment {stream} has no readable header ({contents.error})", "corrupt segment")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, contents.schema, options=IPC_OPTIONS) as out:
        for batch in contents.batches:  # a torn tail is left out: what came before is kept
            out.write_batch(batch)
    h = hashlib.sha256()
    with open(tmp, "rb+") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return contents.rows, h.hexdigest()


def stream_to_file(stream: Path, final: Path, *, warn: bool = True) -> dict:
    """Turn the IPC stream ``stream`` into the IPC file ``final``; return its manifest entry.

    Keeps every complete batch (a torn tail after a write error is dropped), writes
    under a temporary name, fsyncs and replaces. The stream stays: remove it with
    :func:`remove_stream` once the manifest lists the file. Until then readers read the
    stream (an unlisted file is never read); a crash at any point leaves the stream, or
    the stream and the file, which a salvage lists. ``warn``: log a torn tail or a re-encoding
    (a salvage reports them itself).
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        try:
            rows, sha = _copy_as_file(stream, tmp, warn)
        except (ValueError, struct.error, IndexError, pa.ArrowInvalid) as e:
            if warn:
                log.warning("segment %s: rebuilt by re-encoding its batches (%s)", stream, e)
            rows, sha = _reencode_as_file(stream, tmp)
        entry = {"rows": rows, "bytes": tmp.stat().st_size, "sha256": sha}
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entry


def remove_stream(stream: Path) -> None:
    """Delete a stream whose closed file the manifest now lists. No fsync: should the removal
    be lost, the stream and the listed file are both there and readers take the file."""
    try:
        stream.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not remove %s after closing it (%s); readers take its closed file", stream, e)


class Segment:
    """The open stream segment of one table of one rank."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = pa.OSFile(str(path), "wb")
        self._sink = pa.BufferedOutputStream(self._file, 1 << 20)
        self._writer = pa.ipc.new_stream(self._sink, schema, options=IPC_OPTIONS)
        self._sink.flush()
        self.rows = 0

    @property
    def bytes(self) -> int:
        return self._file.tell()

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._sink.flush()  # into the OS: survives the death of this process
        self.rows += batch.num_rows

    def abandon(self) -> None:
        """Close after a failed write, adding nothing: the torn tail stays as it is."""
        try:
            self._file.close()
        except (OSError, pa.ArrowException):
            pass

    def close(self) -> None:
        """Write the end-of-stream marker and close; quietly, when the disk refuses."""
        for step in (self._writer.close, self._sink.close):
            try:
                step()
            except (OSError, pa.ArrowException):
                pass


def next_part(root: Path, table: str, rank: int) -> int:
    """The first unused segment number of ``table`` for ``rank``."""
    d = rank_dir(root, table, rank)
    parts = [int(m.group(1)) for p in (d.iterdir() if d.is_dir() else ()) if (m := SEGMENT_RE.match(p.name))]
    return max(parts) + 1 if parts else 0


# ---------------------------------------------------------------- listing

@dataclass
class Part:
    """One segment slot of one table and rank: its closed file, its open stream, or both."""

    table: str                 # table name, e.g. "rollouts"
    rank: int                  # writer rank
    part: int                  # segment number within the rank
    file: Any = None           # part-NNNNN.arrow, when present (a Path; a POSIX path in a remote filesystem)
    stream: Any = None         # part-NNNNN.arrows, when present


def scan_parts(root: Any, files: Files = LOCAL, tables: tuple[str, ...] = TABLES) -> dict[str, list[Part]]:
    """Every segment slot of every table, ordered by (rank, part). In a local folder a symbolic
    link must stay inside the recording (a RecordingError otherwise)."""
    root = files.path(root)
    inside = Path(root).resolve() if files.local else None
    out: dict[str, list[Part]] = {}
    for table in tables:
        parts: dict[tuple[int, int], Part] = {}
        tdir = root / table
        if inside is not None:
            _refuse_escape(Path(tdir), inside)
        for rinfo in files.children(tdir):
            rm = RANK_DIR_RE.match(rinfo.base_name)
            if rm is None or rinfo.type != pafs.FileType.Directory:
                continue
            rdir = tdir / rinfo.base_name
            if inside is not None:
                _refuse_escape(Path(rdir), inside)
            rank = int(rm.group(1))
            for info in files.children(rdir):
                name = info.base_name
                m = SEGMENT_RE.match(name)
                if m is None:
                    continue
                if inside is not None:
                    _refuse_escape(Path(rdir) / name, inside)
                p = parts.setdefault((rank, int(m.group(1))), Part(table, rank, int(m.group(1))))
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


def part_path(p: Part, path: Any = None) -> str:
    """The path of ``p``'s closed file (or ``path``) relative to its recording."""
    f = path if path is not None else p.file
    return f"{p.table}/{f.parent.name}/{f.name}"


def outside(rel: str) -> bool:
    """Whether a manifest path leaves the recording (absolute, or through ``..``)."""
    pp = PurePosixPath(rel)
    return pp.is_absolute() or ".." in pp.parts or "\\" in rel


# ---------------------------------------------------------------- reading

@dataclass
class StreamContents:
    """What :func:`read_stream` could read from one ``.arrows`` stream."""

    path: Any                                   # the stream read
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


def read_stream(path: Any, files: Files = LOCAL) -> StreamContents:
    """Every complete batch of the Arrow IPC stream at ``path``; never raises on bad bytes.

    A missing file raises FileNotFoundError (the writer may just have closed it).
    """
    size = files.size(path)
    out = StreamContents(path=path, schema=None, size=size)
    with files.open(path) as src:
        try:
            reader = ipc.open_stream(src)
            out.schema = reader.schema
            out.good_bytes = src.tell()
        except Exception as e:  # noqa: BLE001 - any malformed header: nothing readable
            out.error = f"unreadable stream header: {one_line(e)}" if size else None
            return out
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                out.good_bytes = src.tell()  # a clean end (with or without the end marker)
                break
            except Exception as e:  # noqa: BLE001 - a torn or corrupt tail
                out.error = f"stopped at byte {out.good_bytes}: {one_line(e)}"
                break
            out.batches.append(batch)
            out.good_bytes = src.tell()
    return out


@contextlib.contextmanager
def _closed_segment(path: Any, files: Files, hint: bool) -> Iterator[ipc.RecordBatchFileReader]:
    """An IPC file reader of a closed segment; a RecordingError (with the way out, for a local
    folder, unless ``hint`` is False) if unreadable."""
    try:
        with files.open(path) as src:
            yield ipc.open_file(src)
    except FileNotFoundError:
        raise
    except RecordingError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed file
        way_out = f"; run `replay doctor {Path(path).parents[2]}` to set it aside" if hint and files.local else ""
        raise RecordingError(f"segment {path} is not a readable Arrow file ({one_line(e)}){way_out}",
                             "corrupt segment") from None


def read_file(path: Any, files: Files = LOCAL, *, hint: bool = True) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """(schema, batches) of a closed segment; RecordingError if it is not readable."""
    with _closed_segment(path, files, hint) as reader:
        return reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]


def check_file(path: Any, files: Files = LOCAL, *, hint: bool = True) -> tuple[pa.Schema, int, int]:
    """(schema, batches, rows) of a closed segment; RecordingError if it is not readable."""
    schema, batches = read_file(path, files, hint=hint)
    return schema, len(batches), sum(b.num_rows for b in batches)


def file_schema(path: Any, files: Files = LOCAL) -> pa.Schema:
    """The schema of a closed segment, read from its footer only."""
    with _closed_segment(path, files, True) as reader:
        return reader.schema


def sha256_file(path: Any, files: Files = LOCAL) -> str:
    return files.sha256(path)
