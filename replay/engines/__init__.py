"""Engines behind one protocol: a reference PyTorch engine and real vLLM."""
from replay.engines.base import Engine, GenRequest, GenResult, ScoreRequest, ScoreResult, WeightUpdate

__all__ = ["Engine", "GenRequest", "GenResult", "ScoreRequest", "ScoreResult", "WeightUpdate"]
