"""Reading a recording through a ``pyarrow.fs`` filesystem (object stores, HDFS, fsspec).

A recording copied or synced to an object store keeps its layout
(``<table>/rank-NNNN/part-NNNNN.arrow``, ``manifest.json``); these helpers list and
read it through any :class:`pyarrow.fs.FileSystem`. Such a recording is opened read
only: there are no rank locks to ask whether a writer lives, so nothing is salvaged,
and the complete batches of leftover open segments (``.arrows``) are read as they are.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from replay.errors import BadInput, RecordingError
from replay.store.salvage import Part, StreamContents, one_line
from replay.schema import MANIFEST, RANK_DIR_RE, SCHEMA_VERSION, SEGMENT_RE, STREAM_SUFFIX, TABLES


def resolve(path: object, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem | None, str | None]:
    """(filesystem, path inside it) for a URI or an explicit filesystem; (None, None) for a
    plain local path, which keeps the local read path (locks, salvage, live streams)."""
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise BadInput(f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}",
                           field="filesystem")
        return filesystem, str(path).rstrip("/") or "/"
    if isinstance(path, str) and "://" in path:
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, ValueError) as e:
            raise BadInput(f"cannot open {path}: {one_line(e)}", field="path") from None
        return fs, inner.rstrip("/")
    return None, None


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def read_manifest_fs(fs: pafs.FileSystem, root: str) -> dict:
    """The manifest of the recording at ``root`` in ``fs``, with the local reader's checks."""
    info = _info(fs, root)
    if info.type == pafs.FileType.NotFound:
        raise RecordingError(f"{root} does not exist ({fs.type_name} filesystem)", "not a recording")
    if info.type != pafs.FileType.Directory:
        raise RecordingError(f"{root} is not a folder (a recording is a folder with a manifest.json)",
                             "not a recording")
    path = f"{root}/{MANIFEST}"
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise RecordingError(f"{root} is not a recording: no {MANIFEST}", "not a recording") from None
    try:
        man = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordingError(f"{path} is corrupt: {e}", "corrupt manifest") from None
    if not isinstance(man, dict) or not isinstance(man.get("schema_version"), int):
        raise RecordingError(f"{path} is corrupt: no schema_version", "corrupt manifest")
    if man["schema_version"] > SCHEMA_VERSION:
        raise RecordingError(f"{path} has schema version {man['schema_version']}, newer than this "
                             f"reader's {SCHEMA_VERSION}: upgrade replay", "recording too new")
    ranks = man.get("ranks")
    if not isinstance(ranks, dict) or not all(isinstance(e, dict) for e in ranks.values()):
        raise RecordingError(f"{path} is corrupt: 'ranks' must map each rank to an object",
                             "corrupt manifest")
    return man


def scan_parts_fs(fs: pafs.FileSystem, root: str) -> tuple[dict[str, list[Part]], int]:
    """Every segment slot of every table (like :func:`replay.store.salvage.scan_parts`), and the
    bytes of every file under ``root``."""
    out: dict[str, dict[tuple[int, int], Part]] = {t: {} for t in TABLES}
    total = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        total += info.size or 0
        rel = PurePosixPath(info.path).relative_to(PurePosixPath(root)).parts
        if len(rel) != 3 or rel[0] not in out:
            continue
        rm, sm = RANK_DIR_RE.match(rel[1]), SEGMENT_RE.match(rel[2])
        if rm is None or sm is None:
            continue
        rank, num = int(rm.group(1)), int(sm.group(1))
        p = out[rel[0]].setdefault((rank, num), Part(rel[0], rank, num))
        if rel[2].endswith(STREAM_SUFFIX):
            p.stream = PurePosixPath(info.path)
        else:
            p.file = PurePosixPath(info.path)
    return {t: [parts[k] for k in sorted(parts)] for t, parts in out.items()}, total


class FsFiles:
    """How :func:`replay.store.salvage.select_parts` sees files in a ``pyarrow.fs`` filesystem."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.key = f"{fs.type_name}:{id(fs)}"

    def stat(self, path) -> tuple[int, int] | None:
        info = self.fs.get_file_info(str(path))
        if info.type == pafs.FileType.NotFound:
            return None
        return info.size or 0, info.mtime_ns or 0

    def sha256(self, path) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(str(path)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()


def file_schema_fs(fs: pafs.FileSystem, path: PurePosixPath) -> pa.Schema:
    """The schema of a closed segment, from its footer."""
    try:
        with fs.open_input_file(str(path)) as f:
            return ipc.open_file(f).schema
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RecordingError(f"segment {path} is not a readable Arrow file ({one_line(e)})",
                             "corrupt segment") from None


def read_stream_fs(fs: pafs.FileSystem, path: PurePosixPath) -> StreamContents:
    """Every complete batch of an open segment; stops cleanly at a torn tail."""
    size = _info(fs, str(path)).size or 0
    out = StreamContents(path=path, schema=None, size=size)
    with fs.open_input_stream(str(path)) as src:
        try:
            reader = ipc.open_stream(src)
            out.schema = reader.schema
        except Exception as e:  # any malformed header: nothing readable
            out.error = f"unreadable stream header: {one_line(e)}" if size else None
            return out
        while True:
            try:
                out.batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except Exception as e:  # a torn or corrupt tail
                out.error = f"stopped reading: {one_line(e)}"
                break
        out.good_bytes = size if out.error is None else 0
    return out
