"""Read-path scale: recordings of 10M and 100M tokens over 8 ranks, queried as a user would.

Each recording is written by the real Recorder from 8 writer processes (``--jobs`` at
a time), one per rank, with numpy inputs: per step and rank 64 rollouts of 512 output
tokens after a 128-token prompt (ids, engine logprobs, weight version per token), the
trainer's logprob and entropy per token of each rollout, top-20 alternatives on 16
positions of one rollout in 8, and a few metrics. Built recordings are kept under
``--out`` (default /tmp/replay-scale) and reused by later runs.

Measured, each in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own:

* ``write``         tokens per second of the build (all ranks, wall clock, including close)
* ``step_metrics``  ``SELECT * FROM step_metrics`` through ``open_recording(...).sql``
* ``cli_metrics``   the same through ``replay sql --format csv``
* ``lookup``        ``SELECT * FROM tokens WHERE step = ? AND request_id = ?`` (one rollout),
                    and by ``request_id`` alone
* ``info``          ``replay info --format json``
* ``open``          ``open_recording`` twice in one process: the first open checks every listed
                    segment's sha256 (the integrity check), the re-open finds them in the
                    process's cache (files unchanged), so the difference is the check's cost
* ``pandas``        the baseline: the same rollouts and trainer rows written once as Parquet,
                    then ``pd.read_parquet`` + the same per-step metrics in pandas/numpy

    .venv/bin/python benchmarks/scale.py [--quick] [--tokens 10M,100M] [--out DIR] [--clean]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RANKS, PER_STEP, PROMPT, OUTPUT, TOPK, TOPK_POS, VOCAB = 8, 64, 128, 512, 20, 16, 151_936
POOL = 1 << 23  # random numbers per rank that rollouts are cut from
HERE = Path(__file__).resolve()
PY = sys.executable


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def steps_for(tokens: int) -> int:
    return max(1, round(tokens / (RANKS * PER_STEP * OUTPUT)))


# ---------------------------------------------------------------- building

def write_rank(root: str, rank: int, steps: int, segment_mib: int = 64) -> float:
    """Rank ``rank``'s share of every step; returns its wall time."""
    from replay import Recorder

    rng = np.random.default_rng(rank)
    n = POOL + OUTPUT  # slices at random offsets of big random buffers: fresh-looking data, cheap
    ids = rng.integers(0, VOCAB, n, dtype=np.int32)
    lps = -rng.exponential(0.4, n).astype(np.float32)
    noise = rng.normal(0, 0.05, n).astype(np.float32)
    ent = rng.uniform(0, 3, n).astype(np.float32)
    topk_lp = np.sort(-rng.exponential(2.0, (TOPK_POS, TOPK)).astype(np.float32), axis=1)[:, ::-1].copy()
    topk_pos = np.sort(rng.choice(OUTPUT, TOPK_POS, replace=False)).astype(np.int32)

    def cut(buf: np.ndarray, k: int) -> np.ndarray:
        o = int(rng.integers(0, POOL))
        return buf[o:o + k]
    t0 = time.perf_counter()
    with Recorder(root, run_config={"bench": "scale"}, rank=rank, segment_bytes=segment_mib << 20) as rec:
        for s in range(steps):
            rec.event("step_start", step=s, weight_version=s)
            versions = np.full(OUTPUT, max(0, s - (rank % 3)), np.int64)
            for i in range(PER_STEP):
                lp = cut(lps, OUTPUT)
                rid = f"s{s}-k{rank}-r{i}"
                rec.rollout(step=s, request_id=rid, group_id=f"s{s}-k{rank}-g{i // 8}",
                            prompt_ids=cut(ids, PROMPT), output_ids=cut(ids, OUTPUT), logprobs=lp,
                            token_versions=versions, reward=float((i * 7 + s) % 5 == 0),
                            finish_reason="length", temperature=1.0, top_p=1.0, top_k=-1, seed=s,
                            logprobs_mode="raw_logprobs", engine="vllm-0.32.0")
                rec.trainer(step=s, request_id=rid, weight_version=s, logprobs=np.minimum(lp + cut(noise, OUTPUT), 0),
                            entropy=cut(ent, OUTPUT), advantage=0.1 * (i % 8 - 4))
                if i % 8 == 0:
                    rec.topk(step=s, request_id=rid, source="engine", ids=cut(ids, TOPK_POS * TOPK).reshape(TOPK_POS, TOPK),
                             logprobs=topk_lp, positions=topk_pos)
            rec.metrics(step=s, values={"loss": 0.01 * s, "grad_norm": 1.0}, source="trainer")
            rec.event("step_end", step=s)
    return time.perf_counter() - t0


def build(root: Path, tokens: int, jobs: int, segment_mib: int = 64) -> dict:
    """Write the recording (unless a complete one is there); returns its build figures."""
    done = root / "build.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    steps = steps_for(tokens)
    rec = root / "rec"
    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs) as ex:
        per_rank = list(ex.map(write_rank, [str(rec)] * RANKS, range(RANKS), [steps] * RANKS,
                               [segment_mib] * RANKS))
    wall = time.perf_counter() - t0
    n = steps * RANKS * PER_STEP * OUTPUT
    out = {"tokens": n, "steps": steps, "segment_mib": segment_mib, "write_s": wall,
           "write_tok_s": n / wall, "jobs": jobs,
           "rank_tok_s": n / RANKS / (sum(per_rank) / RANKS), "bytes": _du(rec)}
    t0 = time.perf_counter()
    write_parquet(rec, root / "parquet")
    out["parquet_s"] = time.perf_counter() - t0
    out["parquet_bytes"] = _du(root / "parquet")
    done.write_text(json.dumps(out))
    return out


def write_parquet(rec: Path, dest: Path) -> None:
    """The rollouts and trainer rows of the recording as Parquet (one file per table and rank)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    cols = {"rollouts": ["step", "request_id", "rank", "time_ns", "output_ids", "logprobs",
                         "token_versions", "reward"],
            "trainer": ["step", "request_id", "rank", "time_ns", "weight_version", "logprobs", "entropy"]}
    for table, names in cols.items():
        for rdir in sorted((rec / table).iterdir()):
            d = ds.dataset(sorted(str(p) for p in rdir.glob("*.arrow")), format="ipc")
            out = dest / table / f"{rdir.name}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            with pq.ParquetWriter(str(out), pa.schema([d.schema.field(c) for c in names])) as w:
                for batch in d.to_batches(columns=names):
                    w.write_batch(batch)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------- measurements (child side)

def pandas_metrics(parquet: Path):
    """The per-step metrics of ``step_metrics`` computed with pandas and numpy, the way
    a notebook would: read both tables, keep the latest scoring, merge, flatten, group."""
    import pandas as pd

    from replay.metrics import RHO_CLAMP, clip_bounds

    rol = pd.read_parquet(parquet / "rollouts", columns=["step", "request_id", "logprobs",
                                                         "token_versions", "reward"])
    tr = pd.read_parquet(parquet / "trainer", columns=["step", "request_id", "time_ns", "weight_version",
                                                       "logprobs", "entropy"])
    tr = tr.sort_values("time_ns").drop_duplicates(["step", "request_id"], keep="last")
    m = rol[["step", "request_id", "logprobs", "token_versions"]].merge(
        tr, on=["step", "request_id"], how="inner", suffixes=("_r", "_t"))
    del tr
    steps, codes = np.unique(m["step"].to_numpy(), return_inverse=True)
    lens = np.fromiter((min(len(a), len(b)) for a, b in zip(m["logprobs_r"], m["logprobs_t"])), np.int64, len(m))
    idx = np.repeat(codes, lens)

    def flat(col: str) -> np.ndarray:
        return np.concatenate([a[:k] for a, k in zip(m[col], lens)]).astype(np.float64)

    def per_step(w: np.ndarray) -> np.ndarray:
        return np.bincount(idx, weights=w, minlength=len(steps))

    lr, lt = flat("logprobs_r"), flat("logprobs_t")
    n = np.bincount(idx, minlength=len(steps)).astype(np.float64)
    lo, hi = clip_bounds()
    r = lt - lr
    out = pd.DataFrame({"step": steps, "n_tokens": n.astype(np.int64)})
    out["mean_abs_log_ratio"] = per_step(np.abs(r)) / n
    out["k1"] = -per_step(r) / n
    out["kl_new_old"] = per_step(np.exp(r) - 1 - r) / n
    out["clip_rate"] = per_step(((r < lo) | (r > hi)).astype(np.float64)) / n
    rho = np.exp(np.clip(r, -RHO_CLAMP, RHO_CLAMP))
    s1, s2 = per_step(rho), per_step(rho * rho)
    out["ess"] = s1 * s1 / s2 / n
    out["chi2"] = s2 / n - 1
    del rho, r
    out["prob_diff"] = per_step(np.abs(np.exp(lt) - np.exp(lr))) / n
    del lr, lt
    out["entropy"] = per_step(flat("entropy")) / n
    tv = flat("token_versions")
    out["lag"] = per_step(np.repeat(m["weight_version"].to_numpy(np.float64), lens) - tv) / n
    per_rollout = rol.groupby("step")["reward"].agg(["size", "mean"])
    return out.set_index("step").join(per_rollout, how="outer").reset_index()


def child(kind: str, root: str, arg: str) -> None:
    """One measurement; prints a JSON line with its time and result summary."""
    t0 = time.perf_counter()
    res: dict = {}
    if kind in ("step_metrics", "tokens_metrics"):
        from replay import open_recording
        from replay.metrics import step_metrics_sql
        query = "SELECT * FROM step_metrics ORDER BY step" if kind == "step_metrics" else step_metrics_sql()
        with open_recording(root) as rec:
            t1 = time.perf_counter()
            rows = rec.sql(query).fetchall()
            res = {"rows": len(rows), "n_tokens": sum(r[2] for r in rows), "query_s": time.perf_counter() - t1,
                   "kl_sum": sum(r[5] for r in rows if r[5] is not None)}
    elif kind == "lookup":
        from replay import open_recording
        step, rid = arg.split(",")
        with open_recording(root) as rec:
            t1 = time.perf_counter()
            n = len(rec.sql("SELECT * FROM tokens WHERE step = ? AND request_id = ?", [int(step), rid]).fetchall())
            t2 = time.perf_counter()
            n2 = len(rec.sql("SELECT * FROM tokens WHERE request_id = ?", [rid]).fetchall())
            res = {"rows": n, "query_s": t2 - t1, "rows_by_id": n2, "by_id_s": time.perf_counter() - t2}
    elif kind == "open":
        from replay import open_recording
        from replay.store.manifest import listed_segments
        t1 = time.perf_counter()
        with open_recording(root) as rec:
            listed = listed_segments(rec._member(None).manifest)
        t2 = time.perf_counter()
        with open_recording(root):
            pass
        t3 = time.perf_counter()
        res = {"first_s": t2 - t1, "reopen_s": t3 - t2, "segments": len(listed),
               "bytes": sum(int(e.get("bytes") or 0) for e in listed.values())}
    elif kind == "pandas":
        out = pandas_metrics(Path(root))
        res = {"rows": len(out), "n_tokens": int(out["n_tokens"].sum()), "kl_sum": float(out["kl_new_old"].sum())}
    res["s"] = time.perf_counter() - t0
    res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


# ---------------------------------------------------------------- measurements (parent side)

def run(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, peak RSS (MiB) and, for a child of this script, its JSON line."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over children so far: see below
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    res = {"wall_s": wall, "out": out}
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if last.startswith("{") and last.endswith("}"):
        try:
            res.update(json.loads(last))
        except json.JSONDecodeError:
            pass
    res.setdefault("rss_mib", ru.ru_maxrss / 1024)
    return res


def rss_wrap(cmd: list[str]) -> list[str]:
    """``cmd`` run under a tiny wrapper printing the child's own peak RSS as JSON."""
    code = ("import json,os,resource,subprocess,sys,time;t=time.perf_counter();"
            "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "sys.stderr.write(p.stderr);sys.exit(p.returncode) if p.returncode else None;"
            "print(p.stdout[-200:].replace(chr(10),' '));"
            "print(json.dumps({'s':time.perf_counter()-t,"
            "'rss_mib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    return [PY, "-c", code] + cmd


def measure(root: Path, built: dict, with_tokens_view: bool) -> dict:
    rec = str(root / "rec")
    me = [PY, str(HERE), "--child"]
    cli = [PY, "-m", "replay"]
    last = built["steps"] - 1
    out = {"built": built}
    out["step_metrics"] = run(me + ["step_metrics", rec, ""])
    if with_tokens_view:
        out["tokens_metrics"] = run(me + ["tokens_metrics", rec, ""])
    out["cli_metrics"] = run(rss_wrap(cli + ["sql", rec, "SELECT * FROM step_metrics", "--format", "csv"]))
    out["lookup"] = run(me + ["lookup", rec, f"{last // 2},s{last // 2}-k3-r17"])
    out["info"] = run(rss_wrap(cli + ["info", rec, "--format", "json"]))
    out["open"] = run(me + ["open", rec, ""])
    out["pandas"] = run(me + ["pandas", str(root / "parquet"), ""])
    return out


def report(size: str, r: dict) -> None:
    b, sm, pdm = r["built"], r["step_metrics"], r["pandas"]
    ok = sm["n_tokens"] == pdm["n_tokens"] == b["tokens"] and \
        abs(sm["kl_sum"] - pdm["kl_sum"]) <= 1e-6 * max(1.0, abs(pdm["kl_sum"]))
    print(f"\n== {size}: {b['tokens']:,} tokens, {b['steps']} steps, {RANKS} ranks, "
          f"{b.get('segment_mib', 64)} MiB segments, "
          f"{b['bytes'] / 2**30:.2f} GiB on disk (Parquet {b['parquet_bytes'] / 2**30:.2f} GiB)")
    rows = [
        ("write (Recorder, all ranks)", f"{b['write_tok_s'] / 1e6:.2f} M tok/s", f"{b['write_s']:.1f} s",
         f"{b['jobs']} procs; {b['rank_tok_s'] / 1e6:.2f} M tok/s per rank"),
        ("step_metrics (open_recording)", f"{sm['s']:.2f} s", f"{sm['rss_mib']:.0f} MiB",
         f"query {sm['query_s']:.2f} s"),
        *([("  same over the tokens view", f"{r['tokens_metrics']['s']:.2f} s",
             f"{r['tokens_metrics']['rss_mib']:.0f} MiB", f"query {r['tokens_metrics']['query_s']:.2f} s")]
          if "tokens_metrics" in r else []),
        ("step_metrics (replay sql)", f"{r['cli_metrics']['s']:.2f} s", f"{r['cli_metrics']['rss_mib']:.0f} MiB", ""),
        ("lookup step+request_id", f"{r['lookup']['query_s']:.3f} s", f"{r['lookup']['rss_mib']:.0f} MiB",
         f"{r['lookup']['rows']} rows; by request_id alone {r['lookup']['by_id_s']:.3f} s"),
        ("replay info", f"{r['info']['s']:.2f} s", f"{r['info']['rss_mib']:.0f} MiB", ""),
        *([("open, integrity check (first)", f"{r['open']['first_s']:.2f} s",
            f"{r['open']['bytes'] / 2**30:.2f} GiB",
            f"{r['open']['segments']} segments hashed, "
            f"{r['open']['bytes'] / 2**30 / max(1e-9, r['open']['first_s'] - r['open']['reopen_s']):.2f} GiB/s"),
           ("re-open (same process, cached)", f"{r['open']['reopen_s']:.2f} s", "",
            f"check cost = {r['open']['first_s'] - r['open']['reopen_s']:.2f} s")] if "open" in r else []),
        ("pandas+Parquet step metrics", f"{pdm['s']:.2f} s", f"{pdm['rss_mib']:.0f} MiB", ""),
        ("ratio pandas / replay", f"{pdm['s'] / sm['s']:.1f}x time", f"{pdm['rss_mib'] / sm['rss_mib']:.1f}x memory",
         "results agree" if ok else "RESULTS DIFFER"),
    ]
    for name, a, c, d in rows:
        print(f"  {name:32s} {a:>16s} {c:>12s}   {d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="10M,100M", help="comma-separated sizes (default 10M,100M)")
    ap.add_argument("--quick", action="store_true", help="10M tokens only")
    ap.add_argument("--out", default="/tmp/replay-scale", help="where built recordings are kept")
    ap.add_argument("--jobs", type=int, default=2, help="writer processes at a time (default 2)")
    ap.add_argument("--tokens-view", action="store_true",
                    help="also time the per-step metrics over the tokens view (the earlier read path)")
    ap.add_argument("--segment-mib", type=int, default=8,
                    help="Recorder segment_bytes in MiB (default 8, the Recorder's default); "
                         "a lookup reads every segment whose step range holds the step")
    ap.add_argument("--clean", action="store_true", help="delete --out and exit")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return 0
    out = Path(a.out)
    if a.clean:
        shutil.rmtree(out, ignore_errors=True)
        print(f"removed {out}")
        return 0
    sizes = ["10M"] if a.quick else [s for s in a.tokens.split(",") if s]
    need = sum(parse_size(s) for s in sizes) * 40  # bytes: recording + Parquet copy, generous
    free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
    if free < need:
        print(f"warning: {free / 2**30:.1f} GiB free under {out.parent}, about {need / 2**30:.1f} GiB "
              "may be needed", file=sys.stderr)
    results = {}
    for size in sizes:
        root = out / (size if a.segment_mib == 64 else f"{size}-seg{a.segment_mib}")
        print(f"building {size} under {root} ...", flush=True)
        built = build(root, parse_size(size), a.jobs, a.segment_mib)
        results[size] = measure(root, built, a.tokens_view)
        report(size, results[size])
    if a.json:
        for r in results.values():
            for v in r.values():
                v.pop("out", None) if isinstance(v, dict) else None
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
