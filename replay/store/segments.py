"""Segment files of the recorder's writer.

A :class:`Segment` is an open Arrow IPC stream ``part-NNNNN.arrows`` (zstd buffers,
flushed to the OS after every batch). :func:`stream_to_file` closes one into an Arrow
IPC file ``part-NNNNN.arrow``: the stream's bytes plus a footer (re-encoded when the
stream cannot be indexed), under a temporary name, fsync, ``os.replace``. The caller deletes the stream once the
manifest lists the file (:func:`remove_stream`): a reader that sees a closed file with no
stream beside it can count on the manifest listing it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

import pyarrow as pa

from replay.schema import SEGMENT_RE, rank_dir

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


def _table_field(buf: bytes, table: int, index: int) -> int | None:
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
    vec = field + struct.unpack_from("<I", footer, field)[0]
    if struct.unpack_from("<I", footer, vec)[0] != len(blocks):
        raise ValueError("unexpected footer layout")
    for k, (offset, meta, body, _) in enumerate(blocks):
        struct.pack_into("<qi4xq", footer, vec + 4 + 24 * k, len(_MAGIC) + offset, meta, body)
    return bytes(footer)


def _copy_as_file(stream: Path, tmp: Path) -> tuple[int, str]:
    """Write the IPC file of ``stream`` to ``tmp`` from the stream's bytes; (rows, sha256)."""
    data = stream.read_bytes()
    schema = pa.ipc.open_stream(pa.py_buffer(data)).schema
    blocks, end = _index_stream(memoryview(data))
    if data[end:] not in (b"", _EOS):
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
    rows = 0
    with pa.OSFile(str(stream)) as src:
        reader = pa.ipc.open_stream(src)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, reader.schema, options=IPC_OPTIONS) as out:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError):
                    break  # a torn tail: keep what came before
                out.write_batch(batch)
                rows += batch.num_rows
    h = hashlib.sha256()
    with open(tmp, "rb+") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return rows, h.hexdigest()


def stream_to_file(stream: Path, final: Path) -> dict:
    """Turn the IPC stream ``stream`` into the IPC file ``final``; return its manifest entry.

    Keeps every complete batch (a torn tail after a write error is dropped), writes
    under a temporary name, fsyncs and replaces. The stream stays: remove it with
    :func:`remove_stream` once the manifest lists the file. Until then readers read the
    stream (an unlisted file is never read); a crash at any point leaves the stream, or
    the stream and the file, which a salvage lists.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        try:
            rows, sha = _copy_as_file(stream, tmp)
        except (ValueError, struct.error, IndexError, pa.ArrowInvalid) as e:
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
