"""``replay``: the command line, a thin front end over the library.

Exit codes are an API: 0 success, 1 a data error (a recording that cannot be read,
a failing query, a doctor report with problems left), 2 bad usage. Errors print one
line, ``replay: <title>: <message>``, on stderr, never a traceback.

Commands live in two places. ``info``, ``sql`` and ``doctor`` are defined here. The
others are named in :data:`COMMANDS` with the module that defines them; such a module
exposes ``add_parser(subparsers)``, which adds a parser of that name and sets
``func=handler`` on it (``handler(args) -> int``). The module is imported only when
its command runs, so a heavy or missing one never slows or breaks the rest.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from replay import __version__
from replay.cli.args import NONNEG_INT, format_arg
from replay.errors import BadInput, ReplayError
from replay.schema import SCHEMA_VERSION

# command -> (module defining it, one-line help shown in `replay --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("replay.cli.demo", "run the embedded demo: a tiny real RL run, recorded"),
    "rerun": ("replay.cli.rerun", "re-execute recorded steps under another engine config"),
    "diagnose": ("replay.cli.diagnose", "where the mismatch comes from and why: backend, trainer, lag"),
    "bisect": ("replay.cli.bisect", "find where a run departs: steps, fixes, tokens, layers"),
    "import": ("replay.cli.importers", "turn another tool's logs into a recording"),
}
MAX_ROWS = 200  # rows a `sql` table shows unless --max-rows says otherwise


# ---------------------------------------------------------------- built-in commands

def _salvage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--salvage", action="store_true",
                   help="first close the open segments of writers that died (writes to the "
                        "recording, like `replay doctor`); without it nothing is written")
    p.add_argument("--no-salvage", action="store_true", help=argparse.SUPPRESS)  # the default now


def _format_arg(p: argparse.ArgumentParser) -> None:
    from replay.output import FORMATS
    format_arg(p, FORMATS)


def cmd_info(args: argparse.Namespace) -> int:
    from replay.output import info_output
    from replay.read.recording import open_recording

    with open_recording(args.path, salvage=args.salvage) as rec:
        print(info_output(rec.info(), args.format))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from replay.output import Rows, rows_output
    from replay.read.recording import open_recording

    paths = list(args.args)
    if args.max_rows < 0:
        raise _Usage(f"--max-rows must be >= 0, got {args.max_rows}")
    if args.file is not None:
        query = sys.stdin.read() if args.file == "-" else _read_text(args.file)
    elif len(paths) < 2:
        raise _Usage("sql needs at least one recording and a query (or --file)")
    else:
        query = paths.pop()
    out = _export_target(args.out, paths) if args.out else None
    names = args.names.split(",") if args.names else None
    with open_recording(paths, salvage=args.salvage, names=names) as rec:
        for name in rec.names:
            for w in rec.warnings(name):
                print(f"replay: warning: {' '.join(w.split())}", file=sys.stderr)
        statements = rec.statements(query)
        if not statements:
            raise _Usage("the query holds no SQL statement (it is empty or only comments)")
        limit = args.max_rows if args.format == "table" and out is None else None
        results = []
        for i, q in enumerate(statements):
            rel = rec.sql(q)
            if rel is None:
                continue  # CREATE, SET ...: ran, nothing to show
            if out is not None:
                results.append(rel.to_arrow_table())  # fetched now: a later statement may change it
                continue
            if limit is not None:
                rel = rel.limit(limit + 1)
            results.append(Rows(list(rel.columns), [str(t) for t in rel.types], rel.fetchall()))
        if out is not None:
            if len(results) != 1:
                raise BadInput(f"--out writes one result; the query's statements return {len(results)}",
                               field="--out")
            n = _export(results[0], out)
            print(f"wrote {n} rows to {out}", file=sys.stderr)
            return 0
        if not results:
            results = [Rows([], [], [])]
        if len(results) > 1 and args.format != "table":
            raise BadInput(f"{len(results)} statements return rows; --format {args.format} prints one "
                           "result: run them one at a time", field="query")
        print("\n\n".join(rows_output(r, args.format, max_rows=limit) for r in results))
    return 0


EXPORT_FORMATS = (".parquet", ".csv", ".json", ".jsonl")


def _export_target(out: str, recordings: list[str]) -> Path:
    """Where ``--out`` writes: a file with a known suffix, outside every recording queried."""
    path = Path(out)
    if path.suffix.lower() not in EXPORT_FORMATS:
        raise BadInput(f"--out {out}: the file name must end in {', '.join(EXPORT_FORMATS)} "
                       "(the format is taken from it)", field="--out")
    target = path.resolve()
    for r in recordings:
        root = Path(r).resolve()
        if target.is_relative_to(root):
            raise BadInput(f"--out {out} is inside the recording {r}: a query never writes into a "
                           "recording; write it elsewhere", field="--out")
    if not target.parent.is_dir():
        raise BadInput(f"--out {out}: folder {path.parent} does not exist", field="--out")
    return path


def _export(table, path: Path) -> int:
    """Write the Arrow ``table`` to ``path`` (format from the suffix), atomically."""
    import pyarrow.parquet as pq

    from replay.output import jsonable, to_csv

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            pq.write_table(table, tmp)
        elif suffix == ".csv":  # lists as JSON text, like --format csv
            with open(tmp, "w", newline="") as f:
                f.write(to_csv(table.column_names, (tuple(r.values()) for r in table.to_pylist())))
        elif suffix == ".jsonl":  # one object per row
            with open(tmp, "w") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(jsonable(row)) + "\n")
        else:                     # one JSON document: the rows as a list of objects
            with open(tmp, "w") as f:
                json.dump([jsonable(row) for row in table.to_pylist()], f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return table.num_rows


vars(cmd_sql)["more_positionals"] = "args"  # positionals after an option still belong to PATH... QUERY


def cmd_doctor(args: argparse.Namespace) -> int:
    from replay.output import doctor_output
    from replay.store.doctor import doctor

    report = doctor(args.path, repair=not args.no_repair)
    print(doctor_output(report, args.format))
    return 0 if report["ok"] else 1


def cmd_check(args: argparse.Namespace) -> int:
    from replay.read.check import check, check_output

    report = check(args.path)
    print(check_output(report, args.format))
    need = args.require or []
    unknown = [c for c in need if c not in report["commands"]]
    if unknown:
        raise _Usage(f"--require {unknown[0]!r}: commands are {', '.join(report['commands'])}")
    return 1 if any(not report["commands"][c]["ready"] for c in need) else 0


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise BadInput(f"cannot read query file {path}: {e.strerror or e}", field="--file") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"query file {path} is not UTF-8 text ({e.reason} at byte {e.start})",
                       field="--file") from None


class _Usage(Exception):
    """Bad usage found after parsing: reported like argparse's own errors (exit 2)."""


def _add_builtin(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summary of a recording: status, ranks, steps, tokens",
                       description="Print a recording's summary. Reads only: a dead writer's open "
                                   "segments are read as they are (--salvage closes them).")
    p.add_argument("path", help="recording folder")
    _salvage_arg(p)
    _format_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "sql", help="run SQL over one or several recordings",
        description="Run a DuckDB query. Tables: events rollouts trainer topk metrics weights "
                    "rejects replays reference; views: tokens sequences step_metrics. With several "
                    "recordings each is a schema named after its folder (a.tokens, b.tokens).")
    p.add_argument("args", nargs="+", metavar="PATH [PATH ...] QUERY",
                   help="recording folders, then the query (unless --file gives it)")
    p.add_argument("--file", metavar="Q.sql", help="read the query from this file ('-': stdin)")
    p.add_argument("--names", metavar="A,B", help="schema names for the recordings, comma-separated")
    p.add_argument("--max-rows", type=NONNEG_INT, default=MAX_ROWS,
                   help=f"rows a table shows (default {MAX_ROWS}; json and csv print all)")
    p.add_argument("--out", metavar="FILE",
                   help="write the result to FILE instead (.parquet, .csv, .json: a list of "
                        "objects, .jsonl: one object per line); the only way a query writes a file")
    _salvage_arg(p)
    _format_arg(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("check", help="which commands a recording supports, and what is missing",
                       description="Read a recording and say, for each command (info, sql, tui, bisect, "
                                   "rerun, diagnose), whether it has what the command needs; what is "
                                   "missing and how to record it. Reads only.")
    p.add_argument("path", help="recording folder")
    p.add_argument("--require", action="append", metavar="COMMAND",
                   help="exit 1 unless COMMAND is ready (repeatable), e.g. --require rerun")
    _format_arg(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("doctor", help="check a recording's files and repair what can be",
                       description="Verify segments, streams and weight blobs; salvage dead "
                                   "writers. Exit 1 when problems are left.")
    p.add_argument("path", help="recording folder")
    p.add_argument("--no-repair", action="store_true", help="only check, change nothing")
    _format_arg(p)
    p.set_defaults(func=cmd_doctor)


# ---------------------------------------------------------------- other commands

def _unavailable(name: str, module: str, why: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise ReplayError(f"command {name!r} needs {module}, which cannot be loaded ({why})",
                          "command unavailable")
    vars(run)["takes_any_args"] = True  # its real arguments are unknown: do not judge them
    return run


PLUGIN_GROUP = "replay.commands"   # entry points "name = module:add_parser" other packages add (the UI)


def _plugins() -> dict[str, tuple[str, str]]:
    """Commands other installed packages register: name -> (module, help), the help being
    the module's ``HELP`` (such a module keeps its heavy imports inside its command)."""
    from importlib.metadata import entry_points

    out = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in COMMANDS:
            continue
        module = ep.value.split(":")[0]
        try:
            help_ = str(getattr(importlib.import_module(module), "HELP", ep.name))
        except Exception as e:  # noqa: BLE001 - listed anyway; choosing it says why it fails
            help_ = f"(cannot be loaded: {' '.join(str(e).split())[:80]})"
        out[ep.name] = (module, help_)
    return out


def _add_external(sub: argparse._SubParsersAction, chosen: str | None) -> None:
    for name, (module, help_) in {**COMMANDS, **_plugins()}.items():
        if name != chosen:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
            add = mod.add_parser
        except Exception as e:  # noqa: BLE001 - a broken optional module must not break the rest
            p = sub.add_parser(name, help=help_, add_help=False)
            p.set_defaults(func=_unavailable(name, module, " ".join(str(e).split())))
            continue
        add(sub)


def _chosen(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` says which optional command module to load."""
    parser = argparse.ArgumentParser(
        prog="replay", description="Record, query, replay and bisect RL training runs on vLLM.")
    parser.add_argument("--version", action="version",
                        version=f"replay {__version__} (recording schema v{SCHEMA_VERSION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_builtin(sub)
    _add_external(sub, _chosen(argv))
    return parser


def _fail(title: str, msg: str) -> int:
    print(f"replay: {title}: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    import duckdb

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    func = getattr(args, "func", None)
    more = getattr(func, "more_positionals", None)
    if extra and more and not any(a.startswith("-") for a in extra):
        getattr(args, more).extend(extra)  # `sql PATH --flag QUERY`
    elif extra and not getattr(func, "takes_any_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # exits 2
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    from replay import signals as _signals

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _signals.sigint)
    try:
        return int(func(args) or 0)
    except _Usage as e:
        parser.error(str(e))  # exits 2
    except ReplayError as e:
        return _fail(e.title, str(e))
    except duckdb.Error as e:
        return _fail("sql error", str(e))
    except BrokenPipeError:
        return 1
    except OSError as e:
        return _fail("file error", f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
    except KeyboardInterrupt:
        print("replay: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if _signals.received():   # Ctrl-C that a C extension turned into its own error
            print("replay: interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0
