"""Where divergence begins: by steps (and, with the replayer, by fixes, tokens and layers).

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

import numpy as np

from .errors import BadInput


def _step_stats(rec, schema: str, eps: float) -> dict[int, dict]:
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    rows = rec.sql(f"""
        SELECT step, count(*) AS n, avg(abs(log_ratio)) AS m, var_samp(abs(log_ratio)) AS v,
               avg(CASE WHEN log_ratio < {lo} OR log_ratio > {hi} THEN 1.0 ELSE 0.0 END) AS clip
        FROM {schema}.tokens WHERE lp_trainer IS NOT NULL GROUP BY step ORDER BY step""").fetchall()
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


def cusum_onset(steps: list[int], z: list[float], *, k: float, h: float) -> tuple[int | None, list[float]]:
    """One-sided CUSUM over ``z``; returns (onset step or None, the CUSUM path)."""
    s, start, path, onset = 0.0, None, [], None
    for step, zt in zip(steps, z):
        prev = s
        s = max(0.0, s + zt - k)
        if prev == 0.0 and s > 0.0:
            start = step
        if s == 0.0:
            start = None
        path.append(s)
        if onset is None and s > h:
            onset = start if start is not None else step
    return onset, path


def bisect_steps(run: str | Path, against: str | Path | None = None, *, threshold: float | None = None,
                 eps: float = 0.2, k: float = 1.0, h: float = 8.0, persist: int = 2) -> dict:
    """The first step where ``run`` departs from ``against`` (or exceeds ``threshold``).

    Returns ``{"step": onset or None, "method": ..., "evidence": [per-step rows], ...}``.
    """
    from .recording import open_recording

    if against is None and threshold is None:
        raise BadInput("give a reference run (--against REF) or a threshold (--threshold X)", field="against")
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


# ------------------------------------------------------------------------------ fixes

def _with_dtype(cfg, like):
    import dataclasses

    return dataclasses.replace(cfg, dtype=like.dtype)


def ddmin(items: list[str], passes) -> list[str]:
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


def bisect_fixes(path: str | Path, step: int, *, engine: str = "reference", preset: str = "v1",
                 rel_tol: float = 0.1, abs_tol: float = 1e-3, device: str = "cpu", python: str | None = None,
                 progress=None, replayer=None, write: bool = True) -> dict:
    """At ``step``, the minimal set of fixes (on ``preset``) whose replay restores parity with
    the trainer, and the ablation table (none, each alone, all but one, cumulative, and the
    minimal set itself).

    Parity: the replayed logprobs' mean |lp_trainer - lp_replayed| is at most that of the
    replay with all four fixes times ``1 + rel_tol``, plus ``abs_tol``. (All four fixes
    give V0's semantics; what mismatch remains under them is policy lag and numerics,
    which no engine fix removes.)
    """
    from .fixes import FIX_IDS, resolve
    from .replayer import Replayer

    own = replayer is None
    rp = replayer or Replayer(path, engine=engine, device=device, python=python)
    try:
        recorded = rp.recorded_config()
        cache: dict[tuple[str, ...], dict] = {}

        def measure(fixes) -> dict:
            key = tuple(f for f in FIX_IDS if f in fixes)
            if key not in cache:
                cfg = _with_dtype(resolve(preset, key), recorded)
                if progress:
                    progress(f"replaying step {step} with {'+'.join(key) or 'no fixes'}")
                res = rp.replay(step, cfg, mode="score", write=write)
                s = res.summary()
                m = s.get("replayed") or {}
                cache[key] = {"fixes": list(key), "config_id": cfg.id,
                              "mean_abs_log_ratio": m.get("mean_abs_log_ratio"),
                              "clip_rate": m.get("clip_rate"), "kl_new_old": m.get("kl_new_old"),
                              "n_tokens": m.get("n_tokens")}
            return cache[key]

        full = measure(FIX_IDS)
        if full["mean_abs_log_ratio"] is None:
            raise BadInput(f"step {step} has no trainer logprobs to compare the replays with",
                           field="step", step=step)
        threshold = full["mean_abs_log_ratio"] * (1 + rel_tol) + abs_tol

        def passes(fixes) -> bool:
            return measure(fixes)["mean_abs_log_ratio"] <= threshold

        minimal = ddmin(list(FIX_IDS), passes)
        rows = [("none", ())]
        rows += [(f"only {f}", (f,)) for f in FIX_IDS]
        rows += [(f"all but {f}", tuple(x for x in FIX_IDS if x != f)) for f in FIX_IDS]
        rows += [(f"cumulative to {FIX_IDS[i - 1]}", FIX_IDS[:i]) for i in range(1, len(FIX_IDS) + 1)]
        rows.append(("minimal", tuple(f for f in FIX_IDS if f in minimal)))
        none = measure(())["mean_abs_log_ratio"]
        ablation = []
        for label, fixes in rows:
            m = measure(fixes)
            gap = none - full["mean_abs_log_ratio"]
            ablation.append({"label": label, **m, "parity": m["mean_abs_log_ratio"] <= threshold,
                             "gap_closed": None if abs(gap) < 1e-12 else (none - m["mean_abs_log_ratio"]) / gap})
        return {"step": step, "preset": preset, "engine": engine, "fixes": [f for f in FIX_IDS if f in minimal],
                "parity_threshold": threshold, "replays": len(cache), "ablation": ablation}
    finally:
        if own:
            rp.close()


# ----------------------------------------------------------------------------- tokens

def bisect_tokens(path: str | Path, step: int, *, tol: float = 0.5, request_id: str | None = None) -> dict:
    """Per sequence of ``step``: the first position where |r| exceeds ``tol``, beside the
    weight-version boundary (first position whose token version differs from the first
    token's) and the prompt's prefix-cache hit."""
    from .recording import open_recording

    with open_recording(path) as rec:
        q = """
            SELECT t.request_id, list(abs(t.log_ratio) ORDER BY t.pos) AS ar,
                   list(t.weight_version ORDER BY t.pos) AS ver, any_value(r.num_cached_tokens) AS cached
            FROM tokens t JOIN rollouts r ON r.step = t.step AND r.request_id = t.request_id
            WHERE t.step = ? AND t.lp_trainer IS NOT NULL {extra}
            GROUP BY t.request_id ORDER BY t.request_id"""
        params: list = [step]
        extra = ""
        if request_id is not None:
            extra, params = "AND t.request_id = ?", [step, request_id]
        rows = rec.sql(q.format(extra=extra), params).fetchall()
    if not rows:
        raise BadInput(f"step {step} has no scored tokens" + (f" for request {request_id!r}" if request_id else ""),
                       field="step", step=step, request_id=request_id)
    seqs = []
    for rid, ar, ver, cached in rows:
        first = next((i for i, a in enumerate(ar) if a is not None and a > tol), None)
        boundary = next((i for i, v in enumerate(ver) if v != ver[0]), None)
        seqs.append({"request_id": rid, "first_pos": first,
                     "abs_r": None if first is None else float(ar[first]),
                     "max_abs_r": float(max(a for a in ar if a is not None)),
                     "version_boundary": boundary, "versions": sorted(set(ver)),
                     "num_cached_tokens": cached,
                     "after_boundary": None if first is None or boundary is None else first >= boundary})
    flagged = [s for s in seqs if s["first_pos"] is not None]
    seqs.sort(key=lambda s: -s["max_abs_r"])
    worst = flagged[0] if flagged else None
    with_boundary = [s for s in flagged if s["version_boundary"] is not None]
    return {"step": step, "tol": tol,
            "token": None if worst is None else {"request_id": worst["request_id"], "pos": worst["first_pos"]},
            "flagged": len(flagged), "sequences": len(seqs),
            "at_or_after_boundary": sum(bool(s["after_boundary"]) for s in with_boundary),
            "with_boundary": len(with_boundary), "per_sequence": seqs}


# ----------------------------------------------------------------------------- layers

def bisect_layers(path: str | Path, step: int, request_id: str, pos: int, *, preset: str | None = None,
                  fixes: tuple[str, ...] = ("fp32_lm_head",), against: str = "config", tol: float = 1e-6,
                  engine: str = "reference", device: str = "cpu", python: str | None = None) -> dict:
    """For one token, the first layer whose hidden state differs beyond ``tol`` between the
    recorded config and another (``preset`` + ``fixes``; or the trainer's HF model with
    ``against="trainer"``). Positions: ``embed``, ``layer.0`` .. ``layer.{L-1}``, ``lm_head``
    (the logprob of the token itself). The hidden states come from forward hooks: in the
    reference engine's forward, or (``engine="vllm"``) inside the running vLLM model, one
    worker process per config."""
    import dataclasses

    from .engines.base import ScoreRequest
    from .engines.factory import make_engine
    from .fixes import apply_fix, resolve
    from .replayer import Replayer, plan_step

    with Replayer(path, engine="reference", device=device) as rp:
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
            other = dataclasses.replace(resolve(preset, fixes), dtype=recorded.dtype)
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
    rows = [{"layer": n, "max_abs_diff": d} for n, d in zip(names, diffs)]
    rows.append({"layer": "lm_head", "max_abs_diff": abs(float(lpa) - float(lpb))})
    first = next((r["layer"] for r in rows if r["max_abs_diff"] > tol), None)
    return {"step": step, "request_id": request_id, "pos": pos, "version": version, "layer": first, "tol": tol,
            "a": recorded.to_dict(), "b": "trainer" if against == "trainer" else other.to_dict(), "layers": rows}


def _trainer_side(rp, version: int, ids: list[int], req, pos: int):
    """The trainer's HF model (float32) on the same token: residual stream after the
    embeddings and after each decoder layer (forward hooks), and the token's logprob."""
    import torch

    from .models import load_model

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
                        progress=None) -> dict:
    """The first step whose recorded logprobs depart from what ``preset`` (+ ``fixes``) gives
    on the same tokens, by binary search over the recorded steps: O(log n) replays.

    A step departs when the mean |lp_recorded - lp_replayed| over its tokens exceeds
    ``tol``. The search assumes that once a run departs it stays departed (the usual
    shape of a divergence); the evidence lists every step it replayed.
    """
    import dataclasses

    from .fixes import resolve
    from .replayer import Replayer

    with Replayer(path, engine=engine, device=device, python=python) as rp:
        cfg = dataclasses.replace(resolve(preset, fixes), dtype=rp.recorded_config().dtype)
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
