"""The recordings under a folder: where they are, their status, size and counts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from replay.errors import ReplayError
from replay.read.recording import open_recording
from replay.schema import MANIFEST


@dataclass
class RunEntry:
    """One recording found under the root folder."""

    path: Path            # its folder
    name: str             # its path relative to the root (e.g. demo/v0)
    status: str = "?"     # complete | recording | salvaged, or "error"
    steps: int = 0        # distinct steps recorded
    rollouts: int = 0     # sequences recorded
    tokens: int = 0       # generated tokens recorded
    nbytes: int = 0       # size on disk
    run_id: str = ""      # the manifest's run id
    error: str = ""       # why it could not be read, when status is "error"


def find_recordings(root: Path, depth: int = 2) -> list[Path]:
    """Folders holding a manifest at ``root`` or up to ``depth`` levels below it, sorted."""
    root = Path(root)
    found: list[Path] = []
    if (root / MANIFEST).is_file():
        found.append(root)
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for c in children:
                if (c / MANIFEST).is_file():
                    found.append(c)
                else:
                    nxt.append(c)
        level = nxt
    return found


def describe(path: Path, root: Path) -> RunEntry:
    """Status, steps, tokens and size of the recording at ``path`` (read-only, no salvage)."""
    try:
        name = str(Path(path).relative_to(root)) if Path(path) != Path(root) else Path(path).name
    except ValueError:
        name = str(path)
    entry = RunEntry(Path(path), name)
    try:
        with open_recording(path, salvage=False) as rec:
            info = rec.info()
    except ReplayError as e:
        entry.status, entry.error = "error", e.msg
        return entry
    entry.status = info["status"]
    if entry.status == "recording" and not any(r.get("writer_alive") for r in info.get("ranks", [])):
        entry.status = "recording (writer gone: read as it is; replay doctor closes it)"
    entry.steps = int(info["steps"]["count"] or 0)
    entry.rollouts = int(info["rollouts"])
    entry.tokens = int(info["tokens"])
    entry.nbytes = int(info["bytes_on_disk"])
    entry.run_id = str(info.get("run_id") or "")
    return entry


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
