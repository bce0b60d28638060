"""The backend verdict: which of the fixes the recording lacks bring the engine to the reference.

At a window of steps (DESIGN §8.4):

1. **Fidelity.** The replay under the recorded config must reproduce the recorded
   rollout logprobs (``lp_replay - lp_rollout`` at the floor). If it does not, the
   engine did something the replayer does not model, and no fix can be named.
2. **Search.** Only over the fixes the recorded config lacks (those it has change
   nothing). A set of fixes *passes* when the replay under the recorded config plus
   that set is at the floor against the reference (``lp_replay - lp_ref``), pooled over
   the window and at every step of it: an absolute criterion
   (:func:`replay.diagnose.stats.floor_test`), which can fail. If the recorded config
   with every lacking fix still fails, the verdict is "not explained by the known
   fixes", with the residual and its worst tokens. Otherwise delta debugging finds a
   1-minimal passing set. A lacking fix left out of it is either within the floor (it
   alone moves no token beyond the numerics here) or covered (it changes the replay,
   but the minimal set removes the same error), with any swap that also passes.
3. **Ablation.** Each lacking fix alone, all but each, cumulative in the source's order,
   all, and the minimal set, each with its residual and whether the mismatch went down
   or up against the recorded config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from replay.fixes import FIX_IDS, EngineConfig, apply_fix
from replay.diagnose.components import _sub
from replay.diagnose.reference import ReferenceSet
from replay.diagnose.sequences import RefSeq
from replay.diagnose.stats import Floor, FloorTest, floor_test

FIX_LAYER = {"processed_logprobs": "semantic", "v0_runtime_defaults": "inference path",
             "paused_weight_update": "inference path", "fp32_lm_head": "inference path"}


@dataclass
class Measured:
    """One config replayed over the window, against the reference (or the recording)."""

    fixes: tuple[str, ...]
    config: EngineConfig
    pooled: FloorTest
    steps: dict[int, FloorTest]
    diff: dict[tuple[int, str], np.ndarray] = field(repr=False, default_factory=dict)  # per sequence

    @property
    def at_floor(self) -> bool:
        return bool(self.pooled.at_floor) and all(t.at_floor is not False for t in self.steps.values())

    def row(self, label: str, base: float | None) -> dict:
        m = self.pooled.mean_abs
        direction = None
        if base is not None and not math.isnan(m):
            tol = self.pooled.bound
            direction = "down" if m < base - tol else ("up" if m > base + tol else "same")
        return {"label": label, "fixes": list(self.fixes), "config_id": self.config.id,
                "mean_abs_residual": m, "mean_residual": self.pooled.mean, "exceed": self.pooled.exceed,
                "n_tokens": self.pooled.n, "direction": direction, "at_floor": self.at_floor,
                "steps_off_floor": [s for s, t in self.steps.items() if t.at_floor is False]}


def ddmin(items: list[str], passes: Callable[[list[str]], bool]) -> list[str]:
    """Zeller's delta debugging: a 1-minimal subset of ``items`` for which ``passes`` holds
    (``passes(items)`` must hold). Removing any single element of the result breaks it."""
    current, n = list(items), 2
    while len(current) >= 2:
        chunk = max(1, len(current) // n)
        subsets = [current[i:i + chunk] for i in range(0, len(current), chunk)]
        reduced = False
        for sub in subsets:
            if passes(sub):
                current, n, reduced = sub, 2, True
                break
        if not reduced:
            for sub in subsets:
                comp = [x for x in current if x not in sub]
                if comp and passes(comp):
                    current, n, reduced = comp, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), 2 * n)
    if len(current) == 1 and passes([]):
        return []
    return current


def with_fixes(cfg: EngineConfig, fixes: Sequence[str]) -> EngineConfig:
    for f in fixes:
        cfg = apply_fix(cfg, f)
    return cfg


class BackendSearch:
    """Replays of a window of steps under the recorded config plus subsets of the lacking fixes."""

    def __init__(self, ref: ReferenceSet, recorded: EngineConfig, steps: Sequence[int], *, replayer: Any,
                 floor: Floor, write: bool = True, progress: Callable[[str], None] | None = None):
        self.ref, self.recorded, self.steps = ref, recorded, sorted(steps)
        self.rp, self.floor, self.write, self.progress = replayer, floor, write, progress
        self.applied = [f for f in FIX_IDS if f in recorded.fixes_applied()]
        self.lacking = [f for f in FIX_IDS if f not in self.applied]
        self.by_key: dict[tuple[int, str], RefSeq] = {(s.step, s.request_id): s for s in ref.seqs
                                                      if s.step in set(self.steps)}
        self.replays = 0
        self._cache: dict[tuple[str, ...], tuple[Measured, Measured]] = {}

    def _run(self, fixes: Sequence[str]) -> tuple[Measured, Measured]:
        """(against the reference, against the recording) of the config with ``fixes``."""
        key = tuple(f for f in FIX_IDS if f in fixes)
        if key not in self._cache:
            cfg = with_fixes(self.recorded, key)
            if self.progress:
                self.progress(f"replaying step(s) {_show(self.steps)} with {'+'.join(key) or 'the recorded config'}")
            results = self.rp.replay_range(self.steps, cfg, mode="score", write=self.write)
            self.replays += 1
            vs_ref, vs_rec = {}, {}
            for res in results:
                for row in res.rows:
                    s = self.by_key.get((res.step, row.request_id))
                    if s is None:
                        continue
                    rep = np.asarray(row.replayed, np.float64)
                    vs_ref[(s.step, s.request_id)] = _sub(rep, s.lp_sampler)
                    vs_rec[(s.step, s.request_id)] = _sub(rep, s.lp_rollout)
            self._cache[key] = (self._measure(key, cfg, vs_ref), self._measure(key, cfg, vs_rec))
        return self._cache[key]

    def _measure(self, key: tuple[str, ...], cfg: EngineConfig, diff: dict) -> Measured:
        steps = {}
        for step in self.steps:
            parts = [d for (s, _), d in diff.items() if s == step]
            steps[step] = floor_test(np.concatenate(parts) if parts else np.zeros(0), self.floor)
        pooled = floor_test(np.concatenate(list(diff.values())) if diff else np.zeros(0), self.floor)
        return Measured(key, cfg, pooled, steps, diff)

    def passes(self, fixes: Sequence[str]) -> bool:
        return self._run(fixes)[0].at_floor

    def verdict(self) -> dict:
        recorded_vs_ref, fidelity = self._run(())
        out: dict[str, Any] = {"steps": self.steps, "already_applied": self.applied, "lacking": self.lacking,
                               "within_floor": [], "covered": [], "alternatives": [], "fidelity": _fidelity(fidelity), "fixes": [], "explained": False,
                               "residual": None, "ablation": [], "replays": 0, "worst": []}
        if not fidelity.at_floor:
            out["reason"] = ("the replay under the recorded config does not reproduce the recorded logprobs: "
                             "the engine did something the replayer does not model")
            out["worst"] = worst(fidelity, self.by_key, "lp_replay - lp_rollout")
            out["replays"] = self.replays
            return out
        if recorded_vs_ref.at_floor:   # nothing to explain on these steps: the window missed the error
            out["reason"] = (f"the replayed steps ({_show(self.steps)}) show no backend error above the floor, "
                             "so no fix can be named from them")
            out["explained"] = None
            out["residual"] = _residual(recorded_vs_ref)
            out["replays"] = self.replays
            return out
        full, _ = self._run(self.lacking)
        out["residual"] = _residual(full)
        if not full.at_floor:
            out["reason"] = (f"with every fix the recording lacks ({', '.join(self.lacking) or 'none'}) the replay "
                             "stays above the floor: not explained by the known fixes")
            out["worst"] = worst(full, self.by_key, "lp_replay - lp_ref")
        else:
            minimal = ddmin(list(self.lacking), self.passes) if self.lacking else []
            out["fixes"] = [f for f in FIX_IDS if f in minimal]
            out["explained"] = True
            out["residual"] = _residual(self._run(out["fixes"])[0])
            out.update(self.unneeded(out["fixes"]))
        out["ablation"] = self.ablation(out["fixes"] if out["explained"] else None)
        out["replays"] = self.replays
        return out

    def unneeded(self, minimal: list[str]) -> dict:
        """The lacking fixes outside ``minimal``, each said for what it is: ``within_floor``
        when replaying with it alone moves no token beyond the floor (its effect, if any, is
        not resolved on these steps), ``covered`` when it does change the replay but the
        minimal set removes that too (an unpaused update's late step is also gone once async
        scheduling is off). ``alternatives``: each covered fix that can stand in for one of
        the minimal set, the swapped set still reaching the floor."""
        base = self._run(())[0].diff
        within, covered, alternatives = [], [], []
        for f in (f for f in self.lacking if f not in minimal):
            alone = self._run((f,))[0].diff
            moved = [_sub(alone[k], base[k]) for k in alone if k in base]
            effect = floor_test(np.concatenate(moved) if moved else np.zeros(0), self.floor)
            if effect.at_floor is not False:
                within.append(f)
                continue
            covered.append(f)
            for g in minimal:
                swapped = [x for x in minimal if x != g] + [f]
                if self.passes(swapped):
                    alternatives.append({"fix": f, "replaces": g, "fixes": [x for x in FIX_IDS if x in swapped]})
        return {"within_floor": within, "covered": covered, "alternatives": alternatives}

    def ablation(self, minimal: list[str] | None) -> list[dict]:
        lack = self.lacking
        rows: list[tuple[str, tuple[str, ...]]] = [("recorded config", ())]
        if len(lack) > 1:
            rows += [(f"only {f}", (f,)) for f in lack]
            rows += [(f"all but {f}", tuple(x for x in lack if x != f)) for f in lack]
            rows += [(f"cumulative to {lack[i - 1]}", tuple(lack[:i])) for i in range(2, len(lack))]
        if lack:
            rows.append(("all lacking fixes", tuple(lack)))
        if minimal is not None and tuple(minimal) not in {r[1] for r in rows}:
            rows.append(("minimal", tuple(minimal)))
        base = self._run(())[0].pooled.mean_abs
        return [self._run(fixes)[0].row(label, base) for label, fixes in rows]


def _fidelity(m: Measured) -> dict:
    return {"at_floor": m.at_floor, "mean_abs_diff": m.pooled.mean_abs, "exceed": m.pooled.exceed,
            "n_tokens": m.pooled.n, "exact": bool(all(np.all(d == 0) for d in m.diff.values())),
            "test": m.pooled.as_dict()}


def _residual(m: Measured) -> dict:
    return {"fixes": list(m.fixes), "config_id": m.config.id, **m.pooled.as_dict(), "at_floor": m.at_floor}


def worst(m: Measured, by_key: dict, what: str, n: int = 10) -> list[dict]:
    """The ``n`` tokens with the largest |difference| of a measured config."""
    items = []
    for key, d in m.diff.items():
        s = by_key[key]
        a = np.abs(d)
        for pos in np.argsort(-np.where(np.isnan(a), -1, a))[:n]:
            if not np.isnan(a[pos]):
                items.append((float(a[pos]), s, int(pos), float(d[pos])))
    items.sort(key=lambda t: -t[0])
    return [{"step": s.step, "request_id": s.request_id, "pos": pos, "what": what, "value": v,
             "version": int(s.versions[pos]), "num_cached_tokens": s.num_cached_tokens}
            for _, s, pos, v in items[:n]]


def _show(steps: Sequence[int]) -> str:
    from replay.rerun.plans import step_ranges

    return step_ranges(sorted(steps))


