"""Adapters that record from the tools an RL pipeline already runs.

* :mod:`replay.integrations.vllm`: rollouts from vLLM ``RequestOutput`` objects or
  OpenAI-compatible responses (``record_outputs``, ``record_openai_response``).
* :mod:`replay.integrations.torch`: the trainer's logprob pass, entropy and weight
  versions (``TrainerHook``, ``record_trainer_batch``, ``record_weights``).

Each submodule imports its framework inside the functions that need it.
"""
from __future__ import annotations

from typing import Any


def as_version(value: Any) -> int | None:
    """A weight version as the adapters read one from a framework's value: an int, or
    None where the value is missing or is not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
