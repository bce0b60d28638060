"""The read path: open one or several recordings as DuckDB views, checked, read only.

>>> rec = open_recording("recordings/run-1")
>>> rec.sql("SELECT step, clip_rate FROM step_metrics").fetchall()

Every table is a view over a ``pyarrow.dataset`` (nothing is copied into DuckDB):
closed segments are scanned with projection and filter pushdown, open segments
contribute their complete batches from memory (see :mod:`replay.read.views`). With one
recording the views sit in a schema named after its folder *and* in the default
schema; with several, each recording has its own schema (``a.tokens``, ``b.tokens``).

One DuckDB connection is not thread-safe: another thread takes :meth:`Recording.cursor`.
A cursor sees the segments as they were when it was made; after :meth:`Recording.refresh`
take a new one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import duckdb
import pyarrow.compute as pc

from replay.read.views import DERIVED, TableScan, scan_table, sequences_sql, step_metrics_view_sql, tokens_sql
from replay.errors import BadInput, RecordingError, ReplayError
from replay.store.files import LOCAL, Files
from replay.store.manifest import manifest_or_error, overall_status, rank_entries, writer_alive
from replay.store.salvage import SalvageReport, dead_ranks, salvage as salvage_ranks
from replay.store.segments import Part, ranks_on_disk, scan_parts
from replay.store.selection import listed_and_intact, select_parts
from replay.schema import TABLES

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# schema names that would shadow DuckDB's own catalogs
_RESERVED = {"main", "temp", "system", "information_schema", "pg_catalog", "memory"}


@dataclass
class _Member:
    """One recording inside a :class:`Recording`."""

    name: str                                   # its schema in the connection
    root: Path                                  # its folder
    manifest: dict = field(default_factory=dict)
    scans: dict[str, TableScan] = field(default_factory=dict)
    salvage: SalvageReport | None = None        # the last salvage done on opening / refresh
    dead: list[int] = field(default_factory=list)  # dead ranks left alone (salvage=False)
    streams: dict = field(default_factory=dict)  # open segments read so far (see StreamCache)
    files: Files = LOCAL                        # the filesystem holding it (local folders by default)
    store: Any = None                           # its WeightStore, once weights are read
    weight_rows: Any = None                     # its weights table, once read (reset by a refresh)
    unlisted: list[str] = field(default_factory=list)  # closed files the manifest does not list: not read
    read_warnings: list[str] = field(default_factory=list)  # damage worked around when selecting segments

    def status(self) -> str:
        if self.salvage is not None and self.salvage.in_memory and self.salvage.ranks:
            return "salvaged"
        return overall_status(self.manifest)


def _safe_names(roots: list[Path], names: Iterable[str] | None) -> list[str]:
    if names is not None:
        names = list(names)
        if len(names) != len(roots):
            raise BadInput(f"{len(names)} names for {len(roots)} recordings", field="names")
        for n in names:
            if not isinstance(n, str) or not _NAME_RE.match(n) or n.lower() in _RESERVED:
                raise BadInput(f"recording name {n!r} is not a plain SQL identifier (letters, "
                               f"digits, _) or is reserved ({', '.join(sorted(_RESERVED))})",
                               field="names")
        if len({n.lower() for n in names}) != len(names):
            raise BadInput(f"recording names must be unique, got {names}", field="names")
        return names
    out: list[str] = []
    taken: set[str] = set()
    for root in roots:
        name = root.resolve().name if isinstance(root, Path) else PurePosixPath(root).name
        base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "rec"
        if not re.match(r"[A-Za-z_]", base):
            base = "r_" + base
        if base.lower() in _RESERVED:
            base += "_rec"
        name, i = base, 2
        while name.lower() in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name.lower())
        out.append(name)
    return out


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier: any schema name works, SQL keywords included."""
    return '"' + name.replace('"', '""') + '"'


class Recording:
    """One DuckDB connection over one or several recordings. Use :func:`open_recording`."""

    def __init__(self, roots: list[Path], names: list[str], *, salvage: bool = False,
                 files: list[Files] | None = None, weights_from: str | os.PathLike | None = None):
        self._salvage = salvage
        # a folder of checkpoints the user named, for versions recorded by hash only
        self.weights_from = Path(weights_from) if weights_from is not None else None
        files = files or [LOCAL] * len(roots)
        self._members = [_Member(n, r, files=f) for n, r, f in zip(names, roots, files)]
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect()
        try:
            for m in self._members:
                self._live().execute(f"CREATE SCHEMA {quote_ident(m.name)}")
                self._load(m)
                self._create_views(m.name, m.name)
            if len(self._members) == 1:
                self._create_views("main", self._members[0].name, alias=True)
            _sandbox(self._live())
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- loading
    def _load(self, m: _Member) -> None:
        files, root = m.files, m.root
        manifest_or_error(root, files)           # a plain error first when it is no recording
        parts = scan_parts(root, files)
        m.manifest = manifest_or_error(root, files)  # after the listing: a file closed meanwhile is in it
        # dead writers: only a local folder has the life locks that tell (and can be salvaged)
        dead = dead_ranks(root, m.manifest, parts) if files.local else []
        m.dead = []
        if dead and self._salvage:
            m.salvage = salvage_ranks(root, dead)
            parts = scan_parts(root, files)
            m.manifest = manifest_or_error(root, files)
        elif dead:
            m.dead = dead
        sel = self._select(m, parts, files)
        live = {p.stream for ps in sel.values() for p in ps if p.stream is not None}
        m.streams = {k: v for k, v in m.streams.items() if k in live}

        def admit(p: Part, path: Path) -> bool:
            return listed_and_intact(manifest_or_error(root, files), p, path, files)

        m.scans = {t: scan_table(t, sel[t], m.streams, files, admit=admit) for t in TABLES}
        m.weight_rows = None
        for t, scan in m.scans.items():
            self._live().register(self._internal(m.name, t), scan.dataset)

    @staticmethod
    def _select(m: _Member, parts: dict, files) -> dict:
        """The parts to read (:func:`replay.store.salvage.select_parts`); damage is refused."""
        sel = select_parts(m.manifest, parts, files)
        if sel.damage:
            more = f" (and {len(sel.damage) - 1} more)" if len(sel.damage) > 1 else ""
            raise RecordingError(f"{m.root} is damaged: {sel.damage[0]}{more}; nothing was read "
                                 f"from it. Run `replay doctor {m.root}` to see all of it and "
                                 "repair what can be", "damaged recording")
        m.unlisted, m.read_warnings = sel.unlisted, sel.warnings
        return sel.parts

    @staticmethod
    def _internal(schema: str, table: str) -> str:
        return f"__replay_{schema}_{table}"

    def _create_views(self, schema: str, member: str, *, alias: bool = False) -> None:
        con, s = self._live(), quote_ident(schema)
        for t in TABLES:
            src = f"{quote_ident(member)}.{t}" if alias else quote_ident(self._internal(member, t))
            con.execute(f"CREATE OR REPLACE VIEW {s}.{t} AS SELECT * FROM {src}")
        if alias:
            for v in DERIVED:
                if self._has_view(member, v):
                    con.execute(f"CREATE OR REPLACE VIEW {s}.{v} AS SELECT * FROM {quote_ident(member)}.{v}")
            return
        con.execute(f"CREATE OR REPLACE VIEW {s}.tokens AS {tokens_sql(s)}")
        con.execute(f"CREATE OR REPLACE VIEW {s}.sequences AS {sequences_sql(s)}")
        metrics = step_metrics_view_sql(s)
        if metrics is not None:
            con.execute(f"CREATE OR REPLACE VIEW {s}.step_metrics AS {metrics}")

    def _has_view(self, schema: str, view: str) -> bool:
        rows = self._live().execute(
            "SELECT count(*) FROM duckdb_views() WHERE schema_name = ? AND view_name = ?",
            [schema, view]).fetchall()
        return rows[0][0] > 0

    def _live(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RecordingError("this recording is closed", "recording closed")
        return self._con

    def _member(self, name: str | None) -> _Member:
        if name is None:
            return self._members[0]
        for m in self._members:
            if m.name == name:
                return m
        raise BadInput(f"no recording named {name!r}; names: {', '.join(self.names)}", field="name")

    # ---------------------------------------------------------------- public API
    @property
    def names(self) -> list[str]:
        """Schema names of the recordings, in the order they were given."""
        return [m.name for m in self._members]

    @property
    def path(self) -> Path:
        """Folder of the first recording."""
        return self._members[0].root

    def run_config(self, name: str | None = None) -> dict:
        """The run config of one recording (the first unless ``name`` is given), from its manifest."""
        return dict(self._member(name).manifest.get("run_config") or {})

    @property
    def salvaged(self) -> bool:
        """True when any recording opened here is (or was just) salvaged."""
        return any(m.status() == "salvaged" for m in self._members)

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection (one thread only; other threads use :meth:`cursor`)."""
        return self._live()

    def sql(self, query: str, params: Any = None) -> duckdb.DuckDBPyRelation | None:
        """A DuckDB relation for ``query`` (None for statements that return nothing).

        A relation keeps no result: call ``.fetchall()``, ``.to_arrow_table()`` or
        ``.df()``. Parse and bind errors raise :class:`ReplayError` titled ``sql error``.
        """
        con = self._live()
        try:
            return con.sql(query, params=params) if params is not None else con.sql(query)
        except duckdb.Error as e:
            raise sql_error(e) from e

    def query(self, query: str, params: Any = None) -> duckdb.DuckDBPyRelation:
        """:meth:`sql` for a query (a statement that returns rows); BadInput for any other."""
        rel = self.sql(query, params)
        if rel is None:
            raise BadInput(f"not a query (it returns no rows): {' '.join(query.split())[:80]}", field="query")
        return rel

    def statements(self, query: str) -> list[str]:
        """The SQL statements of ``query`` in order (none for an empty or comment-only query);
        a parse error raises :class:`ReplayError` titled ``sql error``."""
        try:
            return [st.query for st in self._live().extract_statements(query)]
        except duckdb.Error as e:
            raise ReplayError(" ".join(str(e).split()), "sql error") from e

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for another thread, with every view of this recording registered."""
        cur = self._live().cursor()
        for m in self._members:
            for t, scan in m.scans.items():
                cur.register(self._internal(m.name, t), scan.dataset)
        return cur

    def refresh(self) -> None:
        """Re-scan segments (new batches of a recording still being written, new parts)."""
        self._live()
        for m in self._members:
            self._load(m)
            self._create_views(m.name, m.name)  # a view is bound to its columns: rebind
        if len(self._members) == 1:
            self._create_views("main", self._members[0].name, alias=True)

    def info(self, name: str | None = None) -> dict:
        """Summary of one recording (the first unless ``name`` is given), JSON-ready."""
        m = self._member(name)
        s = quote_ident(m.name)
        con = self._live().cursor()
        try:
            for t, scan in m.scans.items():
                con.register(self._internal(m.name, t), scan.dataset)

            def one(q: str) -> tuple:
                try:
                    return con.execute(q).fetchall()[0]
                except duckdb.Error as e:  # a damaged segment met while scanning
                    raise RecordingError(f"{m.root} cannot be read: {' '.join(str(e).split())}; run "
                                         f"`replay doctor {m.root}` to find the damaged segment",
                                         "unreadable recording") from e

            n_steps, lo, hi = one(f"""SELECT count(DISTINCT step), min(step), max(step) FROM (
                SELECT step FROM {s}.rollouts UNION ALL SELECT step FROM {s}.trainer
                UNION ALL SELECT step FROM {s}.metrics UNION ALL SELECT step FROM {s}.events)""")
            n_roll, n_tok = one(f"SELECT count(*), coalesce(sum(len(output_ids)), 0) FROM {s}.rollouts")
            counts = {t: one(f"SELECT count(*) FROM {s}.{t}")[0]
                      for t in ("trainer", "rejects", "events", "topk", "metrics", "weights")}
        finally:
            con.close()
        man = m.manifest
        return {
            "name": m.name,
            "path": str(m.root),
            "run_id": man.get("run_id"),
            "status": m.status(),
            "schema_version": man.get("schema_version"),
            "created_at": man.get("created_at"),
            "ranks": self._ranks(m),
            "steps": {"count": n_steps, "min": lo, "max": hi},
            "rollouts": n_roll,
            "tokens": int(n_tok),
            "trainer_rows": counts["trainer"],
            "rejects": counts["rejects"],
            "events": counts["events"],
            "topk_rows": counts["topk"],
            "metric_rows": counts["metrics"],
            "weight_versions": counts["weights"],
            "bytes_on_disk": m.files.du(m.root),
            "open_segments": sum(len(sc.streams) for sc in m.scans.values()),
            "rows_in_open_segments": sum(sc.stream_rows for sc in m.scans.values()),
            "salvage": m.salvage.as_dict() if m.salvage is not None and m.salvage.ranks else None,
            "warnings": self.warnings(m.name),
            "run_config": man.get("run_config"),
        }

    def warnings(self, name: str | None = None) -> list[str]:
        """What a reader of one recording should know: segments left out, torn tails, dead writers."""
        m = self._member(name)
        out = list(m.read_warnings) + [w for sc in m.scans.values() for w in sc.warnings]
        if m.unlisted:
            shown = ", ".join(m.unlisted[:3]) + (f" and {len(m.unlisted) - 3} more" if len(m.unlisted) > 3 else "")
            out.append(f"{len(m.unlisted)} closed segment(s) the manifest does not list were not "
                       f"read ({shown}); `replay doctor {m.root}` adopts or sets them aside")
        out += [f"rank {r}'s writer is gone without closing: its open segments are read as they "
                f"are; `replay doctor {m.root}` closes them" for r in m.dead]
        out += [f"rank {r}'s run ended on an error ({e['crashed']}): every row written is kept, "
                "the run did not finish" for r, (_, e) in sorted(rank_entries(m.manifest).items())
                if e.get("crashed")]
        return out

    def _ranks(self, m: _Member) -> list[dict]:
        entries = rank_entries(m.manifest)
        on_disk = {_rank_of(p) for sc in m.scans.values() for p in sc.files + sc.streams}
        on_disk |= ranks_on_disk(scan_parts(m.root, m.files))
        out = []
        for r in sorted(set(entries) | on_disk):
            e = entries.get(r, (None, {}))[1]
            status = e.get("status", "recording")
            if m.salvage is not None and m.salvage.in_memory and r in m.salvage.ranks:
                status = "salvaged"
            closed = sum(1 for sc in m.scans.values() for p in sc.files if _rank_of(p) == r)
            opened = sum(1 for sc in m.scans.values() for p in sc.streams if _rank_of(p) == r)
            alive = writer_alive(m.root, r) if m.files.local else None  # no locks to ask remotely
            row = {"rank": r, "status": status, "writer_alive": alive,
                   "closed_segments": closed, "open_segments": opened}
            if e.get("crashed"):
                row["crashed"] = e["crashed"]   # the run ended on this error; its rows are all kept
            out.append(row)
        return out

    def load_weights(self, version: int, framework: str = "torch", *, name: str | None = None) -> dict:
        """The state dict of weight ``version`` (torch tensors, or numpy arrays)."""
        m = self._member(name)
        self._live()
        if m.weight_rows is None:   # one row per stored version: read once, not once per load
            m.weight_rows = m.scans["weights"].dataset.to_table(
                columns=["version", "sha256", "blob", "path", "time_ns"])
        table = m.weight_rows.filter(pc.field("version") == int(version))
        if table.num_rows == 0:
            have = sorted(set(m.weight_rows.column("version").to_pylist()))
            shown = ", ".join(map(str, have[:20])) + (" ..." if len(have) > 20 else "")
            raise RecordingError(f"weight version {version} is not in {m.root} "
                                 f"(versions recorded: {shown or 'none'})", "no such weights")
        row = table.sort_by([("time_ns", "descending")]).slice(0, 1).to_pylist()[0]
        if not row.get("blob"):
            if self.weights_from is not None:
                from replay.store.weights import load_by_hash
                return load_by_hash(self.weights_from, int(version), row["sha256"], row.get("path"),
                                    framework=framework)
            where = f" (recorded at {row['path']})" if row.get("path") else ""
            raise RecordingError(f"weight version {version} of {m.root} was recorded by hash "
                                 f"only (sha256 {row['sha256']}); give the folder holding its checkpoint"
                                 f"{where} with --weights-from DIR", "weights not stored")
        if not m.files.local:
            raise RecordingError(f"weight blobs of {m.root} are read from local folders only: copy "
                                 f"{m.root}/weights to a local recording to load version {version}",
                                 "weights not local")
        if m.store is None:
            from replay.store.weights import WeightStore
            m.store = WeightStore(m.root)   # kept: it remembers the versions it read (delta chains)
        return m.store.load(row["blob"], row["sha256"], framework=framework)

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Recording({', '.join(f'{m.name}={m.root}' for m in self._members)})"


# A recording is data a colleague may hand over: a query over it reads its views and nothing
# else. DuckDB's own settings, locked once set: no file reads or writes (COPY, read_csv, ATTACH),
# no extension installed or loaded, no network; the views over the registered Arrow datasets
# are unaffected (re-registering them on refresh still works).
SANDBOX = (("enable_external_access", "false"), ("autoinstall_known_extensions", "false"),
           ("autoload_known_extensions", "false"), ("allow_community_extensions", "false"),
           ("lock_configuration", "true"))
SANDBOX_HINT = ("a query over a recording reads its tables and views only (no files, no ATTACH, no "
                "extensions); to export, use `replay sql ... --out FILE.parquet|csv|json` or, from "
                "Python, .to_arrow_table()")


def sql_error(e: duckdb.Error) -> ReplayError:
    """A DuckDB error as a one-line :class:`ReplayError` titled ``sql error``; a query the
    sandbox refused says what a query may do instead."""
    msg = " ".join(str(e).split())
    if "disabled by configuration" in msg or "configuration has been locked" in msg:
        msg += f" ({SANDBOX_HINT})"
    return ReplayError(msg, "sql error")


def _sandbox(con: duckdb.DuckDBPyConnection) -> None:
    for name, value in SANDBOX:
        con.execute(f"SET {name} = {value}")


def _rank_of(path: Path) -> int:
    return int(path.parent.name.split("-")[1])


def open_recording(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                   salvage: bool = False, names: Iterable[str] | None = None,
                   filesystem: Any = None, weights_from: str | os.PathLike | None = None) -> Recording:
    """Open one recording, or several in one connection (one schema each).

    Reading never writes: only the segments the manifest lists are read, each checked
    against its recorded sha256 (once per process while the file is unchanged); a damaged
    recording is refused with the segment named (``replay doctor`` repairs it); a dead
    writer's open segments are read in place, up to their last complete batch.
    ``salvage``: first close the leftover open segments of ranks whose writer died and
    mark the recording ``salvaged`` (this writes; in memory only if the folder is read-only).
    ``names``: schema names (default: the folder names, made SQL-safe and unique).
    ``filesystem``: a ``pyarrow.fs.FileSystem`` the paths are in. A path may also be a
    URI pyarrow understands (``s3://bucket/runs/run-1``, ``gs://...``, ``hdfs://...``).
    Either way the recording is read through pyarrow.fs, read only: nothing is
    salvaged, open segments are read up to their last complete batch, ``writer_alive``
    is unknown (None) and weight blobs cannot be loaded (see docs/distributed.md).
    ``weights_from``: a folder holding the checkpoints of weight versions recorded by hash only
    (``rec.weights(version=v, sha256=..., path=...)``); :meth:`Recording.load_weights` reads a
    version's checkpoint from it (named by the last part of its recorded path, or by its
    version number) and refuses one without the recorded hash. Nothing else is read from it.
    """
    from replay.store.files import resolve

    if isinstance(path_or_paths, (str, os.PathLike)):
        given = [path_or_paths]
    elif isinstance(path_or_paths, Iterable) and not isinstance(path_or_paths, (bytes, dict)):
        given = list(path_or_paths)
    else:
        raise BadInput(f"a recording is a path or a list of paths, not {type(path_or_paths).__name__}",
                       field="path")
    if not given:
        raise BadInput("no recording given", field="path")
    bad = [p for p in given if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise BadInput(f"a recording path must be a str or os.PathLike, not {type(bad[0]).__name__}",
                       field="path")
    roots: list = []
    files: list[Files] = []
    for p in given:
        f, root = resolve(p if isinstance(p, str) else os.fspath(p), filesystem)
        roots.append(root)
        files.append(f)
    return Recording(roots, _safe_names(roots, names), salvage=salvage, files=files, weights_from=weights_from)
