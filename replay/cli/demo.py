"""``replay demo``: the embedded default."""
from __future__ import annotations

import argparse

from replay.cli.args import POSITIVE_INT, engine_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run a tiny real RL run under V0, V1 and V1 with fixes, record it, show the divergence",
        description="Train a tiny Qwen2 on a toy task through a PipelineRL-like pipeline under the V0 "
                    "reference, V1 defaults, V1 with all four fixes and the ablations; record every run "
                    "into OUT/<run>/, print a table and write a plot.")
    p.add_argument("--out", default="recordings/demo", help="output folder (default: recordings/demo)")
    p.add_argument("--steps", type=POSITIVE_INT, default=32, help="trainer steps per run (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of problems, update positions, sampling")
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="runs to make, e.g. v0 v1 v1+fixes v1+processed_logprobs (default: all)")
    engine_args(p, engine_help="engine for the V1 runs (the V0 reference always runs on the reference engine)",
                python=False)
    p.add_argument("--jobs", type=POSITIVE_INT, default=None, help="runs in parallel (default: number of CPUs)")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="model size")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="engine dtype of everything but the lm_head (default float32, so the "
                        "lm_head's dtype is the only numeric difference)")
    p.add_argument("--objective", choices=("gspo", "ppo"), default="gspo")
    p.add_argument("--spread", type=int, default=3, metavar="N",
                   help="run v0 under N seeds; their envelope is the spread a run must leave to depart (default 3)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from replay.demo.runner import main

    main(out=args.out, steps=args.steps, seed=args.seed, runs=args.runs, engine=args.engine,
         device=args.device, jobs=args.jobs, size=args.size, dtype=args.dtype, objective=args.objective,
         plot=not args.no_plot, spread=args.spread)
    return 0
