"""How far a bf16 lm_head moves logprobs from an fp32 one (the ``fp32_lm_head`` fix).

Two measurements, one device:

1. **Head alone.** A random Qwen2.5-1.5B-shaped head (hidden 1536, vocab 151936,
   bf16 weights as a checkpoint stores them) over bf16 hidden states, its scale set so
   the next-token entropy is about 5 nats (an RL policy mid-training). Tokens are
   sampled from the fp32 distribution; the table gives mean and max |Δlogprob| of the
   sampled tokens between the bf16 projection and the fp32 one (hidden state and
   weight cast up, as the trainer and ``hf_overrides={"head_dtype": "float32"}`` do).
2. **Engine vs trainer.** The reference engine (bf16 body, processed logprobs,
   temperature 0.7, top_p 0.9) generates from locally built tiny and small Qwen2
   models with a bf16 and with an fp32 lm_head; the trainer (transformers, bf16 body,
   fp32 lm_head, same temperature and top_p) scores the same tokens. Mean and max
   |lp_engine - lp_trainer| per configuration.

Runs on CUDA when available (full shapes), else on the CPU with a smaller head
(hidden 256, vocab 32768) and says so. Usage::

    python benchmarks/lm_head_gpu.py [--device cuda|cpu] [--tokens 4096] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.engines.base import GenRequest  # noqa: E402
from replay.engines.reference.engine import ReferenceEngine  # noqa: E402
from replay.fixes import resolve  # noqa: E402
from replay.models import build_model, load_model  # noqa: E402
from replay.trainer.scoring import trainer_logprobs  # noqa: E402

T, TOP_P = 0.7, 0.9


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), -1)
    return -(lp.exp() * lp).sum(-1)


def head_drift(device: str, hidden: int, vocab: int, tokens: int, target: float, seed: int) -> dict:
    """|Δlogprob| of sampled tokens between a bf16 and an fp32 projection of the same bf16 head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=gen, device=device) / math.sqrt(hidden)
    h = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
    probe = h[:256].float() @ w.T
    lo, hi = 0.05, 50.0  # logit scale bracket: entropy falls as the scale grows
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if _entropy(probe * mid).mean().item() > target:
            lo = mid
        else:
            hi = mid
    w16 = (w * math.sqrt(lo * hi)).to(torch.bfloat16)
    w32 = w16.float()
    deltas, ents = [], []
    for start in range(0, tokens, 1024):
        hb = h[start:start + 1024]
        lp32 = torch.log_softmax(hb.float() @ w32.T, -1)
        lp16 = torch.log_softmax((hb @ w16.T).float(), -1)
        q = torch.empty_like(lp32).exponential_(generator=gen)
        tok = torch.argmax(lp32.exp() / q, -1, keepdim=True)  # sample from the fp32 distribution
        deltas.append((lp16.gather(-1, tok) - lp32.gather(-1, tok)).abs()[:, 0])
        ents.append(-(lp32.exp() * lp32).sum(-1))
    d = torch.cat(deltas)
    return {"entropy": torch.cat(ents).mean().item(), "mean": d.mean().item(), "max": d.max().item()}


def engine_vs_trainer(device: str, size: str, workdir: Path, n_req: int, max_tokens: int) -> list[dict]:
    path = build_model(workdir / size, size, seed=0)
    trainer_model = load_model(path, dtype="bfloat16", device=device)
    reqs = [GenRequest(f"r{i}", [1, 26, 14] + [4 + (i * 3 + j) % 10 for j in range(9)], max_tokens=max_tokens,
                       temperature=T, top_p=TOP_P, seed=i) for i in range(n_req)]
    rows = []
    for head in ("bfloat16", "float32"):
        config = resolve("v1", ["processed_logprobs", "v0_runtime_defaults", "paused_weight_update"])
        if head == "float32":
            config = resolve("v0")
        engine = ReferenceEngine(path, config, device=device, ignore_eos=True)
        gen = engine.generate(reqs)
        tr = trainer_logprobs(trainer_model, [r.prompt_ids for r in reqs], [g.output_ids for g in gen],
                              temperature=T, top_p=TOP_P, lm_head_dtype="float32", return_entropy=False)
        d = torch.cat([(torch.tensor(g.logprobs) - torch.from_numpy(t)).abs() for g, t in zip(gen, tr.logprobs)])
        rows.append({"model": size, "engine_head": head, "tokens": d.numel(), "mean": d.mean().item(),
                     "max": d.max().item()})
        engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--tokens", type=int, default=None, help="hidden states through the head (default 4096 cuda, 256 cpu)")
    ap.add_argument("--entropy", type=float, default=5.0, help="target next-token entropy in nats")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if device == "cuda":
        hidden, vocab, tokens = 1536, 151936, args.tokens or 4096
        where = f"cuda ({torch.cuda.get_device_name()})"
        n_req, max_tokens, sizes = 16, 48, ("tiny", "small")
    else:
        hidden, vocab, tokens = 256, 32768, args.tokens or 256
        where = "cpu (no CUDA: small head shapes)"
        n_req, max_tokens, sizes = 8, 24, ("tiny", "small")
    t0 = time.time()
    print(f"device: {where}; torch {torch.__version__}")
    head = head_drift(device, hidden, vocab, tokens, args.entropy, args.seed)
    print(f"\n1. head alone: hidden {hidden}, vocab {vocab}, {tokens} bf16 hidden states, "
          f"entropy {head['entropy']:.2f} nats")
    print(f"   |lp(bf16 head) - lp(fp32 head)| of sampled tokens: mean {head['mean']:.4f}  max {head['max']:.4f}")
    print(f"\n2. reference engine (bf16 body, T={T}, top_p={TOP_P}) vs trainer (bf16 body, fp32 head)")
    print(f"   {'model':<6} {'engine lm_head':<15} {'tokens':>6} {'mean |Δlp|':>11} {'max |Δlp|':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for row in engine_vs_trainer(device, size, Path(tmp), n_req, max_tokens):
                print(f"   {row['model']:<6} {row['engine_head']:<15} {row['tokens']:>6} "
                      f"{row['mean']:>11.5f} {row['max']:>10.5f}")
    print(f"\ntotal {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
