"""``replay import KIND SRC DEST``: the command line of :mod:`replay.integrations.importers`.

Prints one summary line (or JSON with ``--format json``); exit 0 on success. Errors
(a bad file, row or field) are :class:`~replay.errors.BadInput` and print as one line.
"""
from __future__ import annotations

import argparse
import sys
import json
from typing import Any

from replay.integrations.importers import KINDS, ColumnMap, column_fields, import_any

_COLUMN_HELP = {
    "step": "step (int)", "request_id": "sequence id (default: row number)", "group_id": "group id",
    "prompt_ids": "prompt token ids", "output_ids": "output token ids (required)",
    "logprobs": "engine logprob per output token (required)",
    "trainer_logprobs": "trainer logprob per output token", "entropy": "trainer entropy per output token",
    "reward": "reward", "advantage": "advantage", "version": "engine weight version (int or per token)",
    "trainer_version": "trainer weight version", "finish_reason": "finish reason",
    "temperature": "sampling temperature", "logprobs_mode": "raw_logprobs / processed_logprobs",
}


def _flag(name: str) -> str:
    name = {"request_id": "request"}.get(name, name)
    return "--" + name.replace("_", "-") + "-col"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import", help="turn another tool's logs into a recording",
        description="Import slime debug dumps (.pt from --save-debug-rollout-data / --save-debug-train-data) "
                    "or jsonl / parquet files with one row per sequence into a new recording.")
    p.add_argument("kind", choices=KINDS, help="source format")
    p.add_argument("src", help="source file or folder")
    p.add_argument("dest", help="recording folder to create")
    p.add_argument("--trust-pickle", action="store_true",
                   help="slime: allow full unpickling of .pt files (runs code from the file)")
    p.add_argument("--reward-key", default=None, help="slime: key of a dict reward to record")
    defaults = ColumnMap()
    g = p.add_argument_group("jsonl / parquet columns (empty string: not present)")
    for name in column_fields():
        g.add_argument(_flag(name), dest=f"col_{name}", default=getattr(defaults, name), metavar="NAME",
                       help=f"{_COLUMN_HELP.get(name, name)} (default: {getattr(defaults, name)})")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.kind == "slime":
        stats = import_any("slime", args.src, args.dest, trust_pickle=args.trust_pickle,
                           reward_key=args.reward_key)
    else:
        cols = ColumnMap(**{name: getattr(args, f"col_{name}") for name in column_fields()})
        stats = import_any(args.kind, args.src, args.dest, columns=cols)
    out = stats.to_dict()
    if args.format == "json":
        print(json.dumps({"dest": str(args.dest), **out}))
    else:
        steps = out["steps"]
        span = f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
        print(f"imported {out['rollouts']} rollouts and {out['trainer']} trainer rows ({span}) "
              f"from {out['files']} file(s) into {args.dest}")
        for line in out["skipped"]:
            print(f"skipped {line}")
        for line in out["warnings"]:
            print(f"warning: {line}", file=sys.stderr)
    return 0
