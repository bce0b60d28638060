"""``replay demo``: prepare the model, run every config, print the table, draw the plot."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from replay.fixes import FIX_IDS, EngineConfig, resolve
from replay.demo.pipeline import RunSpec
from replay.demo.report import format_table, plot_curves
from replay.demo.rl import TrainConfig

REFERENCE = "v0"
SPREAD_SEEDS = 3   # v0 is run with this many seeds; their envelope is "the spread of v0"


def default_runs() -> list[str]:
    """v0, v1, v1+fixes, each fix alone on v1, and the fixes cumulative in the source's order."""
    runs = ["v0", "v1", "v1+fixes"]
    runs += [f"v1+{f}" for f in FIX_IDS]
    runs += ["v1+" + "+".join(FIX_IDS[:i]) for i in range(2, len(FIX_IDS))]
    return runs


def run_config(name: str, dtype: str) -> EngineConfig:
    from replay.fixes import parse_run_name

    preset, fixes = parse_run_name(name)
    return resolve(preset, fixes, dtype=dtype)


def prepare_model(out: Path, *, size: str, seed: int, sft_steps: int = 14, sft_lr: float = 3e-3) -> Path:
    """A tiny Qwen2 built locally and warm-started with a few supervised steps (cached)."""
    import torch
    from safetensors.torch import save_file

    from replay.models import build_model, load_model
    from replay.demo.rl import warm_start
    from replay.demo.task import sft_examples

    model_dir = out / ".model" / f"{size}-seed{seed}-sft{sft_steps}"
    if (model_dir / ".warm").exists():
        return model_dir
    _quiet()
    base = build_model(out / ".model" / f"{size}-seed{seed}-base", size=size, seed=seed)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    torch.manual_seed(seed)
    model = load_model(base, dtype="float32")
    prompts, targets = sft_examples()
    # Half the problems only: the policy starts good at some, bad at others, so RL has work to do.
    warm_start(model, prompts, targets, steps=sft_steps, lr=sft_lr, seed=seed)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / ".warm").write_text("1")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir


def _quiet() -> None:
    """Keep the demo's output to its progress, table and plot (engine libraries chatter)."""
    import warnings

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _worker(spec: RunSpec, queue) -> dict:
    import torch

    _quiet()
    torch.set_num_threads(1)
    from replay.demo.pipeline import run, save_summary

    shutil.rmtree(Path(spec.out_dir) / spec.name, ignore_errors=True)
    result = run(spec, progress=lambda i, n: queue.put((spec.name, i, n)))
    save_summary(Path(spec.out_dir) / spec.name, result)
    return result


def run_all(specs: list[RunSpec], jobs: int) -> list[dict]:
    """Run every spec (in ``jobs`` processes), with a progress bar per run."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    width = max(len(s.name) for s in specs)
    # In a terminal, one live bar per run; in a log (CI), a line per run as it ends.
    live = sys.stderr.isatty()
    bars = {s.name: tqdm(total=s.steps, desc=f"{s.name:<{width}}", position=i, leave=True, file=sys.stderr,
                         disable=not live, bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}]")
            for i, s in enumerate(specs)}
    t0 = time.time()
    results: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, s, queue): s.name for s in specs}
        pending = set(futures)
        while pending:
            while not queue.empty():
                name, i, n = queue.get()
                bars[name].n = i
                bars[name].refresh()
            done = {f for f in pending if f.done()}
            for f in done:
                results[futures[f]] = f.result()
                if not live:
                    print(f"  {futures[f]:<{width}} done ({time.time() - t0:.0f} s)", file=sys.stderr)
                bars[futures[f]].n = bars[futures[f]].total
                bars[futures[f]].refresh()
            pending -= done
            time.sleep(0.1)
    for b in bars.values():
        b.close()
    manager.shutdown()
    return [results[s.name] for s in specs]


def summarize(results: list[dict], reference: list[dict]) -> list[dict]:
    """One row per run: final reward, mean metrics, the share of V1's mismatch gap it closes,
    and the step where it departs from v0 (``replay bisect --by steps`` against v0)."""
    from replay.diagnose.bisect import bisect_steps

    def mean_abs_r(res):
        return float(np.nanmean([s["mean_abs_log_ratio_new_old"] for s in res["history"]]))

    by_name = {r["name"]: r for r in results}
    v0 = mean_abs_r(reference[0])
    v1 = mean_abs_r(by_name["v1"]) if "v1" in by_name else None
    rows = []
    for res in results:
        h = res["history"]
        arr = {k: np.array([s[k] for s in h], dtype=float) for k in h[0]} if h else {}
        last = max(1, len(h) // 5)
        rows.append({
            "run": res["name"],
            "config_id": res["config_id"],
            "final_reward": float(np.nanmean(arr["reward"][-last:])),
            "clip_rate": float(np.nanmean(arr["clamp_log_ratio_new_old_indicator"])),
            "kl_new_old": float(np.nanmean(arr["kl_new_old"])),
            "entropy": float(np.nanmean(arr["entropy"])),
            "mean_abs_r": float(np.nanmean(arr["mean_abs_log_ratio_new_old"])),
            "gap_closed": (None if v1 is None or abs(v1 - v0) < 1e-12
                           else float((v1 - mean_abs_r(res)) / (v1 - v0))),
            "departs_at": (None if res["name"] == reference[0]["name"]
                           else bisect_steps(res["path"], reference[0]["path"])["step"]),
        })
    return rows


def specs_for(names: list[str], *, out: Path, model_dir: Path, seed: int, steps: int, engine: str,
              device: str, dtype: str, objective: str) -> list[RunSpec]:
    specs = []
    for name in names:
        # The V0 reference runs on the reference engine; --engine vllm moves the V1 runs.
        kind = "reference" if name.startswith("v0") else engine
        specs.append(RunSpec(name=name, config=run_config(name.split("@")[0], dtype), model_dir=str(model_dir),
                             out_dir=str(out), seed=seed + (int(name.split("@seed")[1]) if "@seed" in name else 0),
                             steps=steps, engine=kind, device=device, train=TrainConfig(objective=objective)))
    return specs


def main(*, out: str = "recordings/demo", steps: int = 32, seed: int = 0, runs: list[str] | None = None,
         engine: str = "reference", device: str = "cpu", jobs: int | None = None, size: str = "tiny",
         dtype: str = "float32", objective: str = "gspo", plot: bool = True, spread: int = SPREAD_SEEDS) -> dict:
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    names = runs or default_runs()
    for n in names:
        run_config(n.split("@")[0], dtype)  # validate names before any work
    if REFERENCE not in names:
        names = [REFERENCE] + names
    seeds = [f"{REFERENCE}@seed{i}" for i in range(1, max(1, spread))]
    t0 = time.time()
    print(f"replay demo: preparing the {size} model (built locally, warm-started)", file=sys.stderr)
    model_dir = prepare_model(out_p, size=size, seed=seed)
    specs = specs_for(names + seeds, out=out_p, model_dir=model_dir, seed=seed, steps=steps, engine=engine,
                      device=device, dtype=dtype, objective=objective)
    jobs = jobs or max(1, min(len(specs), os.cpu_count() or 1))
    print(f"replay demo: {len(specs)} runs of {steps} steps on the {engine} engine, {jobs} at a time",
          file=sys.stderr)
    results = run_all(specs, jobs)
    by_name = {r["name"]: r for r in results}
    reference = [by_name[REFERENCE]] + [by_name[s] for s in seeds]
    rows = summarize([by_name[n] for n in names], reference)

    print(format_table(rows))
    summary = {"out": str(out_p), "rows": rows, "seconds": round(time.time() - t0, 1),
               "runs": {r["name"]: r["path"] for r in results}}
    if plot:
        png = plot_curves(results, out_p / "demo.png", spread_names=[REFERENCE] + seeds)
        summary["plot"] = str(png)
        print(f"plot: {png}")
    (out_p / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"recordings: {out_p}/<run>   (try: replay info {out_p}/v1 ; "
          f"replay tui {out_p}/v1 --against {out_p}/v0)")
    return summary
