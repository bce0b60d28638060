"""``replay diagnose``: where the run's mismatch comes from, and why, in one command.

``--format json`` prints the dict :func:`replay.diagnose.core.diagnose` returns (the
documented API); the table format prints the report of :mod:`replay.diagnose.report`.
"""
from __future__ import annotations

import argparse
import sys

from replay.cli.args import NONNEG_INT, engine_args, format_arg, model_arg, weights_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="where the mismatch comes from: backend, trainer, policy lag; which fixes, tokens, layer",
        description="Score every recorded token against an exact reference at its own weight version (kept in "
                    "the recording), split the mismatch into backend error, the trainer's semantics, policy lag "
                    "and trainer error, test each against the measured floor of the body dtype, replay a window "
                    "of steps to name the fixes the backend needs (searching only those the recording lacks), "
                    "test the objective-side hypotheses on the trainer, and rank the tokens and the layer of the "
                    "component that is off. Says 'unexplained' when nothing known explains it.")
    p.add_argument("path", help="recording folder")
    p.add_argument("--against", default=None, metavar="REF",
                   help="a reference recording: adds the run-vs-run onset as supporting evidence")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=NONNEG_INT, default=None, help="diagnose this step only")
    which.add_argument("--steps", default=None, metavar="RANGE", help="steps to diagnose: A-B, 1,3,5 (default: all)")
    p.add_argument("--window", default=None, metavar="RANGE",
                   help="steps the backend search replays (default: 3 from the backend's onset, plus the first "
                        "step with an in-flight weight update and the step after it)")
    engine_args(p, engine_help="engine the backend search replays on",
                device_help="device for the reference scoring and the replays")
    model_arg(p)
    weights_arg(p)
    p.add_argument("--dtype", default=None, help="the engine's body dtype the floor stands for (default: recorded)")
    p.add_argument("--trainer-dtype", default=None, help="the trainer's dtype (default: recorded, else the engine's)")
    p.add_argument("--no-write", action="store_true",
                   help="keep the reference scores and replays in memory (do not store them in the recording)")
    p.add_argument("--report", default=None, metavar="FILE.md|FILE.html",
                   help="also write the report with PNG plots of the components per step and the worst tokens")
    format_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.output import to_json
    from replay.cli.rerun import parse_steps
    from replay.diagnose.core import diagnose
    from replay.diagnose.report import render_text, write_report

    steps = [args.step] if args.step is not None else (parse_steps(args.steps, "--steps") if args.steps else None)
    window = parse_steps(args.window, "--window") if args.window else None
    progress = None if args.format == "json" else (lambda msg: print(f"  … {msg}", file=sys.stderr))
    res = diagnose(args.path, against=args.against, steps=steps, window=window, engine=args.engine,
                   device=args.device, python=args.python, dtype=args.dtype, trainer_dtype=args.trainer_dtype,
                   model_path=args.model, weights_from=args.weights_from, write=not args.no_write,
                   progress=progress)
    if args.report:
        files = write_report(res, args.report)
        print(f"  … report: {', '.join(map(str, files))}", file=sys.stderr)
    print(to_json(res) if args.format == "json" else render_text(res))
    return 0
