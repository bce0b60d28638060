"""What a reader reads of a recording: each closed segment the manifest lists, checked against
its recorded size and sha256, or the open stream of a slot not listed yet; the rest is named.

One rule for every filesystem (:class:`replay.store.files.Files`). A segment is hashed once
per process while it is unchanged (closed segments never change).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from replay.schema import FILE_SUFFIX
from replay.store.files import LOCAL, Files
from replay.store.manifest import listed_segments
from replay.store.segments import Part, outside, part_path


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


def select_parts(man: dict, parts: dict[str, list[Part]], files: Files = LOCAL) -> Selection:
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


def listed_and_intact(man: dict, p: Part, path, files: Files = LOCAL) -> bool:
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
