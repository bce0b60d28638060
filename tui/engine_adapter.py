"""The TUI's one door to replay and bisection (``replay.replayer``, ``replay.bisect``).

These modules may be missing (a core without engines) or unable to run here; the
TUI then says so — "replay engine not available: <reason>" — and never shows
made-up numbers. Everything here is plain Python, called from worker threads.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from replay.errors import ReplayError

# progress hook: (done, total, text) or one text line, as the replayer reports
ProgressFn = Callable[..., None]


class Unavailable(ReplayError):
    """A replay or bisection feature cannot run in this installation."""

    title = "not available"


def _module(name: str, attr: str):
    """The function ``attr`` of module ``name``, or raise :class:`Unavailable` saying why not."""
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        raise Unavailable(f"{name} cannot be imported ({e})") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise Unavailable(f"{name} has no {attr}()")
    return fn


def availability(kind: str = "replay") -> str | None:
    """None when ``kind`` ("replay" or "bisect") can run, else the reason it cannot."""
    try:
        if kind == "replay":
            _replay_entry()
        else:
            _module("replay.bisect", "bisect_fixes")
    except Unavailable as e:
        return e.msg
    return None


def _call(fn, *args, **kwargs):
    """Call ``fn(*args, ...)`` with the keyword arguments its signature accepts (a progress hook is optional)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


@dataclass
class ReplayRequest:
    """One replay of a recorded step, as the replay panel sets it up."""

    # the recording to replay (its replays table receives the results)
    path: Path
    # the step to replay
    step: int
    # "v0" or "v1": the semantics the fixes apply to
    preset: str = "v1"
    # fix ids of replay.fixes.FIX_IDS to apply on top of the preset
    fixes: tuple[str, ...] = ()
    # "reference" (PyTorch) or "vllm"
    engine: str = "reference"


@dataclass
class ReplayOutcome:
    """What a replay returned, and the EngineConfig id its rows carry in the replays table."""

    request: ReplayRequest
    config_id: str
    raw: Any = None


def _replay_entry():
    """``replay_step`` of replay.replayer, else its ``Replayer`` class; Unavailable when neither."""
    try:
        return _module("replay.replayer", "replay_step")
    except Unavailable as first:
        try:
            return _module("replay.replayer", "Replayer")
        except Unavailable:
            raise first from None


def run_replay(req: ReplayRequest, progress: ProgressFn | None = None) -> ReplayOutcome:
    """Replay ``req.step`` (score mode) under ``req.preset`` + ``req.fixes``; rows land in the replays table.

    Through ``replay.replayer.replay_step`` when it exists, else ``Replayer.replay``
    with the preset's config in the recorded model dtype (as ``replay.bisect`` does).
    """
    entry = _replay_entry()
    from replay.fixes import resolve
    cfg = resolve(req.preset, req.fixes)
    if not inspect.isclass(entry):
        raw = _call(entry, req.path, req.step, preset=req.preset, fixes=tuple(req.fixes),
                    engine=req.engine, progress=progress)
        config = getattr(raw, "config", None)
        return ReplayOutcome(req, getattr(config, "id", cfg.id), raw)
    with entry(req.path, engine=req.engine) as rp:
        recorded = rp.recorded_config()
        cfg = dataclasses.replace(cfg, dtype=recorded.dtype)
        raw = _call(rp.replay, req.step, cfg, mode="score", progress=progress)
    return ReplayOutcome(req, raw.config.id, raw)


@dataclass
class FixBisection:
    """The answer of ``bisect_fixes``: the minimal fix set and its ablation table."""

    # fix ids that bring the engine to the reference (None when the bisection did not say)
    minimal: list[str] | None
    # column names and rows of the ablation table
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    raw: Any = None
    explained: bool | None = None                              # False: not explained by the known fixes
    already_applied: list[str] = field(default_factory=list)   # fixes the recorded config has
    reason: str | None = None                                  # why not explained


# the ablation columns shown first, in this order; the rest follow
ABLATION_FIRST = ("label", "at_floor", "mean_abs_residual", "direction", "exceed", "n_tokens")
# short names of the fixes in ablation labels (the full ids stay in the "fixes" column)
SHORT = {"processed_logprobs": "proc", "v0_runtime_defaults": "v0rt",
         "paused_weight_update": "paused", "fp32_lm_head": "fp32", "cumulative ": "cum ",
         "recorded config": "recorded", "all lacking fixes": "all lacking"}


def _shorten(label: Any) -> Any:
    if not isinstance(label, str):
        return label
    for fix, short in SHORT.items():
        label = label.replace(fix, short)
    return label


def _table_of(ablation: Any) -> tuple[list[str], list[tuple]]:
    if ablation is None:
        return [], []
    if hasattr(ablation, "to_pylist"):
        ablation = ablation.to_pylist()
    if hasattr(ablation, "to_dict") and hasattr(ablation, "columns"):
        ablation = ablation.to_dict("records")
    rows = list(ablation)
    if not rows:
        return [], []
    if isinstance(rows[0], dict):
        cols = [c for c in ABLATION_FIRST if c in rows[0]] + [c for c in rows[0] if c not in ABLATION_FIRST]
        return cols, [tuple(_shorten(r.get(c)) if c == "label" else r.get(c) for c in cols) for r in rows]
    return [f"c{i}" for i in range(len(rows[0]))], [tuple(r) for r in rows]


def run_bisect_fixes(req: ReplayRequest, progress: ProgressFn | None = None) -> FixBisection:
    """Delta-debug, at ``req.step``, the fixes the recording lacks with ``replay.bisect.bisect_fixes``
    (it starts from the recorded config, whatever preset the panel shows)."""
    fn = _module("replay.bisect", "bisect_fixes")
    raw = _call(fn, req.path, req.step, engine=req.engine, progress=progress)
    get = raw.get if isinstance(raw, dict) else lambda k, d=None: getattr(raw, k, d)
    minimal = get("fixes")
    cols, rows = _table_of(get("ablation"))
    return FixBisection(list(minimal) if minimal is not None else None, cols, rows, raw,
                        explained=get("explained"), already_applied=list(get("already_applied") or []),
                        reason=get("reason"))


def bisect_steps(run: Path, against: Path) -> dict | None:
    """``replay.bisect.bisect_steps(run, against)``: a dict with ``step`` (the onset or None),
    ``method`` and ``evidence``; None when replay.bisect is absent."""
    try:
        fn = _module("replay.bisect", "bisect_steps")
    except Unavailable:
        return None
    out = fn(run, against)
    return out if isinstance(out, dict) else {"step": getattr(out, "step", None),
                                              "evidence": getattr(out, "evidence", None)}
