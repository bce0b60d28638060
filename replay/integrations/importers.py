"""Turn another tool's logs into a recording: ``replay import KIND SRC DEST``.

Kinds:

* ``slime``: slime's debug dumps, ``--save-debug-rollout-data`` (``{"rollout_id",
  "samples": [Sample.to_dict()]}``) and ``--save-debug-train-data`` (``{"format_version":
  2, "rollout_id", "rank", "samples": [...], "dp_shards": [...]}``, one dict per training
  sample with ``tokens``, ``response_lengths``, ``rollout_log_probs``, ``log_probs``,
  ``advantages``, ...). A rollout sample becomes a ``rollouts`` row, a train sample a
  ``trainer`` row (and a ``rollouts`` row when no rollout dump covers its rollout id).
  ``step`` is the rollout id; ``request_id`` the sample's ``index`` (``sample_index`` in
  train dumps), else its position in the rollout dump. A multi-turn sample (its loss mask
  0 on tokens a tool or the environment appended) becomes one row per turn,
  ``<index>/turn<j>``, whose prompt is everything before the turn: masked tokens were
  never sampled, so they are context, not output, and stay out of every metric. Weight
  versions come per token or per turn (one per generation call); the reward goes on the
  last turn. A dict reward needs ``reward_key`` (else NULL, with a warning). An
  evaluation dump (slime names it with ``eval_`` before its rollout id) is skipped; two
  dumps of one kind for one rollout id are refused. Files load with
  ``torch.load(weights_only=True)`` (numpy arrays allowed); one that needs full
  unpickling is refused unless ``trust_pickle`` (unpickling runs code from the file).
* ``jsonl`` / ``parquet``: one row per sequence with per-token list fields; column names
  come from a :class:`ColumnMap`.

Errors name the file, the row and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from replay.errors import BadInput
from replay.integrations import as_version

KINDS = ("slime", "jsonl", "parquet")
_SLIME_FINISH = {"completed": "stop", "truncated": "length", "aborted": "abort", "failed": "failed"}


@dataclass
class ImportStats:
    """What an import wrote."""

    files: int = 0         # source files read
    rollouts: int = 0      # rollouts rows
    trainer: int = 0       # trainer rows
    skipped: list[str] = field(default_factory=list)  # files left out, with the reason
    warnings: list[str] = field(default_factory=list)  # what was recorded as unknown, and why
    steps: set = field(default_factory=set)           # steps written

    def to_dict(self) -> dict:
        return {"files": self.files, "rollouts": self.rollouts, "trainer": self.trainer,
                "steps": sorted(self.steps), "skipped": self.skipped, "warnings": self.warnings}

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


@dataclass
class ColumnMap:
    """Source column of each recorded field (jsonl / parquet). Empty string: not present."""

    step: str = "step"                          # int: training step
    request_id: str = "request_id"              # str: sequence id (default: the row number)
    group_id: str = "group_id"                  # str: group of samples of one prompt
    prompt_ids: str = "prompt_ids"              # list[int]: prompt tokens
    output_ids: str = "output_ids"              # list[int]: generated tokens (required)
    logprobs: str = "logprobs"                  # list[float]: engine logprob per output token (required)
    trainer_logprobs: str = "trainer_logprobs"  # list[float]: trainer logprob per output token
    entropy: str = "entropy"                    # list[float]: trainer entropy per output token
    reward: str = "reward"                      # float
    advantage: str = "advantage"                # float, or a per-token list (its first value is kept)
    version: str = "weight_version"             # int or list[int]: engine weight version (per token)
    trainer_version: str = "trainer_version"    # int: the trainer's weight version
    finish_reason: str = "finish_reason"        # str
    temperature: str = "temperature"            # float
    logprobs_mode: str = "logprobs_mode"        # str


# --------------------------------------------------------------------------- helpers


def _where(path: Path, row: int) -> str:
    return f"{path}: row {row}"


def _ints(value: Any, where: str, name: str) -> list[int]:
    if value is None:
        raise BadInput(f"{where}: field {name!r} is missing", field=name)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadInput(f"{where}: field {name!r} must be a list of ints, got {type(value).__name__}", field=name)
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as e:
        raise BadInput(f"{where}: field {name!r} holds a non-integer ({e})", field=name) from None


def _floats(value: Any, where: str, name: str, n: int | None = None) -> list[float]:
    if value is None:
        raise BadInput(f"{where}: field {name!r} is missing", field=name)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadInput(f"{where}: field {name!r} must be a list of numbers, got {type(value).__name__}",
                       field=name)
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise BadInput(f"{where}: field {name!r} holds a non-number ({e})", field=name) from None
    if n is not None and len(out) != n:
        raise BadInput(f"{where}: field {name!r} has {len(out)} values for {n} output tokens", field=name)
    return out


def _scalar(value: Any, where: str, name: str, kind: type = float) -> Any:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
        if value is None:
            return None
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r}", field=name) from None
    if kind is float and not math.isfinite(out):
        return None
    return out


def _versions(value: Any, n: int, where: str, name: str) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == n:
            vs = [v for v in map(as_version, value) if v is not None]
            return vs if len(vs) == n else None
        v = as_version(value[-1]) if value else None  # slime: one version per generation call
        return None if v is None else [v] * n
    v = as_version(value)
    if v is None:
        raise BadInput(f"{where}: field {name!r} must be an int or a list of ints, got {value!r}", field=name)
    return [v] * n


# ------------------------------------------------------------------------------ slime


def load_pt(path: Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only with ``trust_pickle``."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            reason = _unpickle_reason(str(e))
            raise BadInput(f"{path}: refusing to unpickle: the file holds objects that a weights-only load "
                           f"cannot read ({reason}). Unpickling runs code from the file; if you trust it, "
                           "pass --trust-pickle", field="file") from None
    except Exception as e:
        raise BadInput(f"{path}: not a torch file torch.load can read ({e})", field="file") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadInput(f"{path}: not a torch file torch.load can read ({' '.join(str(e).split())})",
                       field="file") from None


def _numpy_globals() -> list:
    """numpy array and scalar reconstruction, allowed in weights-only loads (dumps often hold
    numpy arrays). Object arrays stay refused: their items would be arbitrary pickles."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    kinds = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *kinds]


def _unpickle_reason(text: str) -> str:
    """The line of torch's weights-only error that names what it refused, without ANSI codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in [ln for ln in lines if "Unsupported" in ln] + [ln for ln in lines if "WeightsUnpickler error" in ln]:
        return " ".join(ln.split()).split(" Please use")[0][:300]
    return " ".join(lines[0].split())[:300] if lines else "unknown reason"


def _pt_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.pt") if p.is_file())
        if files:
            return files
        raise BadInput(f"{src}: no *.pt files found", field="src")
    raise BadInput(f"{src}: no such file or folder", field="src")


def _slime_request_id(sample: dict, pos: int, *keys: str) -> str:
    for key in keys:
        if sample.get(key) is not None:
            return str(_scalar(sample[key], "", key, int))
    return str(pos)


def _slime_split(sample: dict, where: str, n_key: str) -> tuple[list[int], list[int], int]:
    tokens = _ints(sample.get("tokens"), where, "tokens")
    n = _scalar(sample.get(n_key), where, n_key, int)
    if n is None or not 0 <= n <= len(tokens):
        raise BadInput(f"{where}: field {n_key!r} = {n} does not fit {len(tokens)} tokens", field=n_key)
    return tokens[:len(tokens) - n], tokens[len(tokens) - n:], n


def _slime_turns(mask: Any, n: int, where: str, name: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of generated tokens in a response. slime's loss mask is 1
    on tokens the model generated and 0 on tokens a multi-turn rollout appended (tool or
    environment output), which the engine never sampled: each run of 1s is one turn, an
    engine request of its own whose prompt is everything before it."""
    if mask is None:
        return [(0, n)]
    flags = _ints(mask, where, name)
    if len(flags) != n:
        raise BadInput(f"{where}: field {name!r} has {len(flags)} values for {n} response tokens", field=name)
    if any(f not in (0, 1) for f in flags):
        raise BadInput(f"{where}: field {name!r} must hold 0 and 1 only", field=name)
    turns, start = [], None
    for i, f in enumerate(flags + [0]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            turns.append((start, i))
            start = None
    return turns


def _slime_turn_id(rid: str, j: int, turns: list) -> str:
    return rid if len(turns) == 1 else f"{rid}/turn{j}"


def _slime_turn_versions(value: Any, n: int, turns: list, where: str) -> list[list[int] | None] | None:
    """Each turn's token versions: sliced when the dump has one per response token, one per
    turn when it has one per generation call (slime appends one per call), the last for
    every token of a single turn. None: the count fits neither (versions unknown)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and len(turns) > 1 and len(value) != n:
        if len(value) != len(turns):
            return None
        vs = [as_version(v) for v in value]
        return [None if v is None else [v] * (e - s) for v, (s, e) in zip(vs, turns)]
    whole = _versions(value or None, n, where, "weight_versions")
    return [None if whole is None else whole[s:e] for s, e in turns]


def _slime_reward(value: Any, where: str, reward_key: str | None, stats: "ImportStats") -> float | None:
    if isinstance(value, dict):
        if reward_key is None:
            stats.warn(f"rewards are dicts (keys: {', '.join(map(str, value))}); recorded as NULL: pass "
                       "--reward-key KEY to record one of them")
            return None
        if reward_key not in value:
            raise BadInput(f"{where}: reward has no key {reward_key!r} (keys: {', '.join(map(str, value))})",
                           field="reward")
        return _scalar(value[reward_key], where, f"reward.{reward_key}")
    if reward_key is not None and value is not None:
        stats.warn(f"--reward-key {reward_key} given, but rewards are plain numbers: recorded as they are")
    return _scalar(value, where, "reward")


def _slime_rollout_rows(sample: dict, step: int, rid: str, where: str, reward_key: str | None,
                        stats: "ImportStats") -> list[dict]:
    prompt, output, n = _slime_split(sample, where, "response_length")
    turns = _slime_turns(sample.get("loss_mask"), n, where, "loss_mask")
    lps = _floats(sample.get("rollout_log_probs"), where, "rollout_log_probs", n)
    if not turns:
        stats.warn(f"{where}: no generated token (the loss mask is 0 throughout): left out")
    versions = _slime_turn_versions(sample.get("weight_versions"), n, turns, where)
    if versions is None:
        stats.warn(f"{where}: {len(sample['weight_versions'])} weight versions for {len(turns)} turns and "
                   f"{n} response tokens: token versions recorded as NULL")
        versions = [None] * len(turns)
    status = sample.get("status")
    status = getattr(status, "value", status)
    cache = sample.get("prefix_cache_info") or {}
    reward = _slime_reward(sample.get("reward"), where, reward_key, stats)
    rows = []
    for j, (s, e) in enumerate(turns):
        last = j == len(turns) - 1
        rows.append(dict(
            step=step, request_id=_slime_turn_id(rid, j, turns),
            group_id=None if sample.get("group_index") is None else str(sample["group_index"]),
            prompt_ids=prompt + output[:s], output_ids=output[s:e], logprobs=lps[s:e], token_versions=versions[j],
            reward=reward if last else None,
            finish_reason=(_SLIME_FINISH.get(str(status), None if status is None else str(status)) if last else None),
            engine="sglang",
            num_cached_tokens=(cache.get("cached_tokens") if isinstance(cache, dict) and len(turns) == 1 else None)))
    return rows


def _slime_train_rows(sample: dict, step: int, rid: str, where: str) -> list[tuple[dict, dict]]:
    prompt, output, n = _slime_split(sample, where, "response_lengths")
    turns = _slime_turns(sample.get("loss_masks"), n, where, "loss_masks")
    lps = _floats(sample.get("log_probs"), where, "log_probs", n)
    ent = None if sample.get("entropy") is None else _floats(sample["entropy"], where, "entropy", n)
    rollout_lps = _floats(sample.get("rollout_log_probs"), where, "rollout_log_probs", n)
    advantage = _scalar(sample.get("advantages"), where, "advantages")
    reward = _scalar(sample.get("rewards"), where, "rewards")
    truncated = _scalar(sample.get("truncated"), where, "truncated", int)
    rows = []
    for j, (s, e) in enumerate(turns):
        tid, last = _slime_turn_id(rid, j, turns), j == len(turns) - 1
        trainer = dict(step=step, request_id=tid, weight_version=None, logprobs=lps[s:e],
                       entropy=None if ent is None else ent[s:e], advantage=advantage)
        rollout = dict(step=step, request_id=tid, prompt_ids=prompt + output[:s], output_ids=output[s:e],
                       logprobs=rollout_lps[s:e], reward=reward if last else None,
                       finish_reason="length" if truncated and last else None, engine="sglang")
        rows.append((trainer, rollout))
    return rows


def _classify(data: Any, path: Path) -> str:
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise BadInput(f"{path}: not a slime debug dump (expected a dict with a 'samples' list)", field="samples")
    return "train" if "dp_shards" in data or "format_version" in data else "rollout"


def _is_eval_dump(path: Path, rollout_id: int) -> bool:
    """slime saves an evaluation dump under the training template with ``eval_`` before the
    rollout id (``path_template.format(rollout_id="eval_" + str(rollout_id))``,
    ``RolloutManager._save_debug_rollout_data``), and the same ``rollout_id`` inside: the
    file's own rollout id, prefixed so, in its name."""
    import re

    return re.search(rf"(?<![0-9A-Za-z])eval_{rollout_id}(?![0-9])", path.name) is not None


def import_slime(src: str | Path, dest: str | Path, *, trust_pickle: bool = False, reward_key: str | None = None,
                 run_config: dict | None = None) -> ImportStats:
    """Import slime debug dumps (a file or a folder of ``*.pt``) into a new recording at ``dest``."""
    stats = ImportStats()
    rollouts: dict[int, list[tuple[str, dict]]] = {}
    trains: dict[int, list[tuple[str, dict, dict]]] = {}
    seen: dict[tuple[str, int], Path] = {}
    for path in _pt_files(Path(src)):
        data = load_pt(path, trust_pickle=trust_pickle)
        kind = _classify(data, path)
        step = _scalar(data.get("rollout_id"), f"{path}", "rollout_id", int)
        if step is None:
            raise BadInput(f"{path}: field 'rollout_id' is missing", field="rollout_id")
        if kind == "rollout" and _is_eval_dump(path, step):
            stats.skipped.append(f"{path}: evaluation rollouts of rollout {step}, not training data")
            continue
        if (kind, step) in seen:
            raise BadInput(f"{path} and {seen[(kind, step)]} are both {kind} dumps of rollout {step}: one may be "
                           "an evaluation dump or another run's; import them apart", field="rollout_id", step=step)
        seen[(kind, step)] = path
        stats.files += 1
        for pos, sample in enumerate(data["samples"]):
            where = _where(path, pos)
            if not isinstance(sample, dict):
                raise BadInput(f"{where}: a sample must be a dict, got {type(sample).__name__}", field="samples")
            if kind == "rollout":
                rid = _slime_request_id(sample, pos, "index")
                rollouts.setdefault(step, []).extend(
                    (where, row) for row in _slime_rollout_rows(sample, step, rid, where, reward_key, stats))
            else:
                rid = _slime_request_id(sample, pos, "sample_index", "rollout_position")
                trains.setdefault(step, []).extend((where, *rows) for rows in _slime_train_rows(sample, step, rid, where))
    writes: list[tuple[str, str, dict]] = []
    for step in sorted(set(rollouts) | set(trains)):
        have = {row["request_id"]: row for _, row in rollouts.get(step, [])}
        samples = {rid.split("/turn")[0] for rid in have}
        writes += [(where, "rollouts", row) for where, row in rollouts.get(step, [])]
        for where, trainer, rollout in trains.get(step, []):
            rid = rollout["request_id"]
            seen_row = have.get(rid)
            if (seen_row is None and rid.split("/turn")[0] in samples) or (
                    seen_row is not None and (seen_row["prompt_ids"], seen_row["output_ids"])
                    != (rollout["prompt_ids"], rollout["output_ids"])):
                raise BadInput(f"{where}: the train dump's loss mask splits sample {rid.split('/turn')[0]} "
                               "into other turns than the rollout dump's", field="loss_masks", step=step,
                               request_id=rid)
            if seen_row is None:
                writes.append((where, "rollouts", rollout))
            writes.append((where, "trainer", trainer))
    config = {"imported_from": {"kind": "slime", "src": str(src)}, **(run_config or {})}
    return _write(dest, config, writes, stats)


def _write(dest: str | Path, config: dict, writes: list[tuple[str, str, dict]], stats: ImportStats) -> ImportStats:
    """Write converted rows into a new recording: all of them, or (on a refused row) none.

    The recorder runs strict, so a row it refuses raises at once; the error is re-raised
    naming the source file and row, and the half-written recording is removed.
    """
    import shutil

    from replay.record.recorder import Recorder

    dest = Path(dest)
    existed = dest.exists()
    try:
        with Recorder(dest, run_config=config, strict=True) as rec:
            for where, table, row in writes:
                try:
                    (rec.rollout if table == "rollouts" else rec.trainer)(**row)
                except BadInput as e:
                    raise BadInput(f"{where}: {e.msg}", field=e.field, step=e.step,
                                   request_id=e.request_id) from None
                if table == "rollouts":
                    stats.rollouts += 1
                else:
                    stats.trainer += 1
                stats.steps.add(row["step"])
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return stats


# ---------------------------------------------------------------------- jsonl, parquet


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BadInput(f"{_where(path, i)}: not valid JSON ({e})", field="line") from None
            if not isinstance(row, dict):
                raise BadInput(f"{_where(path, i)}: a line must be a JSON object", field="line")
            yield i, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise BadInput(f"{path}: not a parquet file ({e})", field="file") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield i, row
            i += 1


def _files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in suffixes)
        if files:
            return files
        raise BadInput(f"{src}: no {' or '.join(suffixes)} files found", field="src")
    raise BadInput(f"{src}: no such file or folder", field="src")


def table_rows(row: dict, i: int, path: Path, cols: ColumnMap) -> tuple[dict, dict | None]:
    """(rollout kwargs, trainer kwargs or None) of one source row."""
    where = _where(path, i)

    def get(name: str) -> Any:
        col = getattr(cols, name)
        return row.get(col) if col else None

    step = _scalar(get("step"), where, cols.step, int)
    if step is None:
        raise BadInput(f"{where}: field {cols.step!r} (the step) is missing", field=cols.step)
    rid = get("request_id")
    rid = str(i) if rid is None else str(rid)
    output = _ints(get("output_ids"), where, cols.output_ids)
    n = len(output)
    prompt = [] if get("prompt_ids") is None else _ints(get("prompt_ids"), where, cols.prompt_ids)
    rollout = dict(step=step, request_id=rid, group_id=None if get("group_id") is None else str(get("group_id")),
                   prompt_ids=prompt, output_ids=output,
                   logprobs=_floats(get("logprobs"), where, cols.logprobs, n),
                   token_versions=_versions(get("version"), n, where, cols.version),
                   reward=_scalar(get("reward"), where, cols.reward),
                   finish_reason=None if get("finish_reason") is None else str(get("finish_reason")),
                   temperature=_scalar(get("temperature"), where, cols.temperature),
                   logprobs_mode=None if get("logprobs_mode") is None else str(get("logprobs_mode")))
    trainer = None
    if get("trainer_logprobs") is not None:
        trainer = dict(step=step, request_id=rid,
                       weight_version=_scalar(get("trainer_version"), where, cols.trainer_version, int),
                       logprobs=_floats(get("trainer_logprobs"), where, cols.trainer_logprobs, n),
                       entropy=None if get("entropy") is None else _floats(get("entropy"), where, cols.entropy, n),
                       advantage=_scalar(get("advantage"), where, cols.advantage))
    return rollout, trainer


def import_table(kind: str, src: str | Path, dest: str | Path, *, columns: ColumnMap | None = None,
                 run_config: dict | None = None) -> ImportStats:
    """Import jsonl or parquet files (one row per sequence) into a new recording at ``dest``."""
    if kind not in ("jsonl", "parquet"):
        raise BadInput(f"kind must be jsonl or parquet, not {kind!r}", field="kind")
    cols = columns or ColumnMap()
    reader = _jsonl_rows if kind == "jsonl" else _parquet_rows
    files = _files(Path(src), (".jsonl", ".json", ".ndjson") if kind == "jsonl" else (".parquet", ".pq"))
    stats = ImportStats()
    # Convert every row before the recording is created: a bad file leaves nothing half-written.
    rows = [(_where(path, i), *table_rows(row, i, path, cols)) for path in files for i, row in reader(path)]
    stats.files = len(files)
    writes: list[tuple[str, str, dict]] = []
    for where, rollout, trainer in rows:
        writes.append((where, "rollouts", rollout))
        if trainer is not None:
            writes.append((where, "trainer", trainer))
    config = {"imported_from": {"kind": kind, "src": str(src)}, **(run_config or {})}
    return _write(dest, config, writes, stats)


def import_any(kind: str, src: str | Path, dest: str | Path, **kw: Any) -> ImportStats:
    """Dispatch on ``kind`` (one of :data:`KINDS`)."""
    if kind == "slime":
        return import_slime(src, dest, **kw)
    if kind in ("jsonl", "parquet"):
        return import_table(kind, src, dest, **kw)
    raise BadInput(f"unknown import kind {kind!r}; kinds: {', '.join(KINDS)}", field="kind")


def column_fields() -> Iterable[str]:
    return [f.name for f in fields(ColumnMap)]
