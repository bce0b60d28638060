"""``manifest.json``: the one reader of it (local or through any filesystem), and its safe
update from several writer processes.

Writers (one per rank, possibly several processes) take an exclusive ``flock`` on
``manifest.lock``, read the manifest, change their own rank's entry, and replace
the file atomically (write a temporary file, fsync, ``os.replace``). A reader never
sees a half-written manifest. Each rank also holds ``rank-NNNN.lock`` for its whole
life: when a reader can take that lock, the rank's writer is gone.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from replay.errors import RecordingError, one_line
from replay.schema import MANIFEST, MANIFEST_LOCK, RANK_DIR_RE, RUN_FILE, SCHEMA_VERSION, TABLES, rank_lock_path
from replay.store.files import LOCAL, Files


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(root: Any, files: Files = LOCAL) -> dict:
    """The manifest of the recording at ``root``; a clear error if missing, corrupt or too new."""
    path = files.path(root) / MANIFEST
    try:
        data = files.read_bytes(path)
    except FileNotFoundError:
        raise RecordingError(f"{root} is not a recording: no {MANIFEST}", "not a recording") from None
    except OSError as e:  # a folder named manifest.json, no permission, ...
        raise RecordingError(f"cannot read {path}: {one_line(e)}", "unreadable manifest") from None
    try:
        man = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordingError(f"{path} is corrupt: {e}", "corrupt manifest") from None
    if not isinstance(man, dict) or "schema_version" not in man:
        raise RecordingError(f"{path} is corrupt: no schema_version", "corrupt manifest")
    ver = man["schema_version"]
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:  # versions start at 1
        raise RecordingError(f"{path} is corrupt: schema_version {ver!r} is not a version "
                             f"(1 to {SCHEMA_VERSION})", "corrupt manifest")
    if ver > SCHEMA_VERSION:
        raise RecordingError(
            f"{root} has schema_version {ver!r}; this replay reads versions up to {SCHEMA_VERSION}: upgrade replay",
            "recording too new")
    man.setdefault("ranks", {})
    return man


def manifest_or_error(root: Any, files: Files = LOCAL) -> dict:
    """The manifest a reader reads: :func:`read_manifest`, with a plain message when the path is
    not even a folder, every rank entry an object, the run header (``run.json``) agreeing, and
    (in a local folder) the ``replay doctor`` command that repairs what is wrong."""
    root = files.path(root)
    where = "" if files.local else f" ({files.fs.type_name} filesystem)"
    kind = files.kind(root)
    if kind == pafs.FileType.NotFound:
        raise RecordingError(f"{root} does not exist{where}", "not a recording")
    if kind != pafs.FileType.Directory:
        raise RecordingError(f"{root} is not a folder (a recording is a folder with a manifest.json)",
                             "not a recording")
    fix = (lambda what: f"; run `replay doctor {root}` to {what}") if files.local else (lambda what: "")
    try:
        man = read_manifest(root, files)
    except RecordingError as e:
        if e.title == "corrupt manifest":
            raise RecordingError(f"{e.msg}{fix('rebuild it from the segments')}", e.title) from None
        if e.title == "not a recording" and any(files.kind(root / t) == pafs.FileType.Directory for t in TABLES):
            raise RecordingError(f"{root} has segments but no manifest.json{fix('rebuild it from them')}",
                                 "damaged recording") from None
        raise
    ranks = man.get("ranks")
    if not isinstance(ranks, dict) or not all(isinstance(e, dict) for e in ranks.values()):
        raise RecordingError(f"{root / MANIFEST} is corrupt: 'ranks' must map each rank "
                             f"to an object{fix('rebuild it')}", "corrupt manifest")
    head = run_header(root, files)
    if head is not None:
        got = (man.get("run_id"), man.get("created_at"))
        want = (head.get("run_id"), head.get("created_at"))
        if got != want:
            raise RecordingError(f"{root / MANIFEST} is not this recording's: it is run "
                                 f"{got[0]!r} created {got[1]}, while {RUN_FILE} says run {want[0]!r} "
                                 f"created {want[1]}{fix('rebuild it')}", "corrupt manifest")
    return man


def run_header(root: Any, files: Files = LOCAL) -> dict | None:
    """The run's header (``run.json``: run_id, created_at, schema_version, run_config), or None
    when the recording has none (older recordings) or it cannot be read."""
    try:
        head = json.loads(files.read_bytes(files.path(root) / RUN_FILE))
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


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


def segment_entry(table: str, path: Path, rows: int) -> dict:
    """The manifest record of one closed segment of a local folder (``table`` says where it is listed)."""
    return {"table": table, "path": f"{table}/{path.parent.name}/{path.name}", "rows": rows,
            "bytes": path.stat().st_size, "sha256": LOCAL.sha256(path)}


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(Path(root) / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


AUX_RANKS = 10_000  # writer ranks from here on add derived data (replays), not the run itself


def rank_number(key: Any) -> int | None:
    """The rank a manifest key names (``"0"`` or ``"rank-0000"``); None for anything else."""
    m = RANK_DIR_RE.match(str(key))
    text = m.group(1) if m else str(key)
    return int(text) if text.isdigit() else None


def overall_status(man: dict) -> str:
    """The run's status from its ranks' (``complete`` when every rank closed, ``salvaged``
    when one was salvaged, else ``recording``). Writers of derived data (ranks from
    :data:`AUX_RANKS` on, e.g. a replayer adding replays) do not change it; they count
    only in a folder that holds nothing else."""
    ranks = man.get("ranks", {}) or {}
    run = [r for k, r in ranks.items() if (n := rank_number(k)) is None or n < AUX_RANKS]
    statuses = [r.get("status", "recording") if isinstance(r, dict) else "recording"
                for r in (run or list(ranks.values()))]
    if not statuses:
        return man.get("status", "recording")
    if "salvaged" in statuses:
        return "salvaged"
    if all(s == "complete" for s in statuses):
        return "complete"
    return "recording"


def update_manifest(root: Path, change: Callable[[dict], None], *, create: dict | None = None) -> dict:
    """Apply ``change`` to the manifest under the lock; ``create`` is the manifest if none exists yet."""
    root = Path(root)
    with _locked(root):
        path = root / MANIFEST
        if path.exists():
            man = read_manifest(root)
        elif create is not None:
            man = dict(create)
            man.setdefault("ranks", {})
        else:
            raise RecordingError(f"{root} is not a recording: no {MANIFEST}", "not a recording")
        change(man)
        man["status"] = overall_status(man)
        man["updated_at"] = now_iso()
        write_atomic(path, json.dumps(man, indent=1, sort_keys=True).encode())
        return man


def new_manifest(run_id: str, run_config: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id, "created_at": now_iso(),
            "status": "recording", "run_config": run_config, "ranks": {}}


def host_id() -> str:
    return socket.gethostname()


def hold_rank_lock(root: Path, rank: int) -> int:
    """Take rank ``rank``'s life lock; a clear error if a live writer already holds it."""
    fd = os.open(rank_lock_path(root, rank), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecordingError(f"rank {rank} of {root} is being written by another live process",
                             "rank in use") from None
    return fd


def writer_alive(root: Path, rank: int) -> bool:
    """True when rank ``rank``'s writer still holds its life lock."""
    path = rank_lock_path(root, rank)
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def wait_writer_gone(root: Path, rank: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while writer_alive(root, rank):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
