"""Cost of capturing sampled logprob + entropy + top-20 from lm_head logits, as a ratio
to the lm_head matmul that produced them.

Shape: logits [8192, 151936] bf16 from hidden [8192, 1536] @ lm_head [1536, 151936]
(a Qwen2-1.5B-sized head). Compared in one run, on one device:

* ``lm_head``   the matmul itself (the unit of the ratios)
* ``naive``     ``log_softmax(logits.float())`` + gather + entropy + ``topk`` (what trainers do)
* ``compiled``  ``torch.compile`` of the naive path
* ``capture``   ``replay.trainer.capture.capture_logits`` (Triton kernel: one read of the logits)
* ``chunked``   ``capture_logits(backend="torch")`` (the fallback without Triton)
* ``topk``      ``torch.topk`` alone on the bf16 logits; ``read``: one pass over the logits

Results are checked against the naive path: logprobs, entropy and top-k logprobs within
fp32 rounding, top-k ids equal to a stable sort (ties to the lower id) on a row sample.
Goal: capture ≤ 1× the matmul. Needs CUDA; on a CPU-only machine it says so and runs
a small-shape correctness check instead. Usage::

    python benchmarks/capture_gpu.py [--tokens 8192] [--vocab 151936] [--hidden 1536] [--no-compile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.trainer.capture import capture_logits, capture_naive, triton_available  # noqa: E402

K = 20


def naive(logits: torch.Tensor, tok: torch.Tensor, k: int = K):
    lp = torch.log_softmax(logits.float(), dim=-1)
    sampled = lp.gather(1, tok[:, None])[:, 0]
    entropy = -(lp.exp() * lp).sum(-1)
    top = lp.topk(k, dim=-1)
    return sampled, entropy, top.indices, top.values


def time_cuda(fn, *, warmup: int = 2, reps: int = 5, budget_s: float = 8.0) -> float:
    """Median milliseconds of ``fn()`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, t0 = [], time.time()
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if time.time() - t0 > budget_s:
            break
    return statistics.median(times)


def check(cap, ref_logits: torch.Tensor, tok: torch.Tensor, rows: int = 256) -> dict:
    """Max differences to the naive fp32 path; top-k ids against a stable sort on ``rows`` rows."""
    s, e, _, v = naive(ref_logits, tok)
    out = {"logprob_max_abs_diff": float((cap.logprobs - s).abs().max()),
           "entropy_max_abs_diff": float((cap.entropy - e).abs().max()),
           "topk_logprob_max_abs_diff": float((cap.topk_logprobs - v).abs().max())}
    idx = torch.linspace(0, ref_logits.shape[0] - 1, min(rows, ref_logits.shape[0]), device=tok.device).long()
    ref = capture_naive(ref_logits[idx], tok[idx], k=K)
    out["topk_ids_equal_on_sample"] = bool(torch.equal(cap.topk_ids[idx], ref.topk_ids))
    out["ok"] = (out["topk_ids_equal_on_sample"] and out["logprob_max_abs_diff"] < 1e-3
                 and out["entropy_max_abs_diff"] < 1e-3 and out["topk_logprob_max_abs_diff"] < 1e-3)
    return out


def cpu_check() -> int:
    print("capture_gpu: needs a CUDA GPU for the timing; running a small-shape CPU correctness check instead")
    g = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        hidden = torch.randn(256, 256, generator=g).to(dtype)
        w = (torch.randn(256, 8192, generator=g) * 0.1).to(dtype)
        logits = hidden @ w
        tok = torch.randint(0, 8192, (256,), generator=g)
        t0 = time.perf_counter()
        cap = capture_logits(logits, tok, k=K)
        t_cap = time.perf_counter() - t0
        res = check(cap, logits, tok)
        ok &= res["ok"]
        print(f"  {str(dtype):15s} [256, 8192]: capture {t_cap * 1e3:.1f} ms, {res}")
    print("CPU check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="capture cost vs the lm_head matmul")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        return cpu_check()
    t_start = time.time()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=dev, generator=g, dtype=torch.bfloat16)
    w = torch.randn(args.hidden, args.vocab, device=dev, generator=g, dtype=torch.bfloat16) * args.hidden ** -0.5 * 3
    logits = hidden @ w
    tok = torch.multinomial(torch.softmax(logits[:64].float(), -1), 1)[:, 0].repeat(args.tokens // 64 + 1)
    tok = tok[:args.tokens].contiguous()
    print(f"device: {torch.cuda.get_device_name()}  logits [{args.tokens}, {args.vocab}] bf16, top-{K}")

    res: dict[str, float] = {}
    res["lm_head"] = time_cuda(lambda: hidden @ w)
    res["read"] = time_cuda(lambda: logits.amax())
    res["topk"] = time_cuda(lambda: logits.topk(K, dim=-1))
    backend = "triton" if triton_available(dev) else "torch"
    try:
        capture_logits(logits[:8], tok[:8], k=K, backend=backend)
    except Exception as e:  # noqa: BLE001 - report, then measure the fallback
        print(f"Triton path failed ({type(e).__name__}: {e}); measuring the torch path as 'capture'"[:400])
        backend = "torch"
    print(f"capture backend: {backend}")
    res["capture"] = time_cuda(lambda: capture_logits(logits, tok, k=K, backend=backend))
    res["chunked"] = time_cuda(lambda: capture_logits(logits, tok, k=K, backend="torch", chunk=32768), reps=3)
    res["naive"] = time_cuda(lambda: naive(logits, tok), reps=3)
    correctness = {"capture": check(capture_logits(logits, tok, k=K, backend=backend), logits, tok),
                   "chunked": check(capture_logits(logits, tok, k=K, backend="torch"), logits, tok)}
    mm = res["lm_head"]

    def line(name: str) -> None:
        print(f"{name:10s} {res[name]:9.3f} {res[name] / mm:10.2f}", flush=True)

    print(f"{'path':10s} {'ms':>9s} {'x lm_head':>10s}")
    for name in ("lm_head", "read", "topk", "naive", "chunked", "capture"):
        line(name)
    for name, c in correctness.items():
        print(f"check {name}: {c}")
    ok = all(c["ok"] for c in correctness.values())
    # torch.compile last: its compile time is the least predictable part of the run
    if not args.no_compile and time.time() - t_start < 30:
        try:
            compiled = torch.compile(naive, dynamic=False)
            res["compiled"] = time_cuda(lambda: compiled(logits, tok), warmup=1, reps=3)
            line("compiled")
        except Exception as e:  # noqa: BLE001 - the baseline is optional
            print(f"torch.compile baseline skipped: {type(e).__name__}: {e}"[:300])
    goal = res["capture"] <= mm
    print(f"capture / lm_head = {res['capture'] / mm:.2f}x (goal <= 1x: {'met' if goal else 'NOT met'}); "
          f"results {'equal' if ok else 'DIFFER'} to the naive path; {time.time() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
