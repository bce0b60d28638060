"""The reference engine: PyTorch emulation of vLLM's V0 and V1 semantics (engine.py), its
model (model.py) and its prefix cache (cache.py). ``from replay.engines.reference import
ReferenceEngine``."""
from __future__ import annotations

from replay.engines.reference.engine import ReferenceEngine

__all__ = ["ReferenceEngine"]
