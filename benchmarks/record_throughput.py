"""Recording throughput: the Recorder against the formats peers write.

A realistic stream per training step: 64 rollouts of 512 output tokens after a
128-token prompt (ids, engine logprobs, weight version per token), top-20
alternatives on 10% of the output tokens, the trainer's logprob per token of each
rollout, and a few metrics. The same stream is written as

* ``recorder``   replay.Recorder (Arrow IPC stream segments, zstd, rewritten as files on close);
                 ``recorder-strict`` the same with ``strict=True`` (validation on the caller's thread)
* ``jsonl``      one ``json.dumps`` line per rollout with lists
* ``torch.save`` one file per step, a dict of lists of tensors (the shape of slime's debug dumps)
* ``parquet``    one pandas DataFrame per step through ``to_parquet``

with inputs given two ways: Python lists (as vLLM hands them out) and numpy arrays
/ torch tensors. For each it prints output tokens per second end to end (including
close), the caller-side time per rollout, bytes on disk, and the ratios against
JSONL. ``--quick`` runs in well under 30 s.

    .venv/bin/python benchmarks/record_throughput.py [--quick] [--steps N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_ROLLOUTS, PROMPT, OUTPUT, TOPK, TOPK_FRAC, VOCAB = 64, 128, 512, 20, 0.10, 151_936
DISTINCT = 4  # distinct steps of data, cycled (keeps set-up short, compression honest)


def make_step(rng: np.random.Generator, step: int) -> list[dict]:
    """One step's rollouts as numpy arrays (converted to lists for the list feed)."""
    out = []
    n_top = int(OUTPUT * TOPK_FRAC)
    for i in range(N_ROLLOUTS):
        lp = -rng.exponential(0.4, OUTPUT).astype(np.float32)
        pos = np.sort(rng.choice(OUTPUT, n_top, replace=False)).astype(np.int32)
        top_lp = np.sort(-rng.exponential(2.0, (n_top, TOPK)).astype(np.float32), axis=1)[:, ::-1].copy()
        out.append({
            "request_id": f"s{step}-r{i}", "group_id": f"s{step}-g{i // 8}",
            "prompt_ids": rng.integers(0, VOCAB, PROMPT, dtype=np.int64),
            "output_ids": rng.integers(0, VOCAB, OUTPUT, dtype=np.int64),
            "logprobs": lp,
            "token_versions": np.full(OUTPUT, step, np.int64),
            "trainer_logprobs": np.minimum(lp + rng.normal(0, 0.01, OUTPUT).astype(np.float32), 0),
            "topk_pos": pos, "topk_ids": rng.integers(0, VOCAB, (n_top, TOPK), dtype=np.int64),
            "topk_logprobs": top_lp, "reward": float(rng.random()), "advantage": float(rng.normal()),
        })
    return out


def as_lists(step_data: list[dict]) -> list[dict]:
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in step_data]


def as_arrays(step_data: list[dict]) -> list[dict]:
    import torch

    out = []
    for r in step_data:
        r = dict(r)
        r["trainer_logprobs"] = torch.from_numpy(r["trainer_logprobs"]).to(torch.bfloat16)
        out.append(r)
    return out


METRICS = ("clip_rate", "kl_new_old", "entropy", "reward", "mean_abs_log_ratio")


# ---------------------------------------------------------------- writers

def write_recorder(root: Path, steps: list[list[dict]], strict: bool = False) -> float:
    from replay import Recorder

    caller = 0.0
    with Recorder(root / "rec", run_config={"bench": True}, strict=strict) as rec:
        for s, data in enumerate(steps):
            rec.event("step_start", step=s)
            for r in data:
                t0 = time.perf_counter()
                rec.rollout(step=s, request_id=r["request_id"], group_id=r["group_id"],
                            prompt_ids=r["prompt_ids"], output_ids=r["output_ids"], logprobs=r["logprobs"],
                            token_versions=r["token_versions"], reward=r["reward"], finish_reason="length",
                            temperature=1.0, top_p=1.0, top_k=-1, seed=s, logprobs_mode="raw_logprobs",
                            engine="vllm-0.32.0")
                rec.topk(step=s, request_id=r["request_id"], source="engine", ids=r["topk_ids"],
                         logprobs=r["topk_logprobs"], positions=r["topk_pos"])
                rec.trainer(step=s, request_id=r["request_id"], weight_version=s,
                            logprobs=r["trainer_logprobs"], advantage=r["advantage"])
                caller += time.perf_counter() - t0
            rec.metrics(step=s, values={m: 0.1 * s for m in METRICS}, source="trainer")
            rec.event("step_end", step=s)
    return caller


def _plain(v):
    if type(v).__module__.startswith("torch"):
        return v.float().tolist()
    return v.tolist() if isinstance(v, np.ndarray) else v


def write_jsonl(root: Path, steps: list[list[dict]]) -> float:
    caller = 0.0
    with open(root / "rollouts.jsonl", "w") as f:
        for s, data in enumerate(steps):
            for r in data:
                t0 = time.perf_counter()
                f.write(json.dumps({"step": s, **{k: _plain(v) for k, v in r.items()}}) + "\n")
                caller += time.perf_counter() - t0
            f.write(json.dumps({"step": s, "metrics": {m: 0.1 * s for m in METRICS}}) + "\n")
    return caller


def write_torch_save(root: Path, steps: list[list[dict]]) -> float:
    import torch

    def tensor(v):
        if type(v).__module__.startswith("torch"):
            return v.clone()
        return torch.as_tensor(v).clone() if isinstance(v, np.ndarray) else torch.tensor(v)

    caller = 0.0
    for s, data in enumerate(steps):
        t0 = time.perf_counter()
        dump = {k: [tensor(r[k]) if isinstance(r[k], (list, np.ndarray)) or hasattr(r[k], "dtype")
                    else r[k] for r in data] for k in data[0]}
        dump["metrics"] = {m: 0.1 * s for m in METRICS}
        torch.save(dump, root / f"step-{s:05d}.pt")
        caller += time.perf_counter() - t0
    return caller


def write_parquet(root: Path, steps: list[list[dict]]) -> float:
    import pandas as pd

    caller = 0.0
    for s, data in enumerate(steps):
        t0 = time.perf_counter()
        df = pd.DataFrame([{"step": s, **{k: _plain(v) for k, v in r.items()}} for r in data])
        df.to_parquet(root / f"step-{s:05d}.parquet")
        caller += time.perf_counter() - t0
    return caller


def write_recorder_strict(root: Path, steps: list[list[dict]]) -> float:
    return write_recorder(root, steps, strict=True)


WRITERS = {"recorder": write_recorder, "recorder-strict": write_recorder_strict, "jsonl": write_jsonl,
           "torch.save": write_torch_save, "parquet": write_parquet}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(n_steps: int, formats: list[str], feeds: list[str]) -> list[dict]:
    rng = np.random.default_rng(0)
    base = [make_step(rng, s) for s in range(DISTINCT)]
    results = []
    for feed in feeds:
        conv = as_lists if feed == "lists" else as_arrays
        distinct = [conv(d) for d in base]
        steps = [distinct[s % DISTINCT] for s in range(n_steps)]
        tokens = n_steps * N_ROLLOUTS * OUTPUT
        for fmt in formats:  # warm up: imports and first-call costs are paid once per process
            root = Path(tempfile.mkdtemp(prefix=f"bench-warm-{fmt}-"))
            WRITERS[fmt](root, steps[:1])
            shutil.rmtree(root, ignore_errors=True)
        for fmt in formats:
            root = Path(tempfile.mkdtemp(prefix=f"bench-{fmt}-"))
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                caller = WRITERS[fmt](root, steps)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                results.append({"feed": feed, "format": fmt, "tokens_per_s": tokens / wall, "wall_s": wall,
                                "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu,
                                "caller_us_per_rollout": caller / (n_steps * N_ROLLOUTS) * 1e6,
                                "bytes": du(root), "tokens": tokens})
            finally:
                shutil.rmtree(root, ignore_errors=True)
            r = results[-1]
            print(f"  {feed:6s} {fmt:16s} {r['tokens_per_s'] / 1e6:6.2f} M tok/s  "
                  f"{r['caller_us_per_rollout']:8.1f} µs/rollout  {r['bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    return results


def report(results: list[dict]) -> str:
    lines = [f"{'feed':7s}{'format':16s}{'M tok/s':>9s}{'M tok/cpu-s':>13s}{'µs/rollout':>12s}{'MiB':>9s}"
             f"{'x JSONL speed':>15s}{'x JSONL cpu':>13s}{'JSONL bytes /':>15s}"]
    for feed in dict.fromkeys(r["feed"] for r in results):
        rows = [r for r in results if r["feed"] == feed]
        ref = next((r for r in rows if r["format"] == "jsonl"), None)
        for r in rows:
            speed = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            cpu = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"] if ref else float("nan")
            size = ref["bytes"] / r["bytes"] if ref else float("nan")
            lines.append(f"{feed:7s}{r['format']:16s}{r['tokens_per_s'] / 1e6:9.2f}{r['tokens_per_cpu_s'] / 1e6:13.2f}"
                         f"{r['caller_us_per_rollout']:12.1f}{r['bytes'] / 2**20:9.1f}{speed:15.2f}{cpu:13.2f}"
                         f"{size:15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 steps instead of 64 (well under 30 s)")
    ap.add_argument("--steps", type=int, help="steps to record (default 64, or 16 with --quick)")
    ap.add_argument("--formats", default=",".join(WRITERS), help="comma-separated subset of " + ",".join(WRITERS))
    ap.add_argument("--feeds", default="lists,arrays", help="lists, arrays or both")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    n = args.steps or (16 if args.quick else 64)
    print(f"{n} steps x {N_ROLLOUTS} rollouts x {OUTPUT} output tokens (+{PROMPT} prompt), "
          f"top-{TOPK} on {TOPK_FRAC:.0%} of tokens; cpus={os.cpu_count()}", file=sys.stderr)
    results = run(n, args.formats.split(","), args.feeds.split(","))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
