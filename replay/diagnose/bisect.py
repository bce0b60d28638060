"""Where divergence begins: by steps, fixes, tokens and layers.

Fixes, tokens and (without a reference run) steps are views of the diagnosis
(:mod:`replay.diagnose`): every token's mismatch is split against an exact reference
at its own weight version, and each component is tested against the measured floor.

**Steps, from the components.** Without a reference run: the first step where the
backend or the trainer error leaves the floor (a CUSUM over per-step z against the
floor, :func:`replay.diagnose.stats.cusum_onset`).

**Steps, against a reference run.** For each step both runs recorded, compare the
per-token mismatch ``|r| = |lp_trainer - lp_rollout|`` of the run with the
reference's at the same step:

- ``z_abs``: Welch's z of mean |r| (run minus reference), using both runs' per-token
  variances, so the reference's own spread sets the scale;
- ``z_clip``: two-proportion z of the clip rate (tokens with r outside
  ``[log(1-eps), log(1+eps)]``).

``z = max(z_abs, z_clip)`` feeds a one-sided CUSUM, ``S_t = max(0, S_{t-1} + z_t - k)``:
an alarm when ``S_t > h``; the onset is the step where the excursion that raised
the alarm began. ``k`` absorbs noise that is one-sided but small (a run drifting by
less than ``k`` standard errors per step never alarms); ``h`` sets how much evidence
an alarm needs. Defaults ``k = 1``, ``h = 8``: a single step at z ≥ 9, or two at
z ≥ 5, or a slow drift over many steps. Identical runs give z = 0 everywhere.

**Steps, against a threshold.** The first step from which mean |r| stays above the
threshold for ``persist`` steps.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from replay.diagnose.backend import ddmin  # noqa: F401 - part of this module's API
from replay.diagnose.stats import cusum_onset
from replay.errors import BadInput


def _step_stats(rec, schema: str, eps: float) -> dict[int, dict]:
    from replay.read.recording import quote_ident

    lo, hi = math.log(1 - eps), math.log(1 + eps)
    rows = rec.query(f"""
        SELECT step, count(*) AS n, avg(abs(log_ratio)) AS m, var_samp(abs(log_ratio)) AS v,
               avg(CASE WHEN log_ratio < {lo} OR log_ratio > {hi} THEN 1.0 ELSE 0.0 END) AS clip
        FROM {quote_ident(schema)}.tokens WHERE lp_trainer IS NOT NULL GROUP BY step ORDER BY step""").fetchall()
    return {int(s): {"n": int(n), "mean_abs_r": float(m), "var": float(v or 0.0), "clip_rate": float(c)}
            for s, n, m, v, c in rows}


def _z_mean(a: dict, b: dict) -> float:
    se = math.sqrt(a["var"] / max(a["n"], 1) + b["var"] / max(b["n"], 1))
    d = a["mean_abs_r"] - b["mean_abs_r"]
    if se < 1e-12:
        return 0.0 if abs(d) < 1e-9 else math.copysign(1e6, d)
    return d / se


def _z_prop(a: dict, b: dict) -> float:
    n1, n2 = a["n"], b["n"]
    p = (a["clip_rate"] * n1 + b["clip_rate"] * n2) / max(n1 + n2, 1)
    se = math.sqrt(max(p * (1 - p), 0.0) * (1 / max(n1, 1) + 1 / max(n2, 1)))
    d = a["clip_rate"] - b["clip_rate"]
    if se < 1e-12:
        return 0.0 if abs(d) < 1e-12 else math.copysign(1e6, d)
    return d / se


def bisect_steps(run: str | Path, against: str | Path | None = None, *, threshold: float | None = None,
                 eps: float = 0.2, k: float = 1.0, h: float = 8.0, persist: int = 2) -> dict:
    """The first step where ``run`` departs from ``against`` (or exceeds ``threshold``).

    Returns ``{"step": onset or None, "method": ..., "evidence": [per-step rows], ...}``.
    """
    from replay.read.recording import open_recording

    if against is None and threshold is None:
        return bisect_steps_components(run)
    paths = [run] if against is None else [run, against]
    with open_recording(paths, names=["run"] if against is None else ["run", "ref"]) as rec:
        mine = _step_stats(rec, "run", eps)
        ref = _step_stats(rec, "ref", eps) if against is not None else {}
    if not mine:
        return {"step": None, "method": "none", "evidence": [], "reason": "the run has no scored tokens"}
    if against is None:
        steps = sorted(mine)
        above = [mine[s]["mean_abs_r"] > threshold for s in steps]
        onset = next((steps[i] for i in range(len(steps)) if all(above[i: i + persist])), None)
        evidence = [{"step": s, **mine[s], "above": a} for s, a in zip(steps, above)]
        return {"step": onset, "method": "threshold", "threshold": threshold, "persist": persist,
                "evidence": evidence}
    steps = sorted(set(mine) & set(ref))
    if not steps:
        return {"step": None, "method": "cusum", "evidence": [],
                "reason": "the run and the reference share no scored step"}
    z_abs = [_z_mean(mine[s], ref[s]) for s in steps]
    z_clip = [_z_prop(mine[s], ref[s]) for s in steps]
    z = [max(a, b) for a, b in zip(z_abs, z_clip)]
    onset, path = cusum_onset(steps, z, k=k, h=h)
    evidence = [{"step": s, "run_mean_abs_r": mine[s]["mean_abs_r"], "ref_mean_abs_r": ref[s]["mean_abs_r"],
                 "run_clip_rate": mine[s]["clip_rate"], "ref_clip_rate": ref[s]["clip_rate"],
                 "z_abs": round(za, 3), "z_clip": round(zc, 3), "cusum": round(c, 3),
                 "n_tokens": mine[s]["n"]}
                for s, za, zc, c in zip(steps, z_abs, z_clip, path)]
    return {"step": onset, "method": "cusum", "k": k, "h": h, "eps": eps, "evidence": evidence}


def bisect_steps_components(run: str | Path, **kw) -> dict:
    """The first step where the backend or the trainer error leaves the floor (no reference run
    needed): ``{"step", "method": "components", "component", "evidence": [per-step rows]}``."""
    from replay.diagnose import components as C
    from replay.diagnose.reference import reference_scores
    from replay.diagnose.trainer import onset

    ref = reference_scores(run, **kw)
    tok = C.tokens(ref.seqs, ref.trainer_semantics)
    fb, ft = C.floors(ref.seqs)
    rows = C.per_step(tok, fb, ft)
    steps = [r.step for r in rows]
    found = {c: onset(steps, [getattr(r, c) for r in rows]) for c in ("backend", "trainer")}
    hits = [(s, c) for c, s in found.items() if s is not None]
    step, comp = min(hits) if hits else (None, None)
    return {"step": step, "method": "components", "component": comp, "onsets": found,
            "floor": fb.as_dict(), "evidence": [r.as_dict() for r in rows]}


# ------------------------------------------------------------------------------ fixes

def bisect_fixes(path: str | Path, step: int, *, engine: str = "reference", device: str = "cpu",
                 python: str | None = None, model_path: str | Path | None = None, progress=None,
                 write: bool = True, weights_from: str | Path | None = None) -> dict:
    """At ``step``, the minimal set of the fixes the recorded config lacks whose replay brings the
    engine to the exact reference (at the floor), with the ablation table; the backend search of
    :mod:`replay.diagnose.backend` on one step. ``fixes`` is empty and ``explained`` false when
    even every lacking fix leaves a residual above the floor."""
    from replay.diagnose.backend import BackendSearch
    from replay.diagnose.components import floors
    from replay.diagnose.reference import reference_scores
    from replay.rerun.replayer import Replayer

    ref = reference_scores(path, [step], write=write, device=device, model_path=model_path,
                           weights_from=weights_from, progress=progress)
    floor, _ = floors(ref.seqs)
    with Replayer(path, engine=engine, device=device, python=python, model_path=model_path,
                  weights_from=weights_from) as rp:
        search = BackendSearch(ref, rp.recorded_config(), [step], replayer=rp, floor=floor, write=write,
                               progress=progress)
        res = search.verdict()
    return {"step": step, "engine": engine, "floor": floor.as_dict(), **res}


# ----------------------------------------------------------------------------- tokens

def bisect_tokens(path: str | Path, step: int, *, tol: float | None = None, request_id: str | None = None,
                  component: str = "auto") -> dict:
    """Per sequence of ``step``: the first position where the component exceeds ``tol``, beside the
    weight-version boundary (first position whose token version differs from the first token's)
    and the prompt's prefix-cache hit.

    ``component``: ``backend`` (|e_backend|) or ``trainer`` (|e_trainer|), against the exact
    reference (tol default: the floor's tail bound); ``auto`` picks the one that is off the floor
    at the step (backend first); ``r`` is the raw mismatch |lp_trainer - lp_rollout| (tol default
    0.5), which also carries policy lag.
    """
    if component not in ("auto", "backend", "trainer", "r"):
        raise BadInput(f"component must be auto, backend, trainer or r, not {component!r}", field="component")
    if component == "r":
        return _tokens_by_r(path, step, tol=0.5 if tol is None else tol, request_id=request_id)
    from replay.diagnose import components as C
    from replay.diagnose.reference import reference_scores
    from replay.diagnose.stats import floor_test

    ref = reference_scores(path, [step])
    seqs = [s for s in ref.seqs if request_id is None or s.request_id == request_id]
    if not seqs:
        raise BadInput(f"step {step} has no sequence" + (f" {request_id!r}" if request_id else ""),
                       field="request_id" if request_id else "step", step=step, request_id=request_id)
    tok = C.tokens(seqs, ref.trainer_semantics)
    fb, ft = C.floors(ref.seqs)
    if component == "auto":
        component = next((c for c, f in (("backend", fb), ("trainer", ft))
                          if floor_test(tok.component(c), f).at_floor is False), "backend")
    floor = fb if component == "backend" else ft
    bound = floor_test(np.zeros(1), floor).tail_bound if tol is None else tol
    rows = []
    for i, s in enumerate(seqs):
        c = tok.component(component)[tok.seq == i]
        a = np.where(np.isnan(c), 0.0, np.abs(c))
        first = next((j for j, x in enumerate(a) if x > bound), None)
        boundary = next((j for j, v in enumerate(s.versions) if v != s.versions[0]), None)
        fin = a[np.isfinite(a)]
        rows.append({"request_id": s.request_id, "first_pos": first,
                     "value": None if first is None else float(c[first]),
                     "max_abs": float(fin.max()) if fin.size else None,
                     "outside_support": int(np.isinf(a).sum()),
                     "version_boundary": boundary, "versions": sorted(set(map(int, s.versions))),
                     "num_cached_tokens": s.num_cached_tokens,
                     "after_boundary": None if first is None or boundary is None else first >= boundary})
    return _token_summary(step, component, bound, rows)


def _token_summary(step: int, component: str, tol: float, seqs: list[dict]) -> dict:
    flagged = [s for s in seqs if s["first_pos"] is not None]
    seqs.sort(key=lambda s: -(s["max_abs"] or 0.0))
    worst = max(flagged, key=lambda s: s["max_abs"] or 0.0) if flagged else None
    with_boundary = [s for s in flagged if s["version_boundary"] is not None]
    return {"step": step, "component": component, "tol": tol,
            "token": None if worst is None else {"request_id": worst["request_id"], "pos": worst["first_pos"]},
            "flagged": len(flagged), "sequences": len(seqs),
            "at_or_after_boundary": sum(bool(s["after_boundary"]) for s in with_boundary),
            "with_boundary": len(with_boundary), "per_sequence": seqs}


def _tokens_by_r(path: str | Path, step: int, *, tol: float, request_id: str | None) -> dict:
    from replay.read.recording import open_recording

    with open_recording(path) as rec:
        q = """
            SELECT t.request_id, list(t.log_ratio ORDER BY t.pos) AS r,
                   list(t.weight_version ORDER BY t.pos) AS ver, any_value(r.num_cached_tokens) AS cached
            FROM tokens t JOIN rollouts r ON r.step = t.step AND r.request_id = t.request_id
            WHERE t.step = ? AND t.lp_trainer IS NOT NULL {extra}
            GROUP BY t.request_id ORDER BY t.request_id"""
        params: list = [step]
        extra = ""
        if request_id is not None:
            extra, params = "AND t.request_id = ?", [step, request_id]
        rows = rec.query(q.format(extra=extra), params).fetchall()
    if not rows:
        raise BadInput(f"step {step} has no scored tokens" + (f" for request {request_id!r}" if request_id else ""),
                       field="step", step=step, request_id=request_id)
    seqs = []
    for rid, r, ver, cached in rows:
        first = next((i for i, x in enumerate(r) if x is not None and abs(x) > tol), None)
        boundary = next((i for i, v in enumerate(ver) if v != ver[0]), None)
        seqs.append({"request_id": rid, "first_pos": first, "value": None if first is None else float(r[first]),
                     "max_abs": float(max(abs(x) for x in r if x is not None)), "outside_support": 0,
                     "version_boundary": boundary, "versions": sorted(set(ver)),
                     "num_cached_tokens": cached,
                     "after_boundary": None if first is None or boundary is None else first >= boundary})
    return _token_summary(step, "r", tol, seqs)


# ----------------------------------------------------------------------------- layers

def bisect_layers(path: str | Path, step: int, request_id: str, pos: int, *, preset: str | None = None,
                  fixes: tuple[str, ...] = ("fp32_lm_head",), against: str = "config", tol: float = 1e-6,
                  engine: str = "reference", device: str = "cpu", python: str | None = None,
                  model_path: str | Path | None = None, weights_from: str | Path | None = None) -> dict:
    """For one token, the first layer whose hidden state differs beyond ``tol`` between the
    recorded config and another (``preset`` + ``fixes``; or the trainer's HF model with
    ``against="trainer"``). Positions: ``embed``, ``layer.0`` .. ``layer.{L-1}``, ``lm_head``
    (the logprob of the token itself). The hidden states come from forward hooks: in the
    reference engine's forward, or (``engine="vllm"``) inside the running vLLM model, one
    worker process per config."""

    from replay.engines.base import ScoreRequest
    from replay.engines.factory import make_engine
    from replay.fixes import apply_fix, resolve
    from replay.rerun.replayer import Replayer, plan_step

    with Replayer(path, engine="reference", device=device, model_path=model_path, weights_from=weights_from) as rp:
        recorded = rp.recorded_config()
        plan = plan_step(rp.rec, step)
        req = next((r for r in plan.requests if r.request_id == request_id), None)
        if req is None:
            raise BadInput(f"request {request_id!r} is not in step {step}", field="request_id",
                           step=step, request_id=request_id)
        if not 0 <= pos < len(req.output_ids):
            raise BadInput(f"position {pos} outside the output (length {len(req.output_ids)})", field="pos",
                           step=step, request_id=request_id)
        version = req.token_versions[pos] if req.token_versions else plan.serving
        if preset is not None:
            other = resolve(preset, fixes, dtype=recorded.dtype)
        else:
            other = recorded
            for f in fixes:
                other = apply_fix(other, f)
        ids = req.prompt_ids + req.output_ids[:pos]
        score = ScoreRequest(request_id=request_id, prompt_ids=req.prompt_ids, output_ids=req.output_ids[:pos + 1],
                             temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        sides = []
        for cfg in ((recorded,) if against == "trainer" else (recorded, other)):
            eng = make_engine(engine, rp.model_path, cfg, device=device, python=python, worker=engine == "vllm")
            try:
                eng.load_weights(version, rp._state(version))
                states = [s[-1] for s in eng.hidden_states(ids)]
                lp = eng.score([score])[0].logprobs[pos]
            finally:
                eng.close()
            sides.append((states, lp))
        if against == "trainer":
            sides.append(_trainer_side(rp, version, ids, req, pos))
    (sa, lpa), (sb, lpb) = sides
    names = ["embed"] + [f"layer.{i}" for i in range(len(sa) - 1)]
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(sa, sb)]
    rows: list[dict[str, Any]] = [{"layer": n, "max_abs_diff": d} for n, d in zip(names, diffs)]
    rows.append({"layer": "lm_head", "max_abs_diff": abs(float(lpa) - float(lpb))})
    first = next((r["layer"] for r in rows if r["max_abs_diff"] > tol), None)
    return {"step": step, "request_id": request_id, "pos": pos, "version": version, "layer": first, "tol": tol,
            "a": recorded.to_dict(), "b": "trainer" if against == "trainer" else other.to_dict(), "layers": rows}


def _trainer_side(rp, version: int, ids: list[int], req, pos: int):
    """The trainer's HF model (float32) on the same token: residual stream after the
    embeddings and after each decoder layer (forward hooks), and the token's logprob."""
    import torch

    from replay.models import load_model

    model = load_model(rp.model_path, dtype="float32")
    model.load_state_dict({k: v.float() for k, v in rp._state(version).items()}, strict=False)
    states: list = []
    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(lambda m, i, o: states.append(o))]
    hooks += [layer.register_forward_hook(lambda m, i, o: states.append(o[0] if isinstance(o, tuple) else o))
              for layer in inner.layers]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids + [req.output_ids[pos]]]))
    finally:
        for h in hooks:
            h.remove()
    hs = [s[0, len(ids) - 1].float().numpy() for s in states]
    logits = out.logits[0, len(ids) - 1].float() / req.temperature
    lp = float(torch.log_softmax(logits, -1)[req.output_ids[pos]])
    return hs, lp


# ------------------------------------------------------------------ steps, by replay

def bisect_steps_replay(path: str | Path, *, preset: str = "v0", fixes: tuple[str, ...] = (), tol: float = 0.02,
                        engine: str = "reference", device: str = "cpu", python: str | None = None,
                        model_path: str | Path | None = None, weights_from: str | Path | None = None,
                        progress=None) -> dict:
    """The first step whose recorded logprobs depart from what ``preset`` (+ ``fixes``) gives
    on the same tokens, by binary search over the recorded steps: O(log n) replays.

    A step departs when the mean |lp_recorded - lp_replayed| over its tokens exceeds
    ``tol``. The search assumes that once a run departs it stays departed (the usual
    shape of a divergence); the evidence lists every step it replayed.
    """

    from replay.fixes import resolve
    from replay.rerun.replayer import Replayer

    with Replayer(path, engine=engine, device=device, python=python, model_path=model_path,
                  weights_from=weights_from) as rp:
        cfg = resolve(preset, fixes, dtype=rp.recorded_config().dtype)
        steps = rp.steps()
        seen: dict[int, float] = {}

        def departed(i: int) -> bool:
            s = steps[i]
            if s not in seen:
                if progress:
                    progress(f"replaying step {s} under {cfg.id}")
                res = rp.replay(s, cfg, mode="score", allow_incomplete=True)
                f = res.summary().get("fidelity") or {}
                seen[s] = float(f.get("mean_abs_diff", float("nan")))
            return seen[s] > tol

        lo, hi = 0, len(steps)           # invariant: steps[:lo] do not depart, steps[hi:] do
        while lo < hi:
            mid = (lo + hi) // 2
            if departed(mid):
                hi = mid
            else:
                lo = mid + 1
        onset = steps[lo] if lo < len(steps) else None
    evidence = [{"step": s, "mean_abs_diff": d, "departed": d > tol} for s, d in sorted(seen.items())]
    return {"step": onset, "method": "replay-binary-search", "against": cfg.to_dict(), "tol": tol,
            "replays": len(seen), "steps": len(steps), "evidence": evidence}
