"""Where a recording's files are: one ``pyarrow.fs`` filesystem for every read of the format.

A local folder is read through :class:`pyarrow.fs.LocalFileSystem`, an object store, HDFS or
an fsspec filesystem through its own ``pyarrow.fs`` filesystem: listing, manifest, segments and
hashes are read by the same code either way (:mod:`replay.store.segments`,
:mod:`replay.store.manifest`, :mod:`replay.store.selection`). What only a local folder has is
said by :attr:`Files.local`: the writers' life locks (so dead writers can be salvaged), a
folder that can be written, weight blobs, and symbolic links, which must stay inside the
recording. A recording opened through a filesystem given explicitly (a URI, or
``filesystem=``) is read only, whatever that filesystem is.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from replay.errors import BadInput, one_line


class Files:
    """The files of recordings in one filesystem (``None``: this machine's folders, read and
    written as local files; a filesystem given: read only through it)."""

    def __init__(self, fs: pafs.FileSystem | None = None):
        if fs is not None and not isinstance(fs, pafs.FileSystem):
            raise BadInput(f"filesystem must be a pyarrow.fs.FileSystem, got {type(fs).__name__}",
                           field="filesystem")
        self.local = fs is None
        self.fs: pafs.FileSystem = fs if fs is not None else pafs.LocalFileSystem()
        # names this filesystem in the cache of verified hashes (closed segments never change)
        self.key = "local" if self.local else f"{self.fs.type_name}:{id(self.fs)}"

    def __repr__(self) -> str:
        return f"Files({'local' if self.local else self.fs.type_name})"

    def path(self, p: Any) -> Path | PurePosixPath:
        """``p`` as the path type of this filesystem (``Path`` locally, else POSIX)."""
        return Path(p) if self.local else PurePosixPath(str(p))

    def info(self, path: Any) -> pafs.FileInfo:
        return self.fs.get_file_info(str(path))

    def kind(self, path: Any) -> pafs.FileType:
        return self.info(path).type

    def stat(self, path: Any) -> tuple[int, int] | None:
        """(size, mtime_ns) of a file; None when it is not there."""
        info = self.info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        return info.size or 0, info.mtime_ns or 0

    def size(self, path: Any) -> int:
        """The size of a file; FileNotFoundError when it is not there."""
        info = self.info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(path))
        return info.size or 0

    def open(self, path: Any) -> pa.NativeFile:
        """A random-access reader of a file; FileNotFoundError when it is not there."""
        return self.fs.open_input_file(str(path))

    def read_bytes(self, path: Any) -> bytes:
        with self.open(path) as f:
            return f.read()

    def sha256(self, path: Any) -> str:
        h = hashlib.sha256()
        with self.open(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def children(self, path: Any) -> list[pafs.FileInfo]:
        """The entries of a folder (none when it is not there)."""
        try:
            return self.fs.get_file_info(pafs.FileSelector(str(path), allow_not_found=True))
        except (NotADirectoryError, FileNotFoundError):
            return []
        except OSError:
            return []   # unreadable: what it holds is not listed

    def du(self, root: Any) -> int:
        """Bytes of every file under ``root`` (symbolic links counted as links, locally)."""
        if self.local:
            total = 0
            for dirpath, _, names in os.walk(root):
                for f in names:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
            return total
        sel = pafs.FileSelector(str(root), recursive=True, allow_not_found=True)
        return sum(i.size or 0 for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)


LOCAL = Files()


def resolve(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[Files, Path | PurePosixPath]:
    """(files, the recording's root in them) for a local path, a URI (``s3://bucket/run``) or a
    path in an explicit ``filesystem``."""
    if filesystem is not None:
        files = Files(filesystem)
        return files, files.path(str(path).rstrip("/") or "/")
    if isinstance(path, str) and "://" in path:
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, ValueError) as e:
            raise BadInput(f"cannot open {path}: {one_line(e)}", field="path") from None
        return Files(fs), PurePosixPath(inner.rstrip("/"))
    return LOCAL, Path(os.fspath(path))
