"""Real vLLM behind the Engine protocol: V1 (engine.py) and V0 (v0.py), the engine arguments
and worker RPCs (args.py), forced outputs (forcing.py) and logprob arithmetic (logprobs.py).
``from replay.engines.vllm import VLLMEngine``."""
from __future__ import annotations

from replay.engines.vllm.engine import VLLMEngine

__all__ = ["VLLMEngine"]
