"""A recorded step as the replayer needs it: its requests, weight versions and updates.

:func:`plan_step` reads one step's events (``step_start``, ``request_submitted``,
``weights_update_start`` with its decode-step position and mode, ``step_end``) and its
rollouts, with the trainer's logprobs of the same tokens, from an open recording.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Sequence

import numpy as np

from replay.errors import BadInput, RecordingError


@dataclass
class RecordedRequest:
    """One recorded rollout, as the replayer needs it."""

    request_id: str
    group_id: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: np.ndarray                  # recorded rollout logprobs
    token_versions: list[int]             # recorded weight version per token
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    num_cached_tokens: int | None
    trainer_logprobs: np.ndarray | None   # the trainer's logprobs of the same tokens, if recorded
    arrival_step: int = 0                 # engine step at which it joined the step's batch (see arrivals)


@dataclass
class StepPlan:
    """What the engine went through at one step, read from the recording."""

    step: int
    serving: int                          # version serving when the step started
    requests: list[RecordedRequest]       # in submission order
    updates: list[Any]                    # WeightUpdate, in order
    modes: list[str]                      # recorded mode of each update
    versions: list[int]                   # every version the step used
    complete: bool                        # the step ended in the recording (step_end seen)
    missing: list[str] = field(default_factory=list)  # submitted but never recorded
    notes: list[str] = field(default_factory=list)    # what the plan inferred, for the replay's warnings


def _steps_with_rollouts(rec) -> list[int]:
    return [s for (s,) in rec.query("SELECT DISTINCT step FROM rollouts ORDER BY step").fetchall()]


def plan_step(rec, step: int) -> StepPlan:
    """Read step ``step``'s events and rollouts from an open recording."""
    from replay.engines.base import WeightUpdate
    from replay.metrics import latest_scoring_sql

    events = rec.query(
        "SELECT kind, weight_version, request_id, detail FROM events WHERE step = ? ORDER BY rank, seq",
        [step]).fetchall()
    rows = rec.query(f"""
        SELECT r.request_id, r.group_id, r.prompt_ids, r.output_ids, r.logprobs, r.token_versions,
               r.temperature, r.top_p, r.top_k, r.seed, r.num_cached_tokens, t.logprobs
        FROM rollouts r
        LEFT JOIN (SELECT request_id, arg_max(logprobs, {latest_scoring_sql()}) AS logprobs FROM trainer
                   WHERE step = ? GROUP BY request_id) t USING (request_id)
        WHERE r.step = ?""", [step, step]).fetchall()
    if not rows and not events:
        known = _steps_with_rollouts(rec)
        raise BadInput(f"step {step} is not in the recording (steps with rollouts: "
                       f"{step_ranges(known) or 'none'})", field="step", step=step)
    by_id = {}
    for rid, gid, p, o, lp, tv, temp, top_p, top_k, seed, cached, tlp in rows:
        by_id[rid] = RecordedRequest(
            request_id=rid, group_id=gid, prompt_ids=list(p), output_ids=list(o),
            logprobs=np.asarray(lp, np.float32), token_versions=list(tv) if tv is not None else [],
            temperature=float(temp if temp is not None else 1.0), top_p=float(top_p if top_p is not None else 1.0),
            top_k=int(top_k if top_k is not None else -1), seed=seed, num_cached_tokens=cached,
            trainer_logprobs=None if tlp is None else np.asarray(tlp, np.float32))
    serving, order, modes, complete = None, [], [], False
    updates: list[WeightUpdate] = []
    unplaced: set[int] = set()   # updates recorded without their engine step (after_step null)
    for kind, version, rid, detail in events:
        d = json.loads(detail) if detail else {}
        if kind == "step_start":
            serving = version
        elif kind == "request_submitted" and rid is not None:
            order.append(rid)
            if serving is None:
                serving = version
        elif kind == "weights_update_start" and d.get("between_steps"):
            continue   # loaded once the step's generation was done: the next step serves it
        elif kind == "weights_update_start":
            if "after_step" not in d:
                raise RecordingError(f"weights_update_start at step {step} has no after_step in its detail; "
                                     "the replayer needs the update's decode-step position", "cannot replay")
            if d["after_step"] is None:   # landed between two engine steps the recorder did not count
                unplaced.add(len(updates))
            updates.append(WeightUpdate(version=int(version), after_step=int(d["after_step"] or 0)))
            modes.append(d.get("mode", "?"))
        elif kind == "step_end":
            complete = True
    missing = [rid for rid in order if rid not in by_id]
    requests = [by_id[rid] for rid in order if rid in by_id]
    requests += [r for rid, r in by_id.items() if rid not in set(order)]  # rollouts without events
    if serving is None:
        vs = [v for r in requests for v in r.token_versions[:1]]
        serving = min(vs) if vs else 0
    versions = sorted({serving, *(u.version for u in updates), *(v for r in requests for v in r.token_versions)})
    updates, notes = arrivals(step, requests, updates, unplaced)
    return StepPlan(step=step, serving=int(serving), requests=requests, updates=updates, modes=modes,
                    versions=versions, complete=complete and not missing, missing=missing, notes=notes)


def arrivals(step: int, requests: list[RecordedRequest], updates: list,
             unplaced: AbstractSet[int] = frozenset()) -> tuple[list, list[str]]:
    """When each request joined the step's batch, from where its tokens change version.

    In a batch that starts together, every request still running when an update lands
    changes version at the same token, the update's ``after_step``. Under continuous
    batching requests join at different engine steps, so the update reaches each at its own
    token: request ``r`` whose first token of the new version is ``p_r`` joined at
    ``a_r = U - p_r``, ``U`` being the update's engine step counted from the first request's
    start. ``U`` is the recorded ``after_step``, or the largest ``p_r`` when a request
    changes version later than that (the recorded position then counted from another
    origin, and every update of the step moves by the same amount). A request that never
    reaches the new version is taken to have joined at 0; one whose every token has the
    new version joined when the update landed. An update in ``unplaced`` (its engine step
    not recorded, as from a loop on ``AsyncLLM``) is placed from the tokens alone: at the
    largest engine step at which a request reaches its version (``p_r`` for the first,
    the first token of its version plus the request's arrival for a later one), and after
    the last token of every request that ended before it. Sets ``arrival_step`` on each
    request and returns the updates at their engine steps, with a note of what was inferred."""
    from replay.engines.base import WeightUpdate

    if not updates:
        return updates, []

    def first_of(version: int) -> dict[str, int | None]:
        return {r.request_id: next((j for j, v in enumerate(r.token_versions) if v == version), None)
                for r in requests}

    pos = first_of(updates[0].version)
    crossing = [p for p in pos.values() if p]
    if 0 in unplaced:   # where the tokens say, and past every token of a request that never reached it
        end = max((len(r.output_ids) for r in requests if _finished_before(r, pos, updates[0].version)), default=0)
        updates = [WeightUpdate(version=updates[0].version, after_step=max([*crossing, end])), *updates[1:]]
    first = updates[0]
    together = not crossing or all(p == first.after_step for p in crossing)
    if together:
        top = first.after_step
        if first.after_step > 0:   # a request that only ever saw the new version joined at the update
            for r in requests:
                if pos[r.request_id] == 0:
                    r.arrival_step = first.after_step
    else:
        top = max(first.after_step, *crossing)
        for r in requests:
            p = pos[r.request_id]
            r.arrival_step = 0 if p is None else top - p
    shift = top - first.after_step
    moved = [WeightUpdate(version=u.version, after_step=u.after_step + shift) for u in updates]
    for i, u in enumerate(moved[1:], start=1):
        at = first_of(u.version)
        if i in unplaced:
            reach = [q + r.arrival_step for r in requests if (q := at[r.request_id])]
            before = [r.arrival_step + len(r.output_ids) for r in requests if _finished_before(r, at, u.version)]
            moved[i] = WeightUpdate(version=u.version, after_step=max([*reach, *before, moved[i - 1].after_step]))
        for r in requests:   # a request whose every token has this version joined when it landed
            if at[r.request_id] == 0 and pos[r.request_id] is None:
                r.arrival_step = moved[i].after_step
    if together:
        return moved, []
    joined = sorted({r.arrival_step for r in requests})
    notes = [f"step {step}: requests joined the running batch at engine steps {', '.join(map(str, joined))} "
             f"(from where their tokens reach version {first.version}); replayed so"]
    if shift:
        notes.append(f"step {step}: the update to version {first.version} is recorded at decode step "
                     f"{first.after_step}, but a request reaches it at its token {top}: replayed at engine "
                     f"step {top}, every update of the step moved by {shift}")
    for u in moved[1:]:
        off = [r.request_id for r in requests
               if (q := next((j for j, v in enumerate(r.token_versions) if v == u.version), None))
               and q != u.after_step - r.arrival_step]
        if off:
            notes.append(f"step {step}: the update to version {u.version} reaches {len(off)} request(s) "
                         f"(e.g. {off[0]}) at another token than their arrival implies; the replay will differ there")
    return moved, notes


def _finished_before(r: RecordedRequest, first: dict, version: int) -> bool:
    """Whether ``r`` ended before the update to ``version`` landed: no token of it, nor of a later one."""
    return first[r.request_id] is None and all(v < version for v in r.token_versions)


def step_ranges(steps: Sequence[int]) -> str:
    out: list[str] = []
    start: int | None = None
    prev = 0  # the last step of the current range (set with start)
    for s in steps:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = s
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out)
