"""``diagnose()``: where the mismatch of a run comes from, and why (DESIGN §8).

One call scores the reference of the chosen steps (stored in the recording, reused
next time), splits every token's mismatch exactly into backend error, the trainer's
deliberate semantics, policy lag and trainer error, tests backend and trainer error
against the measured floor, finds where each leaves it, replays a window of steps
to name the fixes the backend needs (or says it is not explained by them), tests the
objective-side hypotheses on the trainer, and ranks the tokens of the component
that is off. The result is a JSON-ready dict (the documented API of
``replay diagnose --format json``):

``verdict``
    ``clean`` (both at the floor), ``backend``, ``trainer``, ``backend+trainer`` (off,
    and explained), or ``unexplained`` (a component is off and nothing known explains it).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from replay.errors import BadInput, ReplayError
from replay.diagnose import components as C
from replay.diagnose.backend import FIX_LAYER, BackendSearch
from replay.diagnose.reference import reference_scores
from replay.diagnose.stats import floor_test
from replay.diagnose.trainer import onset as sequential_onset

WINDOW = 3   # steps replayed from the backend's onset (plus the first in-flight update and the step after)


def backend_window(rows: list, onset: int | None, update_steps: Sequence[int], complete: Sequence[int],
                   size: int = WINDOW) -> list[int]:
    """The steps the backend search replays: ``size`` steps from the onset (or the first step off
    the floor), plus the first step from there with an in-flight weight update and the step after
    it (where stale prefix-cache KV shows), complete steps only."""
    off = [r.step for r in rows if r.backend.at_floor is False]
    # from the first step at or after the onset that is itself off the floor (a CUSUM excursion can
    # begin on a step that is, alone, at the floor)
    start = min((s for s in off if onset is None or s >= onset), default=onset)
    if start is None:
        return []
    done = sorted(set(complete))
    window = [s for s in done if s >= start][:size]
    first_update = min((s for s in update_steps if s >= start), default=None)
    if first_update is not None:
        window += [s for s in done if s in (first_update, first_update + 1)]
    return sorted(set(window))


def diagnose(path: str | Path, *, against: str | Path | None = None, steps: Sequence[int] | None = None,
             window: Sequence[int] | None = None, engine: str = "reference", device: str = "cpu",
             python: str | None = None, dtype: str | None = None, trainer_dtype: str | None = None,
             model_path: str | Path | None = None, weights_from: str | Path | None = None, write: bool = True,
             layers: bool = True,
             progress: Callable[[str], None] | None = None) -> dict:
    """Diagnose the recording at ``path`` over ``steps`` (default: all); see the module doc.

    ``window`` overrides the steps the backend search replays (default :func:`backend_window`).
    ``dtype`` / ``trainer_dtype`` override the body dtypes the floors stand for. ``weights_from``:
    the folder holding the checkpoints of versions recorded by hash only (:func:`replay.open_recording`).
    """
    from replay.read.recording import open_recording

    path = Path(path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = reference_scores(path, steps, dtype=dtype, trainer_dtype=trainer_dtype, device=device, write=write,
                           model_path=model_path, weights_from=weights_from, progress=progress)
    timings["reference"] = time.perf_counter() - t0
    tok = C.tokens(ref.seqs, ref.trainer_semantics)
    floor_b, floor_t = C.floors(ref.seqs)
    rows = C.per_step(tok, floor_b, floor_t)
    from replay.diagnose.reference import stored_weights

    with open_recording(path) as rec:
        weights = stored_weights(rec)
        update_steps = _changing_updates(rec, {v: w["sha256"] for v, w in weights.items()})
        ended = {s for (s,) in rec.query("SELECT DISTINCT step FROM events WHERE kind = 'step_end'").fetchall()}
        stored = sorted(v for v, w in weights.items() if w["blob"])
    backend_test = floor_test(tok.backend, floor_b)
    backend_onset = sequential_onset([r.step for r in rows], [r.backend for r in rows])
    backend_off = backend_test.at_floor is False or backend_onset is not None

    out: dict[str, Any] = {
        "path": str(path), "steps": ref.steps, "engine": engine,
        "floor": floor_b.mean, "floors": {"backend": {"dtype": ref.body_dtype, "source": ref.body_dtype_source,
                                                     **floor_b.as_dict()},
                                         "trainer": {"dtype": ref.trainer_dtype, **floor_t.as_dict()}},
        "components": _components(tok, backend_test, floor_t),
        "per_step": [r.as_dict() for r in rows],
        "notes": list(ref.notes),
    }
    # ---------------------------------------------------------------- backend
    t1 = time.perf_counter()
    out["backend"] = _backend(path, ref, rows, backend_off, backend_test, backend_onset, window, update_steps,
                              ended, floor_b, engine=engine, device=device, python=python, write=write,
                              model_path=model_path, weights_from=weights_from, progress=progress)
    timings["backend"] = time.perf_counter() - t1
    # ---------------------------------------------------------------- trainer
    t2 = time.perf_counter()
    from replay.diagnose.trainer import trainer_verdict

    out["trainer"] = trainer_verdict(ref, tok, floor_t, rows, stored=stored, progress=progress,
                                     scorer=lambda: reference_scorer(path, model_path=model_path, device=device,
                                                                     weights_from=weights_from))
    timings["trainer"] = time.perf_counter() - t2
    # ---------------------------------------------------------------- verdict, onset, tokens, layer
    untested = []
    if backend_test.at_floor is None:
        untested.append(("backend", "no token with both a rollout logprob and a reference, or no floor measured"))
    if out["trainer"].get("explained") is None:
        untested.append(("trainer", "no trainer rows"))
    out["untested"] = [side for side, _ in untested]
    out["verdict"], out["summary"] = _verdict(out["backend"], out["trainer"], untested)
    onsets = [o for o in (out["backend"].get("onset_step"), out["trainer"].get("onset_step")) if o is not None]
    out["onset_step"] = min(onsets) if onsets else None
    which = ("backend" if out["backend"]["off_floor"] else
             "trainer" if out["trainer"].get("off_floor") or out["trainer"]["causes"] else None)
    out["tokens"] = drill_down(tok, which) if which else []
    out["layer"] = None
    if layers and which == "backend" and out["tokens"] and engine == "reference":
        t3 = time.perf_counter()
        out["layer"] = _layer(path, out["tokens"][0], out["backend"], device=device, model_path=model_path,
                              weights_from=weights_from)
        timings["layer"] = time.perf_counter() - t3
    if against is not None:
        from replay.diagnose.bisect import bisect_steps

        t4 = time.perf_counter()
        res = bisect_steps(path, against)
        out["against"] = {"path": str(against), "onset_step": res["step"], "method": res["method"],
                          "agrees": res["step"] == out["onset_step"], "evidence": res.get("evidence", [])}
        timings["against"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    out["timings"] = {k: round(v, 3) for k, v in timings.items()}
    out["scoring"] = {"sequences_scored": ref.scored, "sequences": len(ref.seqs),
                      "scored_tokens": ref.stats.scored_tokens, "seconds": round(ref.stats.seconds, 3)}
    return out


@contextlib.contextmanager
def reference_scorer(path: Path, *, model_path: Any = None, device: str = "cpu",
                     weights_from: Any = None) -> Iterator[Any]:
    """A :class:`~replay.diagnose.scoring.ReferenceScorer` over the recording's stored weights (read
    ahead of use), closed with the recording on exit."""
    from replay.models import recording_model
    from replay.read.recording import open_recording
    from replay.diagnose.reference import _WeightCache
    from replay.diagnose.scoring import ReferenceScorer

    with open_recording(path, weights_from=weights_from) as rec:
        folder = Path(model_path) if model_path else recording_model(path, rec.run_config())
        weights = _WeightCache(rec)
        scorer = ReferenceScorer(folder, weights, prefetch=weights.prefetch, device=device)
        try:
            yield scorer
        finally:
            scorer.close()
            weights.close()


def _changing_updates(rec: Any, sha: dict[int, str]) -> list[int]:
    """Steps with a weight update that changes the weights (the new version's hash differs from
    the one serving when the step began): where in-flight effects can show."""
    rows = rec.query("""
        SELECT u.step, u.weight_version, s.weight_version FROM events u
        LEFT JOIN (SELECT step, arg_min(weight_version, seq) AS weight_version FROM events
                   WHERE kind = 'step_start' GROUP BY step) s USING (step)
        WHERE u.kind = 'weights_update_start' ORDER BY u.step""").fetchall()
    return sorted({int(step) for step, new, old in rows
                   if new is None or old is None or sha.get(new) is None or sha.get(new) != sha.get(old)})


def _components(tok: C.Tokens, backend_test, floor_t) -> dict:
    sizes = {c: C.size(tok.component(c)) for c in C.COMPONENTS}
    r = C.size(tok.r)
    trainer_test = floor_test(tok.trainer, floor_t)
    return {
        "r": r,
        "backend": {**sizes["backend"], "at_floor": backend_test.at_floor, "test": backend_test.as_dict()},
        "semantics": sizes["semantics"],
        "lag": {**sizes["lag"], "tokens_with_lag": int(((tok.trainer_version >= 0)
                                                       & (tok.trainer_version != tok.version)).sum())},
        "trainer": {**sizes["trainer"], "at_floor": trainer_test.at_floor, "test": trainer_test.as_dict()},
        "n_tokens": int(len(tok.r)),
        "outside_reference_support": int(np.isposinf(tok.backend).sum()),
    }


def _backend(path: Path, ref, rows, off: bool, test, onset, window, update_steps, ended, floor, *, engine, device,
             python, write, model_path, progress, weights_from=None) -> dict:
    from replay.fixes import EngineConfig
    from replay.rerun.replayer import Replayer

    base: dict[str, Any] = {"off_floor": off, "onset_step": onset, "explained": None, "fixes": [],
                            "already_applied": [], "residual": None, "fidelity": None, "ablation": [],
                            "window": [], "layers": {}, "first_off_floor": next(
                                (r.step for r in rows if r.backend.at_floor is False), None)}
    try:
        with Replayer(path, engine=engine, device=device, python=python, model_path=model_path,
                      weights_from=weights_from) as rp:
            recorded: EngineConfig = rp.recorded_config()
            base["already_applied"] = list(recorded.fixes_applied())
            base["recorded_config"] = recorded.to_dict()
            if not off:
                base.update(explained=True, residual=test.as_dict())
                return base
            asked = sorted(window) if window is not None else backend_window(rows, onset, update_steps, ended)
            steps = [s for s in asked if s in set(ref.steps)]
            if not steps:
                base["reason"] = (f"none of the window's steps ({_steps(asked)}) is among the diagnosed steps "
                                  f"({_steps(ref.steps)}) with its step_end recorded; give --window with such steps"
                                  if asked else "no complete step (with its step_end event) to replay from the "
                                                "onset on; give --window with complete steps")
                return base
            base["window"] = steps
            search = BackendSearch(ref, recorded, steps, replayer=rp, floor=floor, write=write, progress=progress)
            res = search.verdict()
    except ReplayError as e:
        base["reason"] = f"the backend search could not run: {e}"
        return base
    base.update(res)
    base["window"] = steps
    base["layers"] = {f: FIX_LAYER[f] for f in base["fixes"]}
    if res.get("explained") is None and res.get("reason"):
        off_steps = [r.step for r in rows if r.backend.at_floor is False]
        base["reason"] += (f"; the backend is off the floor at steps {_steps(off_steps)}: replay some of them with "
                           "--window" if off_steps else "")
    return base


def _steps(steps: Sequence[int]) -> str:
    from replay.rerun.plans import step_ranges

    return step_ranges(sorted(steps)) or "none"


def _verdict(backend: dict, trainer: dict, untested: list[tuple[str, str]]) -> tuple[str, str]:
    """The overall verdict and a one-line summary; a side that could not be tested is said so, never
    reported at the floor."""
    b_off = backend["off_floor"]
    t_off = trainer.get("explained") is not None and (trainer.get("off_floor", False) or bool(trainer["causes"]))
    b_ok = (not b_off) or backend.get("explained") is True
    t_ok = (not t_off) or trainer.get("explained") is True
    not_tested = "; ".join(f"{side} not tested ({why})" for side, why in untested)
    if not b_ok or not t_ok:
        parts = []
        if not b_ok:
            parts.append("backend: " + (backend.get("reason") or "not explained by the known fixes"))
        if not t_ok:
            parts.append("trainer: " + (trainer.get("reason") or "not explained by the objective-side hypotheses"))
        return "unexplained", "; ".join(parts + ([not_tested] if not_tested else []))
    kinds = [k for k, off in (("backend", b_off), ("trainer", t_off)) if off]
    if not kinds:
        tested = [side for side in ("backend", "trainer") if side not in {s for s, _ in untested}]
        what = " and ".join(f"{side} error" for side in tested) or "nothing"
        return "clean", (f"{what} at the floor" if tested else "nothing could be tested") + \
            (f"; {not_tested}" if not_tested else "")
    bits = []
    if b_off:
        bits.append("backend needs " + " + ".join(backend["fixes"]) if backend["fixes"] else "backend")
    if t_off:
        bits.append("trainer: " + ", ".join(trainer["causes"]))
    return "+".join(kinds), "; ".join(bits + ([not_tested] if not_tested else []))


def drill_down(tok: C.Tokens, component: str, n: int = 10) -> list[dict]:
    """The ``n`` tokens with the largest |component|, with their version boundary, prefix-cache
    hit and lag beside them."""
    vals = tok.component(component)
    # finite values ranked; a token one side excludes from its support (+-inf) is counted apart
    key = np.where(np.isfinite(vals), np.abs(vals), -1.0)
    out = []
    for i in np.argsort(-key, kind="stable")[:n]:
        if key[i] < 0:
            break
        s = tok.seqs[int(tok.seq[i])]
        pos = int(tok.pos[i])
        boundary = next((j for j, v in enumerate(s.versions) if v != s.versions[0]), None)
        lt = s.lp_trainer
        out.append({"step": s.step, "request_id": s.request_id, "pos": pos, "token_id": int(s.output_ids[pos]),
                    "component": component, "value": float(vals[i]),
                    "lp_rollout": float(s.lp_rollout[pos]), "lp_ref": float(s.lp_sampler[pos]),
                    "lp_trainer": None if lt is None or np.isnan(lt[pos]) else float(lt[pos]),
                    "version": int(s.versions[pos]), "trainer_version": s.trainer_version,
                    "lag": float(tok.lag[i]), "version_boundary": boundary,
                    "after_boundary": None if boundary is None else pos >= boundary,
                    "num_cached_tokens": s.num_cached_tokens, "prompt_tokens": len(s.prompt_ids)})
    return out


def _layer(path: Path, token: dict, backend: dict, *, device: str, model_path: Any = None,
           weights_from: Any = None) -> dict | None:
    """Layer bisection of the worst backend token, between the recorded config and it with every
    fix it lacks."""
    from replay.diagnose.bisect import bisect_layers

    lacking = backend.get("lacking") or []
    if not lacking:
        return None
    try:
        res = bisect_layers(path, token["step"], token["request_id"], token["pos"], fixes=tuple(lacking),
                            device=device, model_path=model_path, weights_from=weights_from)
    except (ReplayError, BadInput) as e:
        return {"layer": None, "error": str(e)}
    return {"layer": res["layer"], "step": res["step"], "request_id": res["request_id"], "pos": res["pos"],
            "version": res["version"], "layers": res["layers"], "tol": res["tol"],
            "note": "hidden states of a plain prefill at the token's version: effects of the decode path "
                    "(in-flight updates, stale prefix cache, async lag) do not show here, only dtype and "
                    "logprob-mode differences"}
