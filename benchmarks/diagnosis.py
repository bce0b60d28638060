"""``replay diagnose`` on the scenario suite (a confusion table) and the cost of its parts.

    python benchmarks/diagnosis.py [--seeds N] [--bf16] [--quick]

1. **Scenarios.** The suite of ``tests/scenarios/scenario_loop.py`` (a training loop that is
   not the demo, a tiny Llama, policy lag present), recorded under ``--seeds`` seeds: every
   fix's fault alone, in pairs and all four; every trainer-side hypothesis; clean runs; causes
   nothing models. Each recording is diagnosed in this process; the table gives the expected
   and the obtained label (``backend:<fixes>``, ``trainer:<causes>``, ``clean``,
   ``unexplained``) and the time. ``--bf16`` adds the same suite with a bfloat16 engine body,
   whose floor is four orders of magnitude higher (see docs/diagnosis.md).
2. **Reference scoring** against a plain transformers forward + log_softmax over the same
   tokens: the baseline runs one padded forward per (version, sequences that need it), as the
   plain way to get the same per-version logprobs; both read the rollouts and the weights from
   the recording inside their timing, in this process. Twice: on the demo's v1 (32 steps of 64
   short completions with a 0.3 M-parameter model: per-call overhead dominates), and on a
   recording with an RL run's proportions (128-token completions, prompts shared by groups of
   8, a 9.5 M-parameter model: compute dominates).
3. **diagnose on the demo's v1** (32 steps), end to end, with the default step sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "scenarios"))


def label_expected(sc) -> str:
    """The label the scenario must get; ``|`` between fix sets the diagnosis may name alike."""
    if sc.verdict == "backend":
        return "|".join("backend:" + "+".join(fixes) for fixes in sc.fix_sets)
    if sc.verdict == "trainer":
        return "trainer:" + "+".join(sc.causes)
    return sc.verdict


def label_got(res: dict) -> str:
    parts = []
    if res["verdict"] in ("clean", "unexplained"):
        return res["verdict"]
    if "backend" in res["verdict"]:
        parts.append("backend:" + "+".join(res["backend"]["fixes"]))
    if "trainer" in res["verdict"]:
        parts.append("trainer:" + "+".join(res["trainer"]["causes"]))
    return ",".join(parts)


def scenarios(out: Path, seeds: int, bf16: bool, steps: int) -> None:
    import scenario_loop as L
    from replay.diagnose import diagnose

    model = L.build_llama(out / "llama")
    suites = {"float32": [s for s in L.scenarios()]}
    if bf16:
        suites["bfloat16"] = [dataclasses.replace(s, dtype="bfloat16", name=s.name + "@bf16")
                              for s in L.scenarios() if s.dtype != "bfloat16"]
    kinds = ("clean", "backend", "trainer", "unexplained")
    cols = kinds + ("backend+trainer",)
    for body, suite in suites.items():
        print("\nthe suite, float32 engine body (clean-bf16: a bfloat16 body)" if body == "float32"
              else f"\n{body} engine body: the same causes, with a floor ~1e4 times higher")
        print(f"{'scenario':<70} {'seed':>4}  {'expected':<40} {'got':<40} {'ok':<3} {'record s':>8} {'diagnose s':>10}")
        ok = total = 0
        confusion = {(a, b): 0 for a in kinds for b in cols}
        times = []
        for seed in range(seeds):
            for sc in suite:
                t0 = time.perf_counter()
                path = L.record(sc, model, out / f"seed{seed}", seed=seed, steps=steps)
                t1 = time.perf_counter()
                res = diagnose(path, write=False)
                t2 = time.perf_counter()
                want, got = label_expected(sc), label_got(res)
                right = got in want.split("|")
                ok += right
                total += 1
                confusion[(sc.verdict, res["verdict"])] += 1
                times.append(t2 - t1)
                print(f"{sc.name:<70} {seed:>4}  {want:<40} {got:<40} {'yes' if right else 'NO':<3} "
                      f"{t1 - t0:>8.2f} {t2 - t1:>10.2f}", flush=True)
        print(f"\n{body}: exact labels {ok}/{total} ({100 * ok / total:.0f}%); diagnose time per recording: "
              f"median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s")
        print("verdicts (rows: expected, columns: obtained)")
        print(f"{'':<14}" + "".join(f"{c:>17}" for c in cols))
        for a in kinds:
            print(f"{a:<14}" + "".join(f"{confusion[(a, b)]:>17}" for b in cols))


def reference_vs_baseline(path: Path) -> None:
    """Reference scoring of every rollout of the recording against the plain per-version forward;
    both read the rollouts and the weights from the recording inside their timing."""
    import torch

    from replay import open_recording
    from replay.demo.rl import padded_batch
    from replay.diagnose.reference import load_sequences, reference_scores
    from replay.models import load_model, recording_model

    with open_recording(path) as rec:
        folder = recording_model(path, rec.run_config())
    load_model(folder)  # warm imports for both
    # the plain way: one padded forward + log_softmax per version, over the sequences that need it
    t0 = time.perf_counter()
    n_base = 0
    with open_recording(path) as rec, torch.no_grad():
        seqs = load_sequences(rec, None)
        need: dict[int, list] = {}
        for s in seqs:
            for v in {*map(int, s.versions), *([s.trainer_version] if s.trainer_version is not None else [])}:
                need.setdefault(v, []).append(s)
        model = load_model(folder, dtype="float32")
        for v, members in sorted(need.items()):
            model.load_state_dict({k: x.float() for k, x in rec.load_weights(v).items()}, strict=False)
            ids, attn, mask = padded_batch([s.prompt_ids for s in members], [s.output_ids for s in members])
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / members[0].dist.temperature
            torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])
            n_base += sum(s.n for s in members)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_scores(path, write=False)
    t_ref = time.perf_counter() - t0
    n_ref = sum(s.n for s in ref.seqs)
    pairs = sum(len(m) for m in need.values())
    t_score = ref.seconds.get("read", 0.0) + ref.seconds.get("score", 0.0)
    print(f"\nreference scoring of {len(ref.seqs)} sequences, {n_ref} tokens, {pairs} (sequence, version) pairs; "
          f"floor measured on {sum(s.floor is not None for s in ref.seqs)} sequences")
    print(f"{'path':<72} {'scored tok':>10} {'seconds':>8} {'tok/s':>9}")
    print(f"{'reference: read + both versions, sampler and untruncated distributions':<72} {2 * n_ref:>10} "
          f"{t_score:>8.2f} {2 * n_ref / t_score:>9.0f}")
    print(f"{'reference, all of it (+ the floor in the exact dtype, + setup)':<72} {2 * n_ref:>10} "
          f"{t_ref:>8.2f} {2 * n_ref / t_ref:>9.0f}")
    print(f"{'HF forward + log_softmax per version, read from the recording (baseline)':<72} {n_base:>10} "
          f"{t_base:>8.2f} {n_base / t_base:>9.0f}")
    print(f"ratio reference / baseline: {(2 * n_ref / t_score) / (n_base / t_base):.2f}x; with the floor: "
          f"{(2 * n_ref / t_ref) / (n_base / t_base):.2f}x  (a scored token: one token at one version)")


def long_sequences(out: Path, *, steps: int = 3, groups: int = 16, group: int = 8, prompt: int = 96,
                   output: int = 128, size: str = "small") -> Path:
    """A recording with an RL run's proportions (long completions, GRPO groups sharing a prompt, an
    update landing mid-sequence, a one-step-off trainer), written with the Recorder: what
    reference scoring costs when compute, not per-call overhead, dominates."""
    import numpy as np
    import torch

    from replay import Recorder
    from replay.models import build_model, load_state_dict

    model = build_model(out / f"model-{size}", size=size, seed=0)
    base = {k: v.float() for k, v in load_state_dict(model).items()}
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    path = out / "long"
    with Recorder(path, run_config={"model": str(model), "engine": {"config": {"dtype": "float32"}}}) as rec:
        for v in range(steps + 1):
            sd = {k: x + 0.01 * v * torch.randn(x.shape, generator=gen) for k, x in base.items()}
            rec.weights(version=v, step=max(v - 1, 0), state_dict=sd, delta=v > 0)
        system = rng.integers(4, 60, prompt - 32).tolist()
        for step in range(steps):
            for g in range(groups):
                p = system + rng.integers(4, 60, 32).tolist()
                for i in range(group):
                    o = rng.integers(4, 60, output).tolist()
                    cut = int(rng.integers(1, output))
                    rid = f"{step}-{g}-{i}"
                    rec.rollout(step=step, request_id=rid, prompt_ids=p, output_ids=o,
                                logprobs=-rng.uniform(0.01, 3, output), token_versions=[step] * cut + [step + 1] * (output - cut),
                                temperature=0.7, top_p=0.9)
                    rec.trainer(step=step, request_id=rid, weight_version=step + 1,
                                logprobs=-rng.uniform(0.01, 3, output))
    return path


def demo_v1(path: Path) -> None:
    from replay.diagnose import diagnose

    t0 = time.perf_counter()
    res = diagnose(path)
    t = time.perf_counter() - t0
    print(f"\ndiagnose on {path} ({len(res['steps'])} steps, {res['components']['n_tokens']} tokens): {t:.1f} s "
          f"— verdict {res['verdict']}: {res['summary']}")
    print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["timings"].items()))
    t0 = time.perf_counter()
    again = diagnose(path, write=False)
    print(f"  again, with the reference stored: {time.perf_counter() - t0:.1f} s "
          f"(scored now: {again['scoring']['sequences_scored']} sequences)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the scenario suite (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="steps per scenario recording")
    ap.add_argument("--bf16", action="store_true", help="also the suite with a bfloat16 engine body")
    ap.add_argument("--quick", action="store_true", help="one seed, no demo: well under a minute")
    ap.add_argument("--demo", type=Path, default=None, help="a demo v1 recording (default: record 32 steps)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="replay-diag-"))
    try:
        scenarios(out, 1 if args.quick else args.seeds, args.bf16, args.steps)
        if args.quick:
            return
        path = args.demo
        if path is None:
            from replay.demo.runner import main as demo

            print(f"\nrecording the demo's v1 (32 steps) into {out / 'demo'} ...")
            demo(out=str(out / "demo"), steps=32, runs=["v1"], plot=False, jobs=1)
            path = out / "demo" / "v1"
        else:
            shutil.copytree(path, out / "v1")
            path = out / "v1"
        reference_vs_baseline(path)
        demo_v1(path)
        print("\nlong sequences (3 steps x 128 rollouts, 96-token prompts shared by groups of 8, 128 tokens, "
              "the 9.5 M-parameter model):")
        reference_vs_baseline(long_sequences(out))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
