"""``replay bisect``: where divergence begins, by steps, fixes, tokens or layers.

``--format json`` prints a stable schema; every kind names its finding at the top level:
``steps`` → ``"step"`` (onset or null) and ``"evidence"``; ``fixes`` → ``"step"``,
``"fixes"`` (minimal set among those the recording lacks), ``"already_applied"``,
``"explained"`` and ``"ablation"``; ``tokens`` → ``"step"``, ``"component"`` and ``"token"``
(``{"request_id", "pos"}`` of the worst sequence's first flagged token, or null);
``layers`` → ``"layer"`` (first differing layer, or null).
"""
from __future__ import annotations

import argparse
import sys

from replay.cli.args import NONNEG, NONNEG_INT, POSITIVE, config_args, engine_args, format_arg, model_arg, weights_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bisect", help="find where a run departs: steps, fixes, tokens, layers",
        description="steps: the first step where the backend or trainer error leaves the floor (against "
                    "an exact reference at each token's version), or where PATH departs from --against REF "
                    "(a CUSUM test on per-token log ratios), or exceeds --threshold, or (--replay) departs "
                    "from a preset's replay by binary search. fixes: at --step, the minimal set of the fixes "
                    "the recording lacks that brings the engine to the reference, and the ablation table. "
                    "tokens: per sequence of --step, the first position where --component exceeds --tol. "
                    "layers: for one token, the first layer that differs between the recorded config and "
                    "it with --fix (default fp32_lm_head).")
    p.add_argument("path", help="recording folder")
    p.add_argument("--by", choices=("steps", "fixes", "tokens", "layers"), default="steps")
    p.add_argument("--against", default=None, metavar="REF", help="reference recording (--by steps)")
    p.add_argument("--threshold", type=POSITIVE, default=None, help="mean |r| threshold (--by steps, no REF)")
    p.add_argument("--replay", action="store_true",
                   help="--by steps: binary search with replays under --preset (default v0)")
    p.add_argument("--step", type=NONNEG_INT, default=None, help="the step (fixes, tokens, layers; default: the onset)")
    p.add_argument("--request", default=None, help="request id (layers; tokens: one sequence)")
    p.add_argument("--pos", type=NONNEG_INT, default=None, help="output position (layers)")
    p.add_argument("--tol", type=NONNEG, default=None,
                   help="tolerance (tokens: |component|, default the floor's tail bound; layers: max |Δh|)")
    p.add_argument("--component", choices=("auto", "backend", "trainer", "r"), default="auto",
                   help="tokens: rank by backend error, trainer error, or the raw |r| (default: whichever is off)")
    p.add_argument("--trainer", action="store_true", help="layers: compare with the trainer's model")
    config_args(p)
    engine_args(p)
    model_arg(p)
    weights_arg(p)
    format_arg(p)
    p.set_defaults(func=run)


def _progress(args):
    if args.format == "json":
        return None
    return lambda msg: print(f"  … {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from replay.diagnose import bisect as b
    from replay.output import to_json
    from replay.errors import BadInput

    if args.by == "steps":
        if args.replay:
            res = b.bisect_steps_replay(args.path, preset=args.preset or "v0", fixes=tuple(args.fix),
                                        tol=0.02 if args.tol is None else args.tol, engine=args.engine, device=args.device,
                                        python=args.python, model_path=args.model,
                                        weights_from=args.weights_from, progress=_progress(args))
        else:
            res = b.bisect_steps(args.path, args.against, threshold=args.threshold)
    else:
        step = args.step
        if step is None and args.by != "layers":   # the onset: from the components, or against REF
            step = b.bisect_steps(args.path, args.against)["step"]
        if step is None:
            raise BadInput("no onset found to bisect at: give --step N", field="step")
        if args.by == "fixes":
            res = b.bisect_fixes(args.path, step, engine=args.engine, device=args.device, python=args.python,
                                 model_path=args.model, weights_from=args.weights_from, progress=_progress(args))
        elif args.by == "tokens":
            res = b.bisect_tokens(args.path, step, tol=args.tol, request_id=args.request, component=args.component)
        else:
            if args.request is None or args.pos is None:
                raise BadInput("--by layers needs --request ID and --pos N", field="request")
            res = b.bisect_layers(args.path, step, args.request, args.pos, preset=args.preset,
                                  fixes=tuple(args.fix) or ("fp32_lm_head",),
                                  against="trainer" if args.trainer else "config",
                                  tol=args.tol if args.tol is not None else (1e-4 if args.trainer else 1e-6),
                                  engine=args.engine, device=args.device, python=args.python,
                                  model_path=args.model, weights_from=args.weights_from)
    if args.format == "json":
        print(to_json(res))
    else:
        print(render(args.by, res))
    return 0


def render(by: str, res: dict) -> str:
    from replay.output import table

    if by == "steps":
        head = (f"onset: step {res['step']}" if res["step"] is not None else "onset: none (no departure found)")
        head += f"   method: {res['method']}" + (f" ({res['component']} error)" if res.get("component") else "")
        ev = res.get("evidence", [])
        if not ev:
            return head + ("\n" + res["reason"] if res.get("reason") else "")
        cols = list(ev[0].keys())
        return head + "\n" + table(cols, [[e[c] for c in cols] for e in ev])
    if by == "fixes":
        lack = res.get("lacking") or []
        if res.get("explained"):
            found = " + ".join(res["fixes"]) or "(none: the recorded config is at the floor)"
        else:
            found = f"NOT EXPLAINED by the known fixes: {res.get('reason')}"
        head = (f"step {res['step']}: {found}\nalready applied: {', '.join(res['already_applied']) or 'none'}; "
                f"searched: {', '.join(lack) or 'none'}   ({res['replays']} replays)")
        if res.get("explained"):
            from replay.diagnose.report import unneeded_lines

            head += "".join("\n" + line for line in unneeded_lines(res, res.get("floor", {}).get("dtype")))
        cols = ["label", "mean_abs_residual", "exceed", "n_tokens", "direction", "at_floor"]
        return head + "\n" + table(cols, [[a[c] for c in cols] for a in res["ablation"]])
    if by == "tokens":
        tok = res["token"]
        head = (f"step {res['step']}: {res['flagged']}/{res['sequences']} sequences exceed |{res['component']}| > "
                f"{res['tol']:.3g}; {res['at_or_after_boundary']}/{res['with_boundary']} of those with a version "
                f"boundary first exceed it at or after the boundary")
        if tok:
            head += f"\nworst: request {tok['request_id']} position {tok['pos']}"
        cols = ["request_id", "first_pos", "value", "max_abs", "version_boundary", "versions", "num_cached_tokens"]
        return head + "\n" + table(cols, [[s[c] for c in cols] for s in res["per_sequence"]])
    head = (f"token {res['request_id']}[{res['pos']}] at step {res['step']} (version {res['version']}): "
            f"first differing layer: {res['layer'] or 'none'} (tol {res['tol']})")
    return head + "\n" + table(["layer", "max_abs_diff"], [[r["layer"], r["max_abs_diff"]] for r in res["layers"]])
