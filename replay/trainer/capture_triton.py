"""The Triton path of :func:`replay.trainer.capture.capture_logits` (imported only when used).

One program per row streams the row's logits once, in tiles of ``NSUB × SUB``
values (``SUB = 128``-wide blocks), and keeps an online softmax: the running max
``m``, ``s = Σ e^(x-m)`` and ``w = Σ (x-m)·e^(x-m)`` (``x`` = logit / temperature),
per tile row. At the end ``lse = m + log s``, the sampled logprob is ``x[token] - lse``
and the entropy ``log s - w / s``. It also writes the max of every 128-wide block.

Top-k from block maxima. Order values by (value descending, id ascending) and
blocks by (block max descending, block index ascending). Take any element ``e`` of
the true top-k and its block ``c``; if ``c`` were not among the k best blocks, each
of those k blocks ``j`` would hold an element beating ``e``: its max beats ``e`` by
value, or equals ``max_c ≥ e`` with ``j < c``, so a lower id. That makes k elements
ahead of ``e``, a contradiction. So the top-k lies in the k best blocks, and only
``k × 128`` logits per row are read again (a gather and a ``topk`` over
order keys, in torch, on the device).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from replay.trainer.captured import Capture, ids_of_keys, order_keys

SUB = 128     # width of a block whose maximum is kept for the top-k selection
NSUB = 32     # blocks per tile: a program reads NSUB * SUB logits per iteration
NUM_WARPS = 8


@triton.jit
def _row_stats_kernel(logits_ptr, tok_ptr, lse_ptr, lp_ptr, ent_ptr, bmax_ptr,
                      V, stride_row, n_blocks, inv_t,
                      SUB: tl.constexpr, NSUB: tl.constexpr):
    # One program per row. The running softmax statistics are kept per tile row
    # (vectors of NSUB), so every reduction in the loop runs along a 128-wide block,
    # inside a warp; the NSUB partial statistics are combined once at the end.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    sub = tl.arange(0, NSUB)
    offs2 = sub[:, None] * SUB + tl.arange(0, SUB)[None, :]
    m = tl.full([NSUB], float("-inf"), tl.float32)  # running max of x per tile row
    s = tl.zeros([NSUB], tl.float32)                # Σ e^(x - m)
    w = tl.zeros([NSUB], tl.float32)                # Σ (x - m) e^(x - m), well conditioned
    for start in range(0, V, NSUB * SUB):
        offs = start + offs2
        raw = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        bmax = tl.max(raw, axis=1)
        bidx = start // SUB + sub
        tl.store(bmax_ptr + row * n_blocks + bidx, bmax, mask=bidx < n_blocks)
        x = raw * inv_t
        m_new = tl.maximum(m, bmax * inv_t)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_safe)
        shift = tl.where(s > 0.0, (m - m_safe) * s, 0.0)  # re-centre Σ (x - m) e on the new max
        d = x - m_safe[:, None]
        e = tl.exp(d)
        s = s * scale + tl.sum(e, axis=1)
        w = (w + shift) * scale + tl.sum(tl.where(e > 0.0, d * e, 0.0), axis=1)
        m = m_new
    m_all = tl.max(m, axis=0)
    m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    f = tl.exp(m - m_all_safe)
    s_all = tl.sum(s * f, axis=0)
    w_all = tl.sum(tl.where(f > 0.0, (w + (m - m_all_safe) * s) * f, 0.0), axis=0)
    lse = m_all + tl.log(s_all)
    tok = tl.load(tok_ptr + row)
    ok = (tok >= 0) & (tok < V)  # an id outside the vocabulary gives NaN, never a stray read
    x_tok = tl.load(base + tl.where(ok, tok, 0)).to(tl.float32) * inv_t
    x_tok = tl.where(ok, x_tok, float("nan"))
    tl.store(lse_ptr + row, lse)
    tl.store(lp_ptr + row, x_tok - lse)
    tl.store(ent_ptr + row, tl.log(s_all) - w_all / s_all)


def capture_triton(logits: Any, token_ids: Any, *, k: int, temperature: float) -> Capture:
    """Triton kernel for the row statistics, block-max top-k selection on the device."""
    with torch.no_grad():
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        T, V = logits.shape
        dev = logits.device
        n_blocks = triton.cdiv(V, SUB)
        lse = torch.empty(T, dtype=torch.float32, device=dev)
        lp = torch.empty(T, dtype=torch.float32, device=dev)
        ent = torch.empty(T, dtype=torch.float32, device=dev)
        bmax = torch.empty((T, n_blocks), dtype=torch.float32, device=dev)
        tok = token_ids.to(device=dev, dtype=torch.int64).contiguous()
        inv_t = 1.0 / float(temperature)
        if T:
            _row_stats_kernel[(T,)](logits, tok, lse, lp, ent, bmax, V, logits.stride(0), n_blocks, inv_t,
                                    SUB=SUB, NSUB=NSUB, num_warps=NUM_WARPS)
        if k == 0 or T == 0:
            empty = torch.empty((T, k), dtype=torch.int64, device=dev)
            return Capture(lp, ent, empty, empty.float())
        kb = min(k, n_blocks)
        block_ids = torch.arange(n_blocks, device=dev).expand(T, -1)
        blocks = ids_of_keys(order_keys(bmax, block_ids).topk(kb, dim=1).values)      # [T, kb]
        cols = (blocks[:, :, None] * SUB + torch.arange(SUB, device=dev)).reshape(T, kb * SUB)
        inside = cols < V
        vals = logits.gather(1, cols.clamp_max(V - 1))
        keys = order_keys(vals, cols).masked_fill_(~inside, torch.iinfo(torch.int64).min)
        topk_ids = ids_of_keys(keys.topk(k, dim=1).values)
        topk_lp = logits.gather(1, topk_ids).float() * inv_t - lse[:, None]
        return Capture(lp, ent, topk_ids, topk_lp)
