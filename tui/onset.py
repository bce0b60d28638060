"""Divergence onset of a run against a reference, from per-step metrics.

When ``replay.diagnose.bisect.bisect_steps`` is importable the TUI asks it (see
``tui.data.find_onset``). Otherwise it uses this rule, simple and stated:

    the onset is the first step s of the run where BOTH
      mean |r|(s)  > (1 + margin) * max(reference mean |r| over steps <= s) + abs_margin
      clip_rate(s) > (1 + margin) * max(reference clip_rate over steps <= s) + clip_margin

where r = lp_trainer - lp_rollout. Taking the reference's running maximum makes
the rule robust to the reference's own noise; requiring both metrics keeps one
noisy metric from raising a false alarm. Without a reference there is no onset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class OnsetRule:
    """Thresholds of the fallback onset rule."""

    # relative margin over the reference's running maximum (0.25 = 25 % above it)
    margin: float = 0.25
    # absolute margin added to the mean |r| threshold (nats)
    abs_margin: float = 1e-3
    # absolute margin added to the clip-rate threshold (fraction of tokens)
    clip_margin: float = 5e-3


@dataclass
class Onset:
    """The divergence onset: its step (None when the run never departs) and why."""

    # first divergent step, or None
    step: int | None
    # how it was found: "replay bisect ..." (the bisection) or "rule"
    method: str
    # the numbers behind the decision (metric values and thresholds at the onset)
    evidence: dict = field(default_factory=dict)


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def onset_by_rule(run: Mapping[str, Sequence], ref: Mapping[str, Sequence] | None,
                  rule: OnsetRule = OnsetRule()) -> Onset:
    """Apply the rule above to columns ``step``, ``mean_abs_log_ratio``, ``clip_rate``."""
    if not ref or not len(ref.get("step", ())):
        return Onset(None, "rule", {"reason": "no reference run"})
    ref_rows = sorted(zip(ref["step"], ref["mean_abs_log_ratio"], ref["clip_rate"]))
    for step, mar, clip in sorted(zip(run["step"], run["mean_abs_log_ratio"], run["clip_rate"])):
        seen = [(m, c) for s, m, c in ref_rows if s <= step]
        if not seen or not (_ok(mar) and _ok(clip)):
            continue
        ref_mar = max((m for m, _ in seen if _ok(m)), default=0.0)
        ref_clip = max((c for _, c in seen if _ok(c)), default=0.0)
        mar_thr = (1 + rule.margin) * ref_mar + rule.abs_margin
        clip_thr = (1 + rule.margin) * ref_clip + rule.clip_margin
        if mar > mar_thr and clip > clip_thr:
            return Onset(int(step), "rule", {
                "mean_abs_log_ratio": float(mar), "mean_abs_log_ratio_threshold": mar_thr,
                "clip_rate": float(clip), "clip_rate_threshold": clip_thr,
                "reference_steps": len(seen)})
    return Onset(None, "rule", {"reason": "the run stays within the reference's band"})
