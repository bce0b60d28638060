"""Teacher forcing through vLLM's generation path (``GenRequest.forced_output_ids``).

A vLLM V1 logits processor (``ForceTokens`` from :func:`processor_class`, registered with
``EngineArgs(logits_processors=[ForceTokens])``) looks at each forced request's row of
the batch logits before sampling, keeps a float32 copy of the row, and masks every
token but the recorded one, so the sampler emits it. Everything else is generation:
the batch, the KV cache, prefix-cache hits and weight updates between steps.

The logprobs come from vLLM's own logits either way:

- ``raw_logprobs``: vLLM computes them before any logits processor, so the values it
  returns for the forced token (and its top-k) are already the unforced ones;
- ``processed_logprobs``: vLLM would report the masked distribution, so the engine
  recomputes temperature / top-k / top-p from the kept row
  (:func:`~replay.engines.vllm.logprobs.process_logprobs`).

The kept rows live in :data:`ROWS`, which only works with the engine core in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as :class:`~replay.engines.vllm.engine.VLLMEngine`
sets). A request's position is the length of its output so far, which vLLM updates
before each forward pass without async scheduling (always the case on the CPU build).
"""
from __future__ import annotations

import functools
from typing import Any

# key (the request's tag + id) -> {output position: float32 logits row on the host}
ROWS: dict[str, dict[int, Any]] = {}
FORCED_KEY, ID_KEY = "replay_forced_output_ids", "replay_request_key"


@functools.lru_cache(maxsize=None)
def processor_class() -> type:
    """The :class:`ForceTokens` logits-processor class (built on first use: it subclasses
    vLLM's ``LogitsProcessor``, and importing vLLM is left to engine creation)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class ForceTokens(LogitsProcessor):
        """Emit the recorded token of each forced request; keep its logits row."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            # batch index -> (forced ids, live output list, key)
            self.rows: dict[int, tuple[list[int], list[int], str]] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token greedy sampling picks

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _prompt, output in batch_update.added:
                extra = params.extra_args or {}
                if extra.get(FORCED_KEY) is not None:
                    self.rows[index] = (list(extra[FORCED_KEY]), output, str(extra[ID_KEY]))
                else:
                    self.rows.pop(index, None)
            for a, b, direction in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if direction == MoveDirectionality.SWAP and rb is not None:
                    self.rows[a] = rb

        def apply(self, logits: Any) -> Any:
            for index, (forced, output, key) in self.rows.items():
                pos = len(output)
                if pos >= len(forced):
                    continue
                ROWS.setdefault(key, {})[pos] = logits[index].detach().float().cpu().clone()
                logits[index] = float("-inf")
                logits[index, forced[pos]] = 0.0
            return logits

    ForceTokens.__module__ = __name__
    ForceTokens.__qualname__ = "ForceTokens"
    return ForceTokens
