"""The engine protocol and its wire types (DESIGN §4).

An engine loads weights by version, generates under an :class:`~replay.fixes.EngineConfig`
applying weight updates at scheduled decode steps, and scores given tokens
teacher-forced. Wire types are plain dataclasses of lists and numbers so they cross
process boundaries (``replay.engines.worker``) as Arrow rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

ENGINES = ("reference", "vllm")            # engines a replay runs on, here or in a worker
WORKER_ENGINES = ENGINES + ("vllm-v0",)    # V0 runs only in a worker, under an interpreter that has it


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
    # Continuous batching: the engine step of the call at which the request is submitted (0:
    # with the call). It is prefilled at that step and emits its token k at step
    # ``arrival_step + k``, so an update at engine step s reaches it at its token s - arrival.
    arrival_step: int = 0


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
    after_step: int              # applied after this many engine steps of the call (0 = before the first)


@dataclass
class GenGroup:
    """Requests with their own engine history inside a batched call: one recorded step.

    A group starts serving ``serving`` (None: whatever the engine serves now) and applies
    ``updates`` at decode steps counted from the group's own start, as a separate
    ``generate(requests, updates)`` would. Request ids need only be unique within a group.
    """

    requests: list[GenRequest]
    updates: list[WeightUpdate] = field(default_factory=list)
    serving: int | None = None


def generate_groups(engine: "Engine", groups: Sequence[GenGroup]) -> list[list[GenResult]]:
    """Run ``groups`` batched as far as ``engine`` allows (its ``generate_groups``); results
    per group, in order. The groups share no prefix-cache history: with prefix caching on,
    replay them one by one instead."""
    return engine.generate_groups(groups)


def groups_by_calls(engine: "Engine", groups: Sequence[GenGroup]) -> list[list[GenResult]]:
    """``generate_groups`` for an engine without batched groups: one ``generate()`` call per
    distinct schedule; groups that start on the same version with the same updates (and no
    request id in common) share a call."""
    calls: list[tuple[tuple, list[int], set[str]]] = []   # (schedule, group indices, request ids)
    for i, g in enumerate(groups):
        key = (g.serving, tuple((u.version, u.after_step) for u in g.updates))
        ids = {r.request_id for r in g.requests}
        call = next((c for c in calls if c[0] == key and not (c[2] & ids)), None)
        if call is None:
            calls.append((key, [i], ids))
        else:
            call[1].append(i)
            call[2].update(ids)
    out: list[list[GenResult]] = [[] for _ in groups]
    for (serving, _), members, _ in calls:
        if serving is not None and engine.version != serving:
            engine.activate(serving)
        first = groups[members[0]]
        results = engine.generate([r for m in members for r in groups[m].requests], first.updates)
        at = 0
        for m in members:
            n = len(groups[m].requests)
            out[m] = results[at:at + n]
            at += n
    return out


@runtime_checkable
class Engine(Protocol):
    """What the replayer, the demo and the bisection drive: every engine has all of it (the
    replayer probes nothing), and says what it can do in ``supports_forced_output``."""

    # Read-only for callers (an engine may keep a narrower type, or compute one).
    @property
    def name(self) -> str:
        """"reference", "vllm", "vllm-v0", ..."""

    @property
    def config(self) -> Any:
        """The :class:`~replay.fixes.EngineConfig` it runs."""

    @property
    def version(self) -> int | None:
        """The weight version now serving."""

    @property
    def supports_forced_output(self) -> bool:
        """Whether ``GenRequest.forced_output_ids`` goes through generation."""

    @property
    def effective(self) -> Mapping[str, Any] | None:
        """What the engine really runs with (settings it read back), if it knows."""

    @property
    def start_seconds(self) -> float | None:
        """How long the engine took to start."""

    @property
    def versions(self) -> list[int]:
        """Every weight version loaded."""

    def load_weights(self, version: int, state_dict: Mapping[str, Any], *, activate: bool = True) -> None:
        """Make ``version`` known to the engine; with ``activate`` serve it from now on."""

    def activate(self, version: int) -> None:
        """Serve an already loaded ``version`` from now on (the prefix cache is kept)."""

    def reset_prefix_cache(self) -> Any:
        """Drop every prefix-cache entry."""

    def generate(self, requests: Sequence[GenRequest], updates: Sequence[WeightUpdate] = ()) -> list[GenResult]:
        """Generate all requests as one batch, applying ``updates`` at their decode steps
        with the semantics of ``config.weight_update``."""

    def generate_groups(self, groups: Sequence[GenGroup]) -> list[list[GenResult]]:
        """Several groups (recorded steps) in as few calls as the engine can
        (:func:`groups_by_calls` where it has no batched groups)."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-forced logprobs of the given tokens under the current version and config."""

    def hidden_states(self, token_ids: Sequence[int]) -> list[Any]:
        """Residual stream after the embeddings and each layer, under the serving version."""

    def close(self) -> None:
        """Release the engine's resources; safe to call twice."""
