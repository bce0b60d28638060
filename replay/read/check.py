"""``replay check``: which commands a recording supports, exactly what is missing, how to add it.

Reads the recording (never writes) and looks for what each command needs:

* ``info``, ``sql``, ``tui``: a recording that opens;
* ``bisect --by steps``: trainer rows that score the rollouts' tokens (joined by step and
  request id);
* ``rerun``: a complete engine config in the run config (each field a default would fill
  is named), the model folder, the weights of every version a token or an update names
  (stored, or by hash with a checkpoint path), weight versions per token, and steps whose
  end is recorded;
* ``bisect --by fixes``: what ``rerun`` needs;
* ``diagnose``: what ``rerun`` needs for the backend verdict, plus trainer rows for the
  trainer's.

The report is a JSON-ready dict: ``commands`` maps each command to ``ready`` (True, or
False when something it needs is missing), ``missing`` (``[{"what", "how"}]``) and
``notes`` (what it can do anyway); ``facts`` holds what was counted.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

COMMANDS = ("info", "sql", "tui", "bisect --by steps", "rerun", "bisect --by fixes", "diagnose")

HOW = {
    "engine_config": "record the engine's config in the run config: info = "
                     "replay.integrations.vllm.describe_llm(llm); Recorder(path, run_config={'engine': "
                     "{'name': info.engine, 'config': info.engine_config.to_dict()}, 'model': ...})",
    "model": "record the checkpoint in the recording (rec.model(path): config, tokenizer and weights), name its "
             "folder in the run config (run_config['model'] = path), or pass --model PATH",
    "weights": "store each version the run serves: rec.weights(version=v, state_dict=model.state_dict()) "
               "(or replay.integrations.torch.record_weights), or rec.weights(version=v, sha256=..., path=CKPT)",
    "token_versions": "stamp each token's weight version: record_outputs(..., weight_version=v) or "
                      "rollout(token_versions=[...])",
    "step_end": "mark each step's boundaries: `with rec.step(k): ...` around the step",
    "trainer": "record the trainer's logprobs of the same tokens: replay.integrations.torch.record_trainer_batch"
               "(rec, step=k, request_ids=..., ...) with the rollouts' own step and request ids",
}


def check(path: str | os.PathLike) -> dict:
    """What the recording at ``path`` supports; see the module doc."""
    from replay.errors import RecordingError
    from replay.fixes import EngineConfig
    from replay.models import recorded_model
    from replay.read.recording import open_recording
    from replay.rerun.plans import step_ranges

    root = Path(path)
    with open_recording(root) as rec:
        info = rec.info()
        run_cfg = rec.run_config()
        one = lambda q: rec.query(q).fetchall()[0]  # noqa: E731
        n_roll, no_tv = one("SELECT count(*), count(*) FILTER (WHERE token_versions IS NULL) FROM rollouts")
        steps = [s for (s,) in rec.query("SELECT DISTINCT step FROM rollouts ORDER BY step").fetchall()]
        ended = {s for (s,) in rec.query("SELECT DISTINCT step FROM events WHERE kind = 'step_end'").fetchall()}
        used = {int(v) for (v,) in rec.query(
            """SELECT DISTINCT v FROM (SELECT unnest(token_versions) AS v FROM rollouts
               UNION ALL SELECT weight_version FROM events WHERE kind = 'weights_update_start'
               UNION ALL SELECT weight_version FROM events WHERE kind = 'step_start') WHERE v IS NOT NULL"""
        ).fetchall()}
        weights = {int(v): (bool(b), p) for v, b, p in rec.query(
            "SELECT version, bool_or(blob IS NOT NULL), any_value(path) FROM weights GROUP BY version").fetchall()}
        n_tr, joined = one("""SELECT (SELECT count(*) FROM trainer),
            (SELECT count(*) FROM rollouts r WHERE EXISTS (SELECT 1 FROM trainer t
                 WHERE t.step = r.step AND t.request_id = r.request_id))""")
        shifted = one("""SELECT count(*) FROM (SELECT DISTINCT step, request_id FROM trainer) t
            WHERE NOT EXISTS (SELECT 1 FROM rollouts r WHERE r.step = t.step AND r.request_id = t.request_id)
              AND EXISTS (SELECT 1 FROM rollouts r WHERE r.request_id = t.request_id)""")[0]
        warnings = info["warnings"]

    facts = {"status": info["status"], "rollouts": n_roll, "steps": len(steps),
             "complete_steps": len([s for s in steps if s in ended]), "trainer_rows": n_tr,
             "rollouts_scored": joined, "versions_used": sorted(used),
             "versions_stored": sorted(v for v, (blob, _) in weights.items() if blob),
             "versions_by_hash": sorted(v for v, (blob, _) in weights.items() if not blob)}
    replay_missing: list[dict] = []
    replay_notes: list[str] = []

    def need(key: str, what: str, into: list[dict]) -> None:
        into.append({"what": what, "how": HOW[key]})

    engine = (run_cfg.get("engine") or {}).get("config") if isinstance(run_cfg.get("engine"), dict) else None
    if not isinstance(engine, dict) or not engine:
        need("engine_config", "the run config holds no engine config (run_config['engine']['config'])",
             replay_missing)
    else:
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine) - fields)
        defaulted = sorted(fields - set(engine))
        if unknown:
            need("engine_config", f"the engine config has fields this replay does not know: {', '.join(unknown)}",
                 replay_missing)
        elif defaulted:
            need("engine_config", "the engine config lacks " + ", ".join(defaulted)
                 + ": a replay would take V1 defaults for them", replay_missing)
        facts["engine_config_defaulted"] = defaulted
    try:
        named, found = recorded_model(root, run_cfg)
    except RecordingError as e:
        named, found = "", None
        need("model", e.msg, replay_missing)
    if found is None and named != "":
        what = ("the run config names no model" if named is None
                else f"the model folder {named} named in the run config is not found from here")
        need("model", what, replay_missing)
    if n_roll and no_tv == n_roll:
        need("token_versions", "no rollout carries token_versions (the weight version of each token)",
             replay_missing)
    elif no_tv:
        replay_notes.append(f"{no_tv} of {n_roll} rollouts carry no token_versions")
    lacking = sorted(v for v in used if v not in weights)
    by_hash = sorted(v for v in used if v in weights and not weights[v][0])
    if lacking:
        need("weights", f"no weights recorded for version(s) {', '.join(map(str, lacking))}", replay_missing)
    elif not used and not weights:
        need("weights", "no weights recorded (and no token or event names a version)", replay_missing)
    if by_hash:
        replay_notes.append(f"version(s) {', '.join(map(str, by_hash))} are recorded by hash only: a replay "
                            "needs --weights-from DIR, the folder holding their checkpoints (each checked "
                            "against its recorded hash)")
    if steps and not ended:
        need("step_end", "no step_end event: no step is known to be whole", replay_missing)
    elif len(ended & set(steps)) < len(steps):
        left = sorted(set(steps) - ended)
        replay_notes.append(f"step(s) {step_ranges(left)} have no step_end (a writer stopped during them?): "
                            "`--step all` skips them")
    trainer_missing: list[dict] = []
    if not n_tr:
        need("trainer", "no trainer rows", trainer_missing)
    elif not joined:
        extra = (f" ({shifted} trainer sequences match a rollout's request id at another step: keyed by "
                 "the trainer's own step counter?)" if shifted else "")
        need("trainer", f"no trainer row matches a rollout by (step, request_id){extra}", trainer_missing)
    commands: dict[str, dict] = {}
    for cmd in COMMANDS:
        missing: list[dict] = []
        notes: list[str] = list(warnings) if cmd == "info" else []
        if cmd == "bisect --by steps":
            missing = list(trainer_missing)
        elif cmd in ("rerun", "bisect --by fixes"):
            missing, notes = list(replay_missing), list(replay_notes)
        elif cmd == "diagnose":
            missing, notes = list(replay_missing), list(replay_notes)
            if trainer_missing:
                notes.append("without trainer rows it gives the backend verdict only: "
                             + trainer_missing[0]["what"])
        commands[cmd] = {"ready": not missing, "missing": missing, "notes": notes}
    if joined and joined < n_roll:
        commands["bisect --by steps"]["notes"].append(f"{n_roll - joined} of {n_roll} rollouts have no trainer row")
    return {"path": str(root), "facts": facts, "commands": commands}


def check_output(report: dict, fmt: str) -> str:
    """The report as ``table`` (one line per command, then what is missing and how), ``json``
    or ``csv``."""
    from replay.output import to_csv, to_json

    if fmt == "json":
        return to_json(report)
    rows = [[cmd, "yes" if c["ready"] else "no", "; ".join(m["what"] for m in c["missing"])]
            for cmd, c in report["commands"].items()]
    if fmt == "csv":
        return to_csv(["command", "ready", "missing"], rows).rstrip("\n")
    width = max(len(r[0]) for r in rows)
    lines = [f"{report['path']}: {report['facts']['rollouts']} rollouts, {report['facts']['steps']} steps, "
             f"status {report['facts']['status']}", ""]
    told: set[str] = set()
    for cmd, c in report["commands"].items():
        lines.append(f"  {cmd:<{width}}  {'ready' if c['ready'] else 'NOT READY'}")
        for m in c["missing"]:
            lines.append(f"  {'':<{width}}    missing: {m['what']}" + (" (see above)" if m["what"] in told else ""))
            if m["what"] not in told:
                lines.append(f"  {'':<{width}}      how: {m['how']}")
                told.add(m["what"])
        for n in c["notes"]:
            lines.append(f"  {'':<{width}}    note: {n}")
    return "\n".join(lines)
