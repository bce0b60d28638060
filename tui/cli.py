"""``replay tui [PATH [--against REF]] [--root recordings/]``: the terminal UI.

The UI registers this command with ``replay`` through the ``replay.commands`` entry
point (pyproject.toml), so the core names nothing of the UI. This module only parses
arguments; the Textual app loads inside the command, so ``replay --help`` never imports
Textual.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from replay.cli.args import model_arg
from replay.errors import BadInput, ReplayError

HELP = "browse recordings in the terminal UI"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``tui`` command on ``subparsers``; its handler returns an exit code."""
    p = subparsers.add_parser(
        "tui", help=HELP,
        description="Browse recordings: runs, timeline of metrics with the divergence onset, "
                    "step and token views, replay panel, SQL console.")
    p.add_argument("path", nargs="?", type=Path, help="recording to open (default: list --root)")
    p.add_argument("--against", type=Path, default=None, help="reference recording to compare with")
    model_arg(p, type=Path)
    p.add_argument("--root", type=Path, default=None,
                   help="folder the runs screen lists, two levels deep (default: the folder holding "
                        "PATH, else recordings/)")
    p.set_defaults(func=run)
    return p


def runs_root(path: Path | None, root: Path | None) -> Path:
    """The folder the runs screen lists: ``--root``, else the folder holding the recording
    opened, else ``recordings/``."""
    if root is not None:
        return Path(root)
    return Path(path).resolve().parent if path is not None else Path("recordings")


def run(args: argparse.Namespace) -> int:
    """Start the app; 0 on a normal exit."""
    if args.against is not None and args.path is None:
        raise BadInput("--against needs a PATH to compare", field="against")
    for name in ("path", "against"):
        value = getattr(args, name)
        if value is not None and not (Path(value) / "manifest.json").is_file():
            raise BadInput(f"{value} is not a recording (no manifest.json)", field=name)
    try:
        from tui import app as app_mod
    except ImportError as e:
        raise ReplayError(f"the terminal UI needs textual ({e}); install replay-rl[tui]",
                          "tui unavailable") from None
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise BadInput(f"--model {args.model} is not a model folder (no config.json)", field="model")
    app = app_mod.make_app(args.path, args.against, runs_root(args.path, args.root), model=args.model)
    app.run()
    return int(app.return_code or 0)
