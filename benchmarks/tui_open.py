"""TUI responsiveness: time to the timeline (with its onset) and step-view latency.

Builds two recordings of ``--tokens`` generated tokens each with the Recorder from
numpy arrays: a reference with small |r| and a run that departs from it at 60% of
its steps. Then it starts the app headless (Textual's ``run_test``) on the run
against the reference and measures:

* ``open``: from app start to the timeline shown with the onset marked;
* ``sequence``: key press (down in the sequences table) to the sequence's tokens shown;
* ``token``: key press (right in the token view) to the token's detail pane filled.

``--demo [DIR]`` also measures ``open`` on ``recordings/demo`` (or DIR) (the demo's v1 against v0)
when those recordings exist. Targets: ``open`` ≤ 3 s for 10M tokens, ≤ 2 s on the
demo's recordings.

    .venv/bin/python benchmarks/tui_open.py [--tokens 10000000] [--keep DIR] [--demo [DIR]]
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_LEN = 1000      # output tokens per sequence
SEQS_PER_STEP = 200  # sequences per step


def build(path: Path, n_tokens: int, diverge_at: float | None, seed: int) -> float:
    """Write a recording of about ``n_tokens`` tokens; returns seconds spent."""
    from replay import Recorder

    rng = np.random.default_rng(seed)
    n_seqs = max(n_tokens // SEQ_LEN, 1)
    n_steps = max(n_seqs // SEQS_PER_STEP, 1)
    per_step = max(n_seqs // n_steps, 1)
    onset = int(n_steps * diverge_at) if diverge_at is not None else None
    t0 = time.perf_counter()
    with Recorder(path, run_config={"model": "synthetic"}, run_id=path.name) as rec:
        prompt = rng.integers(0, 32000, 64, dtype=np.int32)
        for step in range(n_steps):
            bad = onset is not None and step >= onset
            for i in range(per_step):
                out = rng.integers(0, 32000, SEQ_LEN, dtype=np.int32)
                lp = -(0.05 + rng.exponential(0.5, SEQ_LEN)).astype(np.float32)
                r = rng.normal(0.0, 0.25 if bad else 0.005, SEQ_LEN)
                tlp = np.minimum(lp + r, -1e-4).astype(np.float32)
                rid = f"s{step}-r{i}"
                rec.rollout(step=step, request_id=rid, prompt_ids=prompt, output_ids=out, logprobs=lp,
                            token_versions=np.full(SEQ_LEN, step, np.int64), reward=float(rng.random()),
                            num_cached_tokens=0)
                rec.trainer(step=step, request_id=rid, weight_version=step, logprobs=tlp,
                            entropy=np.full(SEQ_LEN, 1.0, np.float32))
    return time.perf_counter() - t0


def _percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
    return f"median {statistics.median(xs) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(xs)})"


async def _until(pilot, cond, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > deadline:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.005)


async def measure(run: Path, ref: Path, presses: int = 10) -> dict:
    from tui.app import make_app
    from tui.screens.step import StepScreen
    from tui.screens.timeline import TimelineScreen

    out: dict = {}
    t0 = time.perf_counter()
    app = make_app(run, ref, root=run.parent)
    async with app.run_test(size=(160, 48)) as pilot:
        def timeline_shown():
            s = app.screen
            return isinstance(s, TimelineScreen) and s.timeline is not None
        await _until(pilot, timeline_shown)
        out["open_s"] = time.perf_counter() - t0
        out["onset"] = app.screen.timeline.onset.step
        out["onset_method"] = app.screen.timeline.onset.method
        # replay.diagnose.bisect refines the onset in the background; time it too
        tl = app.screen
        await _until(pilot, lambda: not any(w.group == "onset" and w.is_running for w in app.workers))
        out["bisect_s"] = time.perf_counter() - t0
        out["bisect_onset"] = tl.timeline.onset.step
        out["bisect_method"] = tl.timeline.onset.method
        if presses <= 0:
            return out
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, StepScreen) and app.screen.tokens is not None)
        step = app.screen
        seq_lat = []
        for _ in range(presses):
            before = step.tokens
            t = time.perf_counter()
            await pilot.press("down")
            await _until(pilot, lambda b=before: step.tokens is not b)
            seq_lat.append(time.perf_counter() - t)
        await pilot.press("enter")
        await _until(pilot, lambda: step.detail is not None)
        tok_lat = []
        for _ in range(presses):
            before = step.detail
            t = time.perf_counter()
            await pilot.press("right")
            await _until(pilot, lambda b=before: step.detail is not b)
            tok_lat.append(time.perf_counter() - t)
        out["sequence_latency"] = _percentiles(seq_lat)
        out["token_latency"] = _percentiles(tok_lat)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="generated tokens per recording")
    ap.add_argument("--keep", type=Path, default=None, help="write the recordings here and keep them")
    ap.add_argument("--presses", type=int, default=10, help="key presses per latency figure")
    ap.add_argument("--demo", nargs="?", const=ROOT / "recordings" / "demo", default=None, type=Path,
                    metavar="DIR", help="also time opening DIR/v1 against DIR/v0 (default DIR: recordings/demo)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="tui-bench-"))
    run, ref = base / "run", base / "ref"
    try:
        if not (run / "manifest.json").exists():
            w1 = build(ref, args.tokens, None, seed=1)
            w2 = build(run, args.tokens, 0.6, seed=2)
            print(f"built 2 recordings of {args.tokens:,} tokens in {w1:.1f} s + {w2:.1f} s")
        res = asyncio.run(measure(run, ref, args.presses))
        print(f"open → timeline with onset: {res['open_s']:.2f} s for {args.tokens:,} tokens per run "
              f"(onset step {res['onset']}, {res['onset_method']}; target ≤ 3 s at 10M)")
        print(f"onset from replay.diagnose.bisect in the background: {res['bisect_s']:.2f} s after start "
              f"(step {res['bisect_onset']}, {res['bisect_method']})")
        print(f"step view, next sequence:   {res['sequence_latency']}")
        print(f"step view, next token:      {res['token_latency']}")
        if args.demo is not None:
            demo = args.demo
            pair = (demo / "v1", demo / "v0")
            if all((p / "manifest.json").exists() for p in pair):
                d = asyncio.run(measure(*pair, presses=0))
                print(f"demo open → timeline with onset: {d['open_s']:.2f} s (onset step {d['onset']}; "
                      f"target ≤ 2 s)")
            else:
                print(f"demo recordings not found under {demo} (run `replay demo` first)")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
