"""``replay rerun``: re-execute recorded steps under another engine config, print fidelity and mismatch."""
from __future__ import annotations

import argparse
import sys

from replay.cli.args import POSITIVE_INT, config_args, engine_args, format_arg, model_arg, weights_arg


def config_from_args(args, recorded):
    """The config to replay under: the recorded one, or a preset, with the given fixes."""

    from replay.fixes import apply_fix, resolve

    cfg = resolve(args.preset, dtype=recorded.dtype) if args.preset else recorded
    for f in args.fix:
        cfg = apply_fix(cfg, f)
    return cfg


def parse_steps(text: str, flag: str = "--step") -> list[int]:
    """``"3"``, ``"2-5"`` or ``"1,4,7-9"``: steps >= 0, ranges low to high, both ends given."""
    from replay.errors import BadInput

    out: list[int] = []
    for part in str(text).split(","):
        a, dash, b = part.strip().partition("-")
        try:
            lo = int(a)
            hi = int(b) if dash else lo
        except ValueError:
            raise BadInput(f"{flag} takes N, A-B or a comma list of them (steps >= 0), not {text!r}",
                           field=flag.lstrip("-")) from None
        if lo < 0 or hi < lo:
            raise BadInput(f"{flag} range {part.strip()!r} is empty or negative: write A-B with 0 <= A <= B",
                           field=flag.lstrip("-"))
        out += range(lo, hi + 1)
    return sorted(set(out))


def _score_fidelity(f: dict) -> str:
    """Replayed vs recorded logprobs in a few words (tokens outside the replayed config's
    sampling support have logprob -inf there and are counted, not averaged)."""
    if f.get("exact"):
        return "exact"
    if f.get("outside_support"):
        return (f"mean |Δ| {f.get('mean_abs_diff', float('nan')):.2e}, "
                f"{f['outside_support']}/{f.get('n_tokens')} outside support")
    return f"max |Δ| {f.get('max_abs_diff', float('nan')):.2e}"


def prefix_cache_warnings(summaries: list[dict], each: int = 3) -> list[str]:
    """Where the replay's prefix-cache hits differ from the recording's: a line per step for up to
    ``each`` steps, else one line over all of them."""
    differ = [s for s in summaries if (s.get("prefix_cache") or {}).get("requests_differ")]
    why = ("expected when the replayed config changes prefix caching or the block size; under the "
           "recorded one, the replay's KV is not the run's")

    def counts(pcs: list[dict]) -> str:
        return (f"{sum(p['requests_differ'] for p in pcs)} of {sum(p['requests'] for p in pcs)} requests "
                f"({sum(p['replayed_tokens'] for p in pcs)} cached prompt tokens replayed, "
                f"{sum(p['recorded_tokens'] for p in pcs)} recorded)")
    if len(differ) <= each:
        return [f"step {s['step']}: prefix-cache hits differ from the recording in {counts([s['prefix_cache']])}: "
                f"{why}" for s in differ]
    from replay.rerun.plans import step_ranges

    steps = [s["step"] for s in differ]
    return [f"steps {step_ranges(steps)} ({len(steps)} of {len(summaries)}): prefix-cache hits differ from the "
            f"recording in {counts([s['prefix_cache'] for s in differ])}: {why}"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rerun", help="re-execute recorded steps under another engine config",
        description="Replay recorded steps under the recorded config (fidelity) or another preset / "
                    "fix set, write the replayed logprobs into the recording's replays table, and print "
                    "fidelity and the mismatch metrics (trainer vs recorded, trainer vs replayed).")
    p.add_argument("path", help="recording folder")
    p.add_argument("--step", required=True, help="step, range A-B, list 1,3,5, or all")
    p.add_argument("--mode", choices=("score", "regenerate"), default="score")
    config_args(p)
    engine_args(p)
    model_arg(p)
    weights_arg(p)
    p.add_argument("--jobs", type=POSITIVE_INT, default=1, help="replay chunks of the steps in N worker processes")
    p.add_argument("--batch", type=POSITIVE_INT, default=256, metavar="N",
                   help="without prefix caching, replay consecutive steps together, up to N requests per "
                        "engine call (1: one step per call; default 256)")
    p.add_argument("--no-write", action="store_true", help="do not write the replays table")
    format_arg(p, help="json: one object for --step N, a list of objects for a range, list or all")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.output import table, to_json
    from replay.errors import RecordingError
    from replay.rerun.replayer import Replayer

    every = args.step.strip() == "all"
    steps = [] if every else parse_steps(args.step)
    out = []
    with Replayer(args.path, engine=args.engine, device=args.device, python=args.python,
                  model_path=args.model, weights_from=args.weights_from) as rp:
        cfg = config_from_args(args, rp.recorded_config())
        for w in rp.warnings:
            print(f"replay: warning: {w}", file=sys.stderr)
        if every:  # every complete step; an incomplete one (a writer killed during it) is named
            steps = rp.complete_steps()
            if not steps:
                raise RecordingError(f"{args.path} has no complete step to replay (steps with rollouts: "
                                     f"{rp.steps() or 'none'})", "cannot replay")
            left = sorted(set(rp.steps()) - set(steps))
            if left:
                print(f"replay: skipping incomplete step(s) {', '.join(map(str, left))}", file=sys.stderr)
        progress = (lambda msg: print(f"  … {msg}", file=sys.stderr)) if args.format == "table" else None
        for res in rp.replay_range(steps, cfg, mode=args.mode, jobs=args.jobs, batch=args.batch,
                                   write=not args.no_write,
                                   progress=progress):
            s = res.summary()
            s["config"] = cfg.to_dict()
            s["note"] = res.note
            out.append(s)
    if args.format == "json":
        # one object for --step N, a list for a range, a list or all (whatever it holds)
        print(to_json(out[0] if args.step.strip().isdigit() else out))
        return 0
    cols = ["step", "config_id", "mode", "fidelity", "recorded |r|", "replayed |r|", "recorded clip",
            "replayed clip", "replayed kl_new_old", "outside support"]
    rows = []
    for s in out:
        f = s.get("fidelity", {})
        fid = (_score_fidelity(f) if "exact" in f
               else f"{f.get('identical_sequences')} identical, first diff {f.get('first_diff')}")
        rec, rep = s.get("recorded", {}), s.get("replayed", {})
        rows.append([s["step"], s["config_id"], s["mode"], fid, rec.get("mean_abs_log_ratio"),
                     rep.get("mean_abs_log_ratio"), rec.get("clip_rate"), rep.get("clip_rate"),
                     rep.get("kl_new_old"),
                     f"{rep['outside_support']}/{rec['n_tokens']}" if "outside_support" in rep else None])
    print(table(cols, rows))
    print(f"config: {' '.join(f'{k}={v}' for k, v in out[0]['config'].items())}")
    if out[0]["note"]:
        print(f"note: {out[0]['note']}")
    for line in prefix_cache_warnings(out):
        print(f"replay: warning: {line}", file=sys.stderr)
    if any(s.get("replayed", {}).get("outside_support") for s in out):
        print("outside support: scored tokens the replayed config could not have sampled (logprob "
              "-inf there); the replayed metrics leave them out, the recorded ones do not")
    return 0
