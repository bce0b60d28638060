"""What a capture of logits holds (:class:`Capture`), and the top-k ordering every capture
path shares (value descending, ties to the lower id, as int64 keys under a plain max).

Shared by the torch path (:mod:`replay.trainer.capture`) and the Triton path
(:mod:`replay.trainer.capture_triton`), so both order ties the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Capture:
    """What a recording keeps of one logits tensor ``[T, V]``."""

    logprobs: Any       # [T] fp32: logprob of each sampled token (after temperature)
    entropy: Any        # [T] fp32: entropy (nats) of each temperature-scaled distribution
    topk_ids: Any       # [T, k] int64: the k most likely token ids, best first, ties to the lower id
    topk_logprobs: Any  # [T, k] fp32: their logprobs

    def to(self, device: Any) -> "Capture":
        return Capture(*(t.to(device) for t in (self.logprobs, self.entropy, self.topk_ids,
                                                 self.topk_logprobs)))

    def __getitem__(self, index: Any) -> "Capture":
        """Rows ``index`` of every field (a slice, a mask or an index tensor)."""
        return Capture(self.logprobs[index], self.entropy[index], self.topk_ids[index],
                       self.topk_logprobs[index])


# ------------------------------------------------------------------------- ordering keys

def order_keys(values: Any, ids: Any) -> Any:
    """int64 keys that sort like (value descending, id ascending) under a plain max.

    The fp32 bits of ``values`` are made monotone as int32 (negative floats have their
    magnitude bits flipped), shifted to the top half, and ``2^32 - 1 - id`` fills the
    low half, so ``topk`` over keys is exact and breaks ties toward lower ids.
    """
    import torch

    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (mono << 32) | (0xFFFFFFFF - ids.to(torch.int64))


def ids_of_keys(keys: Any) -> Any:
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)
