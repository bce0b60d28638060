"""The engine protocol and its wire types (DESIGN §4).

An engine loads weights by version, generates under an :class:`~replay.fixes.EngineConfig`
applying weight updates at scheduled decode steps, and scores given tokens
teacher-forced. Wire types are plain dataclasses of lists and numbers so they cross
process boundaries (``replay.engines.worker``) as Arrow rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@dataclass
class GenRequest:
    """One sequence to generate."""

    request_id: str              # unique within a generate() call
    prompt_ids: list[int]        # prompt token ids
    max_tokens: int = 16         # generated tokens at most
    temperature: float = 1.0     # sampling temperature (> 0)
    top_p: float = 1.0           # nucleus sampling mass, 1.0 = off
    top_k: int = -1              # top-k sampling, -1 = off
    seed: int | None = None      # per-request sampling seed
    num_topk: int = 0            # how many top logprobs to return per generated token
    stop_token_ids: list[int] = field(default_factory=list)  # generation ends after any of these
    # Teacher forcing through the generation path: emit these tokens instead of sampling
    # (logprobs, versions, updates, prefix cache all as in generation). Engines that can
    # do it say so with ``supports_forced_output = True``; the replayer relies on it.
    forced_output_ids: list[int] | None = None


@dataclass
class GenResult:
    """What the engine generated for one request."""

    request_id: str
    output_ids: list[int]        # generated token ids
    logprobs: list[float]        # logprob of each generated token, under the config's logprobs_mode
    token_versions: list[int]    # weight version the engine reports for each generated token
    finish_reason: str           # "stop" or "length"
    num_cached_tokens: int = 0   # prompt tokens served from the prefix cache
    topk_ids: list[list[int]] | None = None        # [n_tokens][num_topk]
    topk_logprobs: list[list[float]] | None = None  # [n_tokens][num_topk]


@dataclass
class ScoreRequest:
    """Tokens to score teacher-forced: the logprob of each output token given all before it."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    temperature: float = 1.0     # used by processed_logprobs mode
    top_p: float = 1.0
    top_k: int = -1
    num_topk: int = 0


@dataclass
class ScoreResult:
    request_id: str
    logprobs: list[float]        # one per output token
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@dataclass
class WeightUpdate:
    """A weight update scheduled inside a generate() call."""

    version: int                 # the version to switch to (must have been loaded with load_weights)
    after_step: int              # applied after this many decode steps of the call (0 = before the first)


@runtime_checkable
class Engine(Protocol):
    """What the replayer, the demo and the bisection drive."""

    config: Any                  # replay.fixes.EngineConfig
    version: int | None          # the weight version now serving

    def load_weights(self, version: int, state_dict: Mapping[str, Any], *, activate: bool = True) -> None:
        """Make ``version`` known to the engine; with ``activate`` serve it from now on."""

    def generate(self, requests: Sequence[GenRequest], updates: Sequence[WeightUpdate] = ()) -> list[GenResult]:
        """Generate all requests as one batch, applying ``updates`` at their decode steps
        with the semantics of ``config.weight_update``."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-forced logprobs of the given tokens under the current version and config."""

    def close(self) -> None:
        """Release the engine's resources; safe to call twice."""
