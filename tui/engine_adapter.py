"""The TUI's one door to replay and bisection (``replay.rerun.replayer``, ``replay.diagnose.bisect``).

These modules may be missing (a core without engines) or unable to run here; the
TUI then says so — "replay engine not available: <reason>" — and never shows
made-up numbers. Everything here is plain Python, called from worker threads.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from replay.errors import ReplayError
from replay.fixes import FIX_SHORT

# progress hook: (done, total, text) or one text line, as the replayer reports
ProgressFn = Callable[..., None]


class Unavailable(ReplayError):
    """A replay or bisection feature cannot run in this installation."""

    title = "not available"


def availability(kind: str = "replay") -> str | None:
    """None when ``kind`` ("replay" or "bisect") can run here, else the reason it cannot: the
    engines need torch (the ``engines`` extra)."""
    try:
        import replay.diagnose.bisect  # noqa: F401
        import replay.rerun.replayer  # noqa: F401,F811
    except ImportError as e:
        return f"replay's replay modules cannot be imported ({e})"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install -e '.[engines]')"
    return None


def worker_python(engine: str) -> str | None:
    """The interpreter a replay engine runs under: vLLM in a worker process (this one's
    interpreter), so its logs go to the worker's captured stderr, never over the screen."""
    return sys.executable if engine == "vllm" else None


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
    # the model folder (None: the one the recording names)
    model: Path | None = None


@dataclass
class ReplayOutcome:
    """What a replay returned, and the EngineConfig id its rows carry in the replays table."""

    request: ReplayRequest
    config_id: str
    raw: Any = None


def run_replay(req: ReplayRequest, progress: ProgressFn | None = None) -> ReplayOutcome:
    """Replay ``req.step`` (score mode) under ``req.preset`` + ``req.fixes`` in the recorded model
    dtype (as ``replay.diagnose.bisect`` does); rows land in the recording's replays table."""
    from replay.fixes import resolve
    from replay.rerun.replayer import Replayer

    with Replayer(req.path, engine=req.engine, python=worker_python(req.engine), model_path=req.model) as rp:
        cfg = resolve(req.preset, req.fixes, dtype=rp.recorded_config().dtype)
        raw = rp.replay(req.step, cfg, mode="score", progress=progress)
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
# short names in ablation labels (the full fix ids stay in the "fixes" column)
SHORT = {**FIX_SHORT, "cumulative ": "cum ", "recorded config": "recorded",
         "all lacking fixes": "all lacking"}


def _shorten(label: Any) -> Any:
    if not isinstance(label, str):
        return label
    for fix, short in SHORT.items():
        label = label.replace(fix, short)
    return label


def _table_of(ablation: list[dict] | None) -> tuple[list[str], list[tuple]]:
    """Columns and rows of the core's ablation table (a list of dicts, one per fix set)."""
    rows = list(ablation or [])
    if not rows:
        return [], []
    cols = [c for c in ABLATION_FIRST if c in rows[0]] + [c for c in rows[0] if c not in ABLATION_FIRST]
    return cols, [tuple(_shorten(r.get(c)) if c == "label" else r.get(c) for c in cols) for r in rows]


def run_bisect_fixes(req: ReplayRequest, progress: ProgressFn | None = None) -> FixBisection:
    """Delta-debug, at ``req.step``, the fixes the recording lacks with ``replay.diagnose.bisect.bisect_fixes``
    (it starts from the recorded config, whatever preset the panel shows)."""
    from replay.diagnose.bisect import bisect_fixes

    raw = bisect_fixes(req.path, req.step, engine=req.engine, python=worker_python(req.engine),
                       model_path=req.model, progress=progress)
    minimal = raw.get("fixes")
    cols, rows = _table_of(raw.get("ablation"))
    return FixBisection(list(minimal) if minimal is not None else None, cols, rows, raw,
                        explained=raw.get("explained"), already_applied=list(raw.get("already_applied") or []),
                        reason=raw.get("reason"))


def bisect_steps(run: Path, against: Path) -> dict:
    """``replay.diagnose.bisect.bisect_steps(run, against)``: a dict with ``step`` (the onset or None),
    ``method`` and ``evidence``."""
    from replay.diagnose.bisect import bisect_steps as steps

    return steps(run, against)
