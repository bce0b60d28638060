"""The four fixes, the V0 / V1 presets, and the engine config they resolve to.

A V0 → V1 migration of an RL pipeline moved four things at once. Each is a
switch here, named after the real vLLM knob that sets it (DESIGN §1):

==================== ================================================ =========================================
fix id               what V1 does by default                          the fix (real knob)
==================== ================================================ =========================================
processed_logprobs   logprobs of the raw logits (before temperature,  ``logprobs_mode="processed_logprobs"``
                     top-k, top-p)
v0_runtime_defaults  prefix caching and async scheduling on            ``enable_prefix_caching=False``,
                                                                       ``async_scheduling=False``
paused_weight_update weights load while generation goes on: with      ``pause_generation(mode="keep")`` →
                     async scheduling the batch in flight computes     ``load_weights`` → ``resume_generation()``
                     with the old weights and is stamped new
fp32_lm_head         final projection in bf16                          ``hf_overrides={"head_dtype": "float32"}``
==================== ================================================ =========================================

``resolve("v1", FIX_IDS)`` equals ``resolve("v0")``: the four fixes together give
back the V0 semantics, which is the claim the demo and the bisection test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

from replay.errors import BadInput

# In the order the source applied them; "cumulative" ablations follow this order.
FIX_IDS: tuple[str, ...] = (
    "processed_logprobs",
    "v0_runtime_defaults",
    "paused_weight_update",
    "fp32_lm_head",
)

# short names where space is tight (ablation labels, replay configs in the TUI)
FIX_SHORT: dict[str, str] = {"processed_logprobs": "proc", "v0_runtime_defaults": "v0rt",
                             "paused_weight_update": "paused", "fp32_lm_head": "fp32"}

FIX_DOC: dict[str, str] = {
    "processed_logprobs": "logprobs after temperature / top-k / top-p, as the trainer computes them",
    "v0_runtime_defaults": "prefix caching and async scheduling off",
    "paused_weight_update": "pause generation, load weights, resume: no token stamped new is computed by old weights",
    "fp32_lm_head": "final projection in float32, as the trainer's",
}

WEIGHT_UPDATE_MODES = ("paused", "concurrent")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
HEAD_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class EngineConfig:
    """Engine semantics that change logprobs. Two configs with equal fields are the same engine."""

    # "raw_logprobs": log_softmax of the raw logits (V1 default).
    # "processed_logprobs": log_softmax after temperature, top-k and top-p (V0, and what the trainer means).
    logprobs_mode: str = "raw_logprobs"
    # Reuse KV of a shared prompt prefix across requests (V1 default on). After an
    # unpaused weight update, cached entries hold KV computed by the old weights.
    enable_prefix_caching: bool = True
    # Schedule step t+1 while step t runs (V1 default on): a new weight version
    # reaches in-flight requests one decode step late.
    async_scheduling: bool = True
    # How a weight update meets generation. Either way vLLM loads every weight between
    # two engine steps and in-flight requests keep the KV the old weights wrote.
    # "concurrent": the scheduler keeps going; with async scheduling the batch already
    # in flight computes with the old weights (V1 in-flight update).
    # "paused": generation pauses until nothing is in flight, all weights load,
    # generation resumes (V1 pause_generation(mode="keep"); V0's blocking update has
    # the same semantics). Without async scheduling the two are the same.
    weight_update: str = "concurrent"
    # dtype of the final projection (lm_head) and the logits it produces.
    lm_head_dtype: str = "bfloat16"
    # dtype of the rest of the model (embeddings, attention, MLP).
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name, allowed in (("logprobs_mode", LOGPROBS_MODES), ("weight_update", WEIGHT_UPDATE_MODES),
                              ("lm_head_dtype", HEAD_DTYPES), ("dtype", HEAD_DTYPES)):
            value = getattr(self, name)
            if value not in allowed:
                raise BadInput(f"{name} must be one of {', '.join(allowed)}, not {value!r}", field=name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"unknown engine config field(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**d)

    @property
    def id(self) -> str:
        """Stable short id (8 hex digits) of the semantics; recordings store it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def fixes_applied(self) -> tuple[str, ...]:
        """The fix ids whose effect this config already has (applying them changes nothing)."""
        return tuple(f for f in FIX_IDS if apply_fix(self, f) == self)


def apply_fix(cfg: EngineConfig, fix: str) -> EngineConfig:
    """``cfg`` with one fix applied."""
    if fix == "processed_logprobs":
        return dataclasses.replace(cfg, logprobs_mode="processed_logprobs")
    if fix == "v0_runtime_defaults":
        return dataclasses.replace(cfg, enable_prefix_caching=False, async_scheduling=False)
    if fix == "paused_weight_update":
        return dataclasses.replace(cfg, weight_update="paused")
    if fix == "fp32_lm_head":
        return dataclasses.replace(cfg, lm_head_dtype="float32")
    raise BadInput(f"unknown fix {fix!r}; known fixes: {', '.join(FIX_IDS)}", field="fix")


PRESETS: dict[str, EngineConfig] = {
    # vLLM V1 defaults as an RL pipeline meets them.
    "v1": EngineConfig(),
    # The V0 reference (PipelineRL on vLLM 0.8.5).
    "v0": EngineConfig(logprobs_mode="processed_logprobs", enable_prefix_caching=False,
                       async_scheduling=False, weight_update="paused", lm_head_dtype="float32"),
}


def resolve(preset: str = "v1", fixes: Iterable[str] = (), *, dtype: str | None = None) -> EngineConfig:
    """The config of a preset with a set of fixes applied; ``dtype``: in that body dtype (a replay
    keeps the recorded run's: a preset names semantics, not a model dtype)."""
    if preset not in PRESETS:
        raise BadInput(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}", field="preset")
    cfg = PRESETS[preset]
    for fix in fixes:
        cfg = apply_fix(cfg, fix)
    return cfg if dtype is None else dataclasses.replace(cfg, dtype=dtype)


def parse_run_name(name: str) -> tuple[str, tuple[str, ...]]:
    """``"v1+processed_logprobs+fp32_lm_head"`` → ``("v1", (fixes...))``; ``"v1+fixes"`` means all four."""
    preset, *rest = name.split("+")
    fixes: list[str] = []
    for part in rest:
        if part in ("fixes", "all"):
            fixes.extend(FIX_IDS)
        else:
            apply_fix(PRESETS["v1"], part)  # validates the id
            fixes.append(part)
    resolve(preset)
    return preset, tuple(dict.fromkeys(fixes))
