"""Real vLLM behind the Engine protocol: one engine (engine.py) over a V1 (v1.py) or V0
(v0.py) backend, the engine arguments and worker RPCs (args.py), forced outputs
(forcing.py) and logprob arithmetic (logprobs.py).
``from replay.engines.vllm import VLLMEngine``."""
from __future__ import annotations

from replay.engines.vllm.engine import VLLMEngine

__all__ = ["VLLMEngine"]
