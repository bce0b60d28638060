"""Replayed tokens per second, against a plain HF-transformers forward over the same tokens.

    python benchmarks/replay_throughput.py [--recording PATH] [--steps N] [--quick]

Without --recording it records a short demo run (v1 semantics) into a temporary folder
first. The replayer runs every recorded step teacher-forced under the recorded config
(the full event-driven path: weight versions, in-flight update, prefix cache); the
baseline runs the trainer's HF model forward (float32, one padded batch per step,
weights of the step's serving version) over the same prompt+output tokens. Both run
in this process, one after the other, on the same machine.

A second table replays the same steps under V0 semantics (no prefix cache links one
step to the next), once one step per engine call (``batch=1``) and once with
consecutive steps batched into shared calls (the default), and prints the ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def baseline(path: Path, model_path: Path, steps: list[int]) -> tuple[int, float]:
    import torch

    from replay import open_recording
    from replay.demo.rl import padded_batch
    from replay.models import load_model

    model = load_model(model_path, dtype="float32")
    tokens, elapsed = 0, 0.0
    with open_recording(path) as rec:
        for step in steps:
            rows = rec.sql("SELECT prompt_ids, output_ids, token_versions[1] FROM rollouts WHERE step = ?",
                           [step]).fetchall()
            sd = rec.load_weights(rows[0][2])
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
            ids, attn, _ = padded_batch([list(r[0]) for r in rows], [list(r[1]) for r in rows])
            t = time.perf_counter()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn).logits
                torch.log_softmax(logits.float(), -1)
            elapsed += time.perf_counter() - t
            tokens += sum(len(r[1]) for r in rows)
    return tokens, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recording", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None, help="replay the first N steps (default all)")
    ap.add_argument("--quick", action="store_true", help="a 4-step recording, under 60 s")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from replay.rerun.replayer import Replayer

    path = args.recording
    if path is None:
        from replay.demo.runner import main as demo

        out = Path(tempfile.mkdtemp(prefix="replay-bench-"))
        print(f"recording a short demo run into {out} ...")
        demo(out=str(out), steps=4 if args.quick else 12, runs=["v1"], plot=False, jobs=1)
        path = out / "v1"
    with Replayer(path) as rp:
        steps = rp.steps()[: args.steps] if args.steps else rp.steps()
        rp.replay(steps[0], write=False)  # warm-up: engine start, weights
        rp._position.clear()
        rp._engines.clear()
        n_tok, t0 = 0, time.perf_counter()
        for s in steps:
            res = rp.replay(s, write=False)
            n_tok += sum(len(r.replayed) for r in res.rows)
        t_replay = time.perf_counter() - t0
        model_path = rp.model_path
    b_tok, t_base = baseline(path, model_path, steps)
    r_rate, b_rate = n_tok / t_replay, b_tok / t_base
    print(f"{'path':<52} {'tokens':>8} {'seconds':>8} {'tokens/s':>10}")
    print(f"{'replay (teacher-forced generation path, reference)':<52} {n_tok:>8} {t_replay:>8.2f} {r_rate:>10.0f}")
    print(f"{'HF transformers forward + log_softmax (baseline)':<52} {b_tok:>8} {t_base:>8.2f} {b_rate:>10.0f}")
    print(f"ratio replay / baseline: {r_rate / b_rate:.2f}x")
    batched(path, steps)


def batched(path: Path, steps: list[int], batch: int = 256) -> None:
    import dataclasses

    from replay.fixes import resolve
    from replay.rerun.replayer import Replayer

    with Replayer(path) as rp:
        cfg = dataclasses.replace(resolve("v0"), dtype=rp.recorded_config().dtype)
        rp.replay_range(steps[:1], cfg, write=False)  # warm-up: engine start, weights
        rates, calls = {}, {}
        for b in (1, batch):
            before, t0 = rp.engine_calls, time.perf_counter()
            res = rp.replay_range(steps, cfg, batch=b, write=False)
            n = sum(len(r.replayed) for x in res for r in x.rows)
            rates[b], calls[b] = n / (time.perf_counter() - t0), rp.engine_calls - before
    print(f"\n{'range replay under v0 semantics':<52} {'calls':>8} {'tokens/s':>10}")
    for b in rates:
        label = "one step per engine call (batch=1)" if b == 1 else f"steps batched (batch={b} requests)"
        print(f"{label:<52} {calls[b]:>8} {rates[b]:>10.0f}")
    print(f"ratio batched / one step per call: {rates[batch] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
