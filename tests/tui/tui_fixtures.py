"""Recordings for the TUI tests (builders; the fixtures are in conftest.py), written by the real Recorder, deterministic.

``reference``: |r| small at every step. ``diverging``: the same run until
ONSET_STEP, then |r| grows, a weight update lands mid-sequence (two weight versions
in one sequence), tokens clip and the reward drops. Both have top-k rows and
prefix-cache hits. ``write_steps`` is also used to keep a live recording growing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from replay import Recorder

N_STEPS = 6
N_SEQS = 4
ONSET_STEP = 3
TOPK = 3


def write_steps(rec: Recorder, steps, *, diverge_from: int | None, seed: int = 0) -> None:
    """Write ``steps`` (rollouts, trainer scores, top-k) into ``rec``; deterministic per step."""
    for step in steps:
        rng = np.random.default_rng(1000 * seed + step)
        bad = diverge_from is not None and step >= diverge_from
        for i in range(N_SEQS):
            rid = f"s{step}-q{i}"
            n = 10 + 3 * i
            out = rng.integers(100, 999, n).astype(np.int32)
            lp = -(0.05 + rng.gamma(2.0, 0.3, n)).astype(np.float32)
            scale = 0.02 + 0.15 * i if bad else 0.004
            r = rng.normal(0.0, scale, n)
            if bad and i == N_SEQS - 1:
                r[n // 2] = -1.5         # one token far outside the clip band
            tlp = np.minimum(lp + r, -1e-3).astype(np.float32)
            versions = np.full(n, step, dtype=np.int64)
            if bad and i >= 2:
                versions[n // 2:] = step + 1  # a concurrent weight update mid-sequence
            prompt = rng.integers(1, 99, 8).astype(np.int32)
            reward = float(0.5 + 0.05 * step - (0.3 if bad else 0.0) + 0.01 * i)
            rec.rollout(step=step, request_id=rid, group_id=f"g{step}", prompt_ids=prompt,
                        output_ids=out, logprobs=lp, token_versions=versions, reward=reward,
                        finish_reason="stop", temperature=1.0, top_p=1.0, top_k=-1, seed=step,
                        logprobs_mode="raw_logprobs", engine="reference",
                        num_cached_tokens=4 if i % 2 else 0)
            ent = rng.uniform(0.5, 1.5, n).astype(np.float32)
            rec.trainer(step=step, request_id=rid, weight_version=step + (1 if bad else 0),
                        logprobs=tlp, entropy=ent, advantage=reward - 0.5)
            ids = np.stack([out, out + 1, out + 2], axis=1).astype(np.int32)
            lps = np.stack([lp, lp - 1.0, lp - 2.0], axis=1).astype(np.float32)
            rec.topk(step=step, request_id=rid, source="engine", ids=ids, logprobs=lps)
            rec.topk(step=step, request_id=rid, source="trainer", ids=ids,
                     logprobs=np.stack([tlp, tlp - 1.0, tlp - 2.0], axis=1).astype(np.float32))
        rec.event("step_end", step=step, weight_version=step)


def make_run(path: Path, *, diverge_from: int | None, seed: int, steps=range(N_STEPS)) -> Path:
    cfg = {"model": "tiny", "engine": {"name": "reference"}}
    with Recorder(path, run_config=cfg, run_id=path.name) as rec:
        write_steps(rec, steps, diverge_from=diverge_from, seed=seed)
    return path




def run_async(fn):
    """Run an ``async def`` test on its own event loop (no asyncio plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def screen_text(app) -> str:
    """What the terminal shows now, as plain text lines."""
    strips = app.screen._compositor.render_strips()
    return "\n".join("".join(seg.text for seg in s) for s in strips)
