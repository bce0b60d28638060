"""Recorder: the write path used inside training processes.

::

    from replay import Recorder
    with Recorder("recordings/run-1", run_config={...}, rank=0) as rec:
        rec.model("checkpoints/base")   # config, tokenizer, weights as version 0: a copy replays anywhere
        rec.event("weights_update_start", step=3, weight_version=4, mode="concurrent")
        rec.rollout(step=3, request_id="r17", prompt_ids=p, output_ids=o, logprobs=lp, ...)
        rec.trainer(step=3, request_id="r17", weight_version=4, logprobs=tlp, advantage=0.3)
        rec.topk(step=3, request_id="r17", source="engine", ids=ids, logprobs=lps)
        rec.metrics(step=3, values={"clip_rate": 0.01})
        rec.weights(version=4, step=3, state_dict=model.state_dict())
        rec.flush()   # everything so far is in the segment files (survives kill -9)

Each call copies what the caller may reuse and queues it: a list of numbers becomes
a numpy array, a numpy array is copied, a CPU tensor goes to numpy, a CUDA tensor is
copied asynchronously to pinned memory (the writer waits on a CUDA event; the caller
never synchronises the device). A background thread batches rows per table and
writes Arrow segments (see :mod:`replay.record.writer`), at the latest ``flush_interval_s``
after a call. Back-pressure: when the queue holds ``max_queue_rows`` calls or
``max_queue_bytes`` bytes, a call blocks until the writer catches up, so memory stays
bounded. All methods are safe to call from several threads. ``weights()`` is
synchronous (it returns once the blob is on disk). The recorder is not fork-safe:
open it in the process that uses it; one left open is closed at interpreter exit.

Bad input: with ``strict=False`` (default) a bad row goes to the ``rejects`` table and
is logged once per (table, field); validation runs vectorised per batch in the
writer thread, so the caller pays only for the copy. With ``strict=True`` every call
is validated on the caller's thread (a CUDA value is waited for) and a bad row raises
:class:`~replay.errors.BadInput` naming field, step and request_id. A failure of the
recorder itself (disk full, permissions, a bug) is logged and counted in
:meth:`Recorder.stats` and never raised in lenient mode; in strict mode the next call
raises :class:`~replay.errors.RecordingError`.

Ranks and reopening: each rank of a run writes its own segments into one recording
directory and holds ``rank-NNNN.lock`` while it lives. Opening a path adds the rank
to its manifest. Opening a rank the manifest already holds (complete, or left behind
by a dead writer) is an error unless ``mode="append"``, which continues that rank
with new segment numbers and event ``seq`` after the last one recorded.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from replay.record import convert as cv
from replay.record.arrays import snapshot, snapshot_scalar
from replay.record.writer import Writer, WriterConfig, reject_item
from replay.errors import BadInput, RecordingError, ReplayError
from replay.store.manifest import hold_rank_lock, host_id, new_manifest, now_iso, update_manifest, write_atomic
from replay.store.manifest import run_header
from replay.schema import RUN_FILE
from replay.record.validate import Problem, StepTracker, _plain, check_row

if TYPE_CHECKING:
    from replay.store.weights import WeightStore

log = logging.getLogger("replay.record.recorder")
RecorderConfig = WriterConfig  # batching, queue bounds and segment size of a Recorder
MODES = ("new", "append")


def _nbytes(x: Any) -> int:
    """Rough size of a queued value, for the queue's byte bound."""
    if type(x) is list:
        return 32 * len(x)
    n = getattr(x, "nbytes", None)
    return n if type(n) is int else 64


def _length(x: Any) -> int:
    try:
        return len(x)
    except TypeError:
        return 0


_OPEN: "weakref.WeakSet[Recorder]" = weakref.WeakSet()  # closed at interpreter exit


_CRASH: list[BaseException] = []  # the exception that is ending the interpreter, if one is


def _note_crash(hook):
    def excepthook(exc_type, exc, tb):
        _CRASH.append(exc)
        hook(exc_type, exc, tb)
    excepthook.replay_wrapped = True
    return excepthook


@atexit.register
def _close_open_recorders() -> None:
    """Close what is still open at exit: after an uncaught exception the ranks are marked
    ``salvaged`` with the error (the run did not finish), else ``complete``."""
    for rec in list(_OPEN):
        rec.close(error=_CRASH[-1] if _CRASH else None)


def _guarded(fn: Callable) -> Callable:
    """Lenient mode: an unexpected failure inside a call is logged and counted, never raised."""
    @functools.wraps(fn)
    def call(self: "Recorder", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except ReplayError:
            raise  # refusals in strict mode, a closed recorder
        except Exception as e:  # noqa: BLE001
            if self.strict:
                raise RecordingError(f"{fn.__name__}() failed: {type(e).__name__}: {e}",
                                     "recording failed") from e
            with self._count_lock:
                self._caller_errors += 1
            log.error("recorder: %s() failed: %s: %s; the run goes on", fn.__name__, type(e).__name__, e,
                      exc_info=True)
            return None
    return call


def _last_event_seq(root: Path, rank: int) -> int:
    """The largest ``seq`` in the event segments of ``rank`` (-1 if none): where a crashed rank stopped."""
    from replay.store.segments import read_file, read_stream, scan_parts

    best = -1
    for p in scan_parts(root, tables=("events",))["events"]:
        if p.rank != rank:
            continue
        try:
            # the closed file when there is one, else what the stream holds up to a torn tail
            batches = read_file(p.file, hint=False)[1] if p.file is not None else read_stream(p.stream).batches
        except (ReplayError, OSError):
            continue
        for b in batches:
            if b.num_rows:
                best = max(best, max(b.column("seq").to_pylist()))
    return best


ROLLOUT_STEPS_KEPT = 1 << 20   # request ids whose rollout step a recorder remembers for the trainer's rows


class Recorder:
    """Records one rank of an RL run into the recording directory ``path``."""

    def __init__(self, path: str | os.PathLike, run_config: dict | None = None, *, rank: int = 0,
                 strict: bool = False, run_id: str | None = None, mode: str = "new",
                 config: WriterConfig | None = None, **options: Any):
        if mode not in MODES:
            raise BadInput(f"mode must be one of {', '.join(MODES)}, got {mode!r}", field="mode")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise BadInput(f"rank must be an int >= 0, got {rank!r}", field="rank")
        if run_config is not None and not isinstance(run_config, dict):
            raise BadInput(f"run_config must be a dict, got {type(run_config).__name__}", field="run_config")
        unknown = set(options) - {f.name for f in dataclasses.fields(WriterConfig)}
        if unknown:  # Recorder(..., max_queue_rows=..., segment_bytes=...) set WriterConfig fields
            raise TypeError(f"Recorder() got unexpected keyword arguments {sorted(unknown)}")
        cfg = dataclasses.replace(config or WriterConfig(), **options)
        self.path = Path(path)
        self.rank = rank
        self.strict = strict
        self.config = cfg
        self._status_before: str | None = None  # the rank's status before this open (append)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = hold_rank_lock(self.path, rank)
        except OSError as e:
            raise RecordingError(f"cannot record into {self.path}: {e}", "cannot record") from e
        try:
            man = update_manifest(self.path, self._open_entry(mode),
                                  create=new_manifest(run_id or self.path.resolve().name,
                                                     _plain(run_config or {})))  # numpy, paths: JSON
        except BaseException as e:
            os.close(self._lock_fd)
            if isinstance(e, OSError):
                raise RecordingError(f"cannot record into {self.path}: {e}", "cannot record") from e
            raise
        self.run_id: str = man["run_id"]
        self._write_run_file(man)
        self._base_counts = dict(man["ranks"][str(rank)].get("counts", {}))
        self._lock = threading.Lock()          # seq of events, strict checks, close
        entry = man["ranks"][str(rank)]
        seq = entry.get("next_seq") if self._status_before == "complete" else None
        if seq is None:  # a new rank, or one whose writer died: continue after its last event
            seq = _last_event_seq(self.path, rank) + 1
        self._seq: int = seq
        self._tracker = StepTracker()          # order checks on the caller (strict mode)
        self._store: WeightStore | None = None  # made on first weights()
        self._weights_last: str | None = None  # sha256 of the last version stored
        self._weights_version: dict[str, int] = {}  # sha256 -> version, for base_version
        # request_id -> step of its rollout, None when rolled out at several (the latest ROLLOUT_STEPS_KEPT),
        # so the trainer's rows join their rollouts whatever step counter the trainer keeps (see trainer())
        self._rollout_step: dict[str, int | None] = {}
        self.trainer_rows_moved = 0
        self._count_lock = threading.Lock()    # the counters below, from several threads
        self._submitted: dict[str, int] = {}
        self._caller_errors = 0
        self._caller_rejects = 0
        self._reported_error = False
        self._closed = False
        self._writer = Writer(self.path, rank, cfg, self._on_segment, append=(mode == "append"))
        _OPEN.add(self)
        if not getattr(sys.excepthook, "replay_wrapped", False):
            sys.excepthook = _note_crash(sys.excepthook)

    # ---------------------------------------------------------------- manifest
    def _open_entry(self, mode: str):
        key, rank = str(self.rank), self.rank

        def change(man: dict) -> None:
            entry = man["ranks"].get(key)
            if entry is not None and mode != "append":
                raise RecordingError(
                    f"rank {rank} of {self.path} was already recorded (status {entry.get('status')!r}); "
                    "open it with mode='append' to continue it, or record into a new path",
                    "rank exists")
            if entry is None:
                entry = man["ranks"][key] = {"segments": {}, "counts": {}, "rejects": 0,
                                             "started_at": now_iso()}
            self._status_before = entry.get("status")
            entry.update(status="recording", pid=os.getpid(), host=host_id(), closed_at=None, strict=self.strict)
        return change

    def _write_run_file(self, man: dict) -> None:
        """The run's header beside the manifest, once: what a rebuilt manifest cannot recover."""
        path = self.path / RUN_FILE
        head = {k: man.get(k) for k in ("schema_version", "run_id", "created_at", "run_config")}
        old = run_header(self.path)
        if old is not None and (old.get("run_id"), old.get("created_at")) == (head["run_id"], head["created_at"]):
            return
        try:
            write_atomic(path, json.dumps(head, indent=1, sort_keys=True).encode())
        except OSError as e:
            if old is not None:   # a stale header of another run must not outlive this one
                try:
                    path.unlink()
                except OSError:
                    pass
            if self.strict:
                os.close(self._lock_fd)   # this rank is not held: it can be opened again
                raise RecordingError(f"cannot write {path}: {e}", "cannot record") from e
            log.warning("recorder: cannot write %s (%s); the manifest still holds the run config", path, e)

    def _on_segment(self, table: str, seg: dict) -> None:
        def change(man: dict) -> None:
            man["ranks"][str(self.rank)].setdefault("segments", {}).setdefault(table, []).append(seg)
        update_manifest(self.path, change)

    # ---------------------------------------------------------------- plumbing
    def _check_open(self) -> None:
        if self._closed:
            raise RecordingError(f"the recorder of {self.path} (rank {self.rank}) is closed",
                                 "recorder closed")
        if self.strict and self._writer.error is not None and not self._reported_error:
            self._reported_error = True
            e = self._writer.error
            raise RecordingError(f"the recorder's writer failed: {type(e).__name__}: {e}; "
                                 f"see stats() for what was lost", "recording failed") from e

    def _submit(self, table: str, row: dict, tokens: int = 0, nbytes: int = 256) -> None:
        self._check_open()
        if self.strict:
            with self._lock:
                p = check_row(table, row, self._tracker)
            if p is not None:
                raise BadInput(f"{table} row refused: {p.reason}", field=p.field,
                               step=row.get("step") if isinstance(row.get("step"), int) else None,
                               request_id=row.get("request_id") if isinstance(row.get("request_id"), str) else None)
        with self._count_lock:
            self._submitted[table] = self._submitted.get(table, 0) + 1
        self._writer.submit(cv.Item(table, row, time.time_ns(), self.strict, tokens), nbytes)

    # ---------------------------------------------------------------- public API
    @_guarded
    @contextlib.contextmanager
    def step(self, step: int, *, weight_version: int | None = None, **detail: Any):
        """``with rec.step(k):`` around one training step: ``step_start`` (with the version
        serving it, if given) on entry, ``step_end`` when the body finishes. A body that raises
        leaves the step without its end: a replay then knows the step may be partial."""
        self.event("step_start", step=step, weight_version=weight_version, **detail)
        yield self
        self.event("step_end", step=step)

    def event(self, kind: str, *, step: int | None = None, weight_version: int | None = None,
              request_id: str | None = None, **detail: Any) -> None:
        """One event; ``detail`` keywords are stored as a JSON object. ``seq`` orders events of this rank."""
        self._check_open()
        text = json.dumps(_plain(detail), allow_nan=False, sort_keys=True) if detail else None
        row = {"kind": kind, "step": step, "weight_version": weight_version,
               "request_id": request_id, "detail": text}
        if self.strict:
            p = check_row("events", row, self._tracker)
            if p is not None:
                raise BadInput(f"events row refused: {p.reason}", field=p.field,
                               step=step if isinstance(step, int) else None,
                               request_id=request_id if isinstance(request_id, str) else None)
        with self._lock:  # seq, time and queue order agree across threads
            row["seq"] = self._seq
            self._seq += 1
            self._writer.submit(cv.Item("events", row, time.time_ns(), self.strict), 256)
        with self._count_lock:
            self._submitted["events"] = self._submitted.get("events", 0) + 1

    @_guarded
    def rollout(self, *, step: int | None = None, request_id: str | None = None, prompt_ids: Any = None,
                output_ids: Any = None, logprobs: Any = None, group_id: str | None = None,
                token_versions: Any = None, reward: float | None = None, finish_reason: str | None = None,
                temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None, logprobs_mode: str | None = None, engine: str | None = None,
                engine_config: str | None = None, num_cached_tokens: int | None = None) -> None:
        """One generated sequence: prompt and output token ids, engine logprob and weight version per token."""
        snap, num = snapshot, snapshot_scalar
        row = {"step": step, "request_id": request_id, "group_id": group_id,
               "prompt_ids": snap(prompt_ids), "output_ids": snap(output_ids), "logprobs": snap(logprobs),
               "token_versions": snap(token_versions), "reward": num(reward), "finish_reason": finish_reason,
               "temperature": num(temperature), "top_p": num(top_p), "top_k": top_k, "seed": seed,
               "logprobs_mode": logprobs_mode, "engine": engine, "engine_config": engine_config,
               "num_cached_tokens": num_cached_tokens}
        n = _length(output_ids)
        self._submit("rollouts", row, n, 256 + _nbytes(row["prompt_ids"]) + 3 * _nbytes(row["output_ids"]))
        if isinstance(request_id, str) and isinstance(step, int):
            seen = self._rollout_step
            before = seen.get(request_id, step)
            seen[request_id] = step if before == step else None   # None: rolled out at several steps
            if len(seen) > ROLLOUT_STEPS_KEPT:   # rare: forget the oldest, one thread at a time
                with self._count_lock:
                    while len(seen) > ROLLOUT_STEPS_KEPT:
                        seen.pop(next(iter(seen)), None)

    def _rollouts_step(self, step: Any, request_id: Any, *, count: bool) -> Any:
        """The one step this recorder wrote ``request_id``'s rollout at, where ``step`` differs
        from it; ``step`` itself when there is none, or several (a request id reused)."""
        at = self._rollout_step.get(request_id) if isinstance(request_id, str) else None
        if at is None or at == step:
            return step
        if count:
            with self._count_lock:
                if not self.trainer_rows_moved:
                    log.info("recorder: trainer rows of request %s given step %s go to its rollout's step %s "
                             "(the trainer counts its own steps); said once", request_id, step, at)
                self.trainer_rows_moved += 1
        return at

    @_guarded
    def trainer(self, *, step: int | None = None, request_id: str | None = None, logprobs: Any = None,
                weight_version: int | None = None, entropy: Any = None, advantage: float | None = None) -> None:
        """One sequence as the trainer scored it: its logprob (and entropy) per output token.

        ``step`` is its rollout's step. When this recorder wrote the rollout of ``request_id``
        at one other step (a one-step-off trainer counting its own steps), the row goes to the
        rollout's step, so it joins its rollout (counted in ``trainer_rows_moved``). Rows of a
        request id rolled out at several steps, and rows written by another process, keep the
        step given."""
        step = self._rollouts_step(step, request_id, count=True)
        row = {"step": step, "request_id": request_id, "weight_version": weight_version,
               "logprobs": snapshot(logprobs), "entropy": snapshot(entropy),
               "advantage": snapshot_scalar(advantage)}
        self._submit("trainer", row, _length(logprobs), 256 + 2 * _nbytes(row["logprobs"]))

    @_guarded
    def topk(self, *, step: int | None = None, request_id: str | None = None, source: str | None = None,
             ids: Any = None, logprobs: Any = None, positions: Any = None) -> None:
        """Top-k alternatives of a sequence: ``ids`` and ``logprobs`` of shape [n_tokens, k]
        at ``positions`` (default 0..n_tokens-1). A trainer's (``source="trainer"``) go to the
        rollout's step, as in :meth:`trainer`."""
        if source == "trainer":
            step = self._rollouts_step(step, request_id, count=False)
        row = {"step": step, "request_id": request_id, "source": source, "ids": snapshot(ids),
               "logprobs": snapshot(logprobs), "positions": snapshot(positions)}
        self._submit("topk", row, _length(ids), 256 + 2 * _nbytes(row["ids"]))

    @_guarded
    def replay(self, *, step: int | None = None, request_id: str | None = None, engine_config: str | None = None,
               mode: str | None = None, replay_id: str | None = None, logprobs: Any = None,
               output_ids: Any = None, first_diff: int | None = None, config: str | None = None,
               engine: str | None = None) -> None:
        """One replayed sequence (the replayer's output): replayed logprob per token under the
        engine config ``engine_config``; ``-inf`` marks a forced token outside that config's support."""
        row = {"step": step, "request_id": request_id, "engine_config": engine_config, "config": config,
               "engine": engine, "mode": mode, "replay_id": replay_id, "logprobs": snapshot(logprobs),
               "output_ids": snapshot(output_ids), "first_diff": first_diff}
        self._submit("replays", row, _length(logprobs), 256 + 2 * _nbytes(row["logprobs"]))

    @_guarded
    def reference(self, **row: Any) -> None:
        """One sequence's reference scores (written by :mod:`replay.diagnose.reference`);
        the fields are the ``reference`` table's columns."""
        row = {k: snapshot(v) for k, v in row.items()}
        self._submit("reference", row, _length(row.get("lp_sampler")), 256 + 6 * _nbytes(row.get("lp_sampler")))

    @_guarded
    def metrics(self, *, step: int | None = None, values: dict | None = None, source: str | None = None) -> None:
        """Named scalar metrics of a step, one row each."""
        vals = {k: snapshot_scalar(v) for k, v in values.items()} if isinstance(values, dict) else values
        self._submit("metrics", {"step": step, "values": vals, "source": source})

    @_guarded
    def weights(self, *, version: int | None = None, step: int | None = None, state_dict: Any = None,
                sha256: str | None = None, path: str | None = None, delta: bool = False) -> dict | None:
        """Record weight version ``version``.

        With ``state_dict`` the weights are stored in the recording's weight store
        (synchronously: the call returns once the blob is on disk), as an XOR delta
        against the previous version this recorder stored when ``delta=True``. With
        ``sha256`` (and optionally ``path`` of an external checkpoint) only the hash is
        kept. Returns the weight store's entry, or None for a hash-only record or a
        failure in lenient mode.
        """
        self._check_open()
        info = None
        if state_dict is not None:
            try:
                info = self._put_weights(state_dict, delta)
            except BadInput as e:
                row = {"version": version, "step": step, "sha256": None, "path": path}
                self._refuse("weights", row, "state_dict", e.msg)
                return None
            sha256 = info["sha256"]
        row = {"version": version, "step": step, "sha256": sha256, "path": path,
               "nbytes": info["nbytes"] if info else None, "blob": info["blob"] if info else None,
               "base_version": self._weights_version.get(info["base_sha256"]) if info and info["base_sha256"]
               else None}
        if info is None and sha256 is None:
            self._refuse("weights", row, "state_dict", "give state_dict, or sha256 of an external checkpoint")
            return None
        self._submit("weights", row)
        if info is not None and isinstance(version, int):
            self._weights_version.setdefault(info["sha256"], version)
        return info

    @_guarded
    def model(self, path: str | os.PathLike, *, version: int = 0, step: int | None = None,
              state_dict: Any = None, store_weights: bool = True) -> dict | None:
        """Put the checkpoint at ``path`` in the recording, so a copy of it replays anywhere:
        its config and tokenizer files into ``model/``, and weight ``version`` (default 0) in
        the weight store: ``state_dict`` when given (the policy as it starts, if it is not the
        checkpoint's own weights), else the checkpoint's weights. ``store_weights=False``
        names the checkpoint's weight files where they are instead (a replay then needs that
        path, or ``--model``). One model per recording; call it from one rank. Returns the
        model list (:mod:`replay.store.model`), or None for a failure in lenient mode."""
        from replay.store.model import check_no_model, checkpoint_state_dict, write_model

        self._check_open()
        info = None
        try:
            check_no_model(self.path)   # before any weights are stored for it
            if store_weights:
                sd = state_dict if state_dict is not None else checkpoint_state_dict(path)
                info = self.weights(version=version, step=step, state_dict=sd)
                if info is None:
                    return None
            return write_model(self.path, path, weights_sha256=info["sha256"] if info else None,
                               weights_version=version if store_weights else None, store_weights=store_weights)
        except BadInput as e:
            self._refuse("weights", {"version": version, "step": step, "sha256": None, "path": str(path)},
                         e.field or "model", e.msg)
            return None

    def _put_weights(self, state_dict: Any, delta: bool) -> dict:
        from replay.store.weights import WeightStore

        with self._lock:
            if self._store is None:
                self._store = WeightStore(self.path)
            base = self._weights_last if delta else None
        info = self._store.put(state_dict, base_sha256=base)
        self._weights_last = info["sha256"]
        return info

    def _refuse(self, table: str, row: dict, field: str, reason: str) -> None:
        """A row refused on the caller's thread: raise (strict) or send it to rejects."""
        if self.strict:
            raise BadInput(f"{table} row refused: {reason}", field=field,
                           step=row.get("step") if isinstance(row.get("step"), int) else None)
        with self._count_lock:
            self._caller_rejects += 1
        self._writer.submit(reject_item(table, row, Problem(field, reason), time.time_ns()), 1024)
        return None

    @_guarded
    def flush(self) -> None:
        """Block until everything submitted so far is written to the segment files."""
        self._check_open()
        self._writer.flush()

    def stats(self) -> dict:
        """Rows and tokens written per table, rejects, errors, queue depth and bytes on disk."""
        w = self._writer
        return {"rows": dict(w.rows), "tokens": dict(w.tokens), "submitted": dict(self._submitted),
                "rejects": w.rejects + self._caller_rejects, "errors": w.errors + self._caller_errors,
                "dropped_rows": w.dropped,
                "queue_depth": w.pending_rows(), "bytes": w.bytes_closed + w.open_bytes(),
                "writer_cpu_s": round(w.cpu_s, 3), "trainer_rows_moved": self.trainer_rows_moved,
                "closed": self._closed}

    # ---------------------------------------------------------------- closing
    def close(self, *, error: BaseException | None = None) -> None:
        """Write everything, turn every segment into an Arrow file, and mark the rank
        ``complete``, or, when the run ends on ``error`` (an exception out of the ``with``
        block, or an uncaught one at interpreter exit), ``salvaged`` with the error named:
        every row is kept, but the run did not finish. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._writer.close()
            w = self._writer

            def change(man: dict) -> None:
                entry = man["ranks"][str(self.rank)]
                counts = dict(self._base_counts)
                for t, n in w.rows.items():
                    counts[t] = counts.get(t, 0) + n
                segs = entry.setdefault("segments", {})
                for table, seg in w.final_segments:
                    segs.setdefault(table, []).append(seg)
                entry.update(status="complete", closed_at=now_iso(), counts=counts,
                             rejects=counts.get("rejects", 0), errors=entry.get("errors", 0) + w.errors,
                             next_seq=self._seq)
                if error is not None:
                    entry.update(status="salvaged", salvaged_at=now_iso(),
                                 crashed=f"{type(error).__name__}: {' '.join(str(error).split())[:500]}")
            update_manifest(self.path, change)
            w.remove_closed_streams()
        except Exception as e:  # noqa: BLE001
            if self.strict:
                raise RecordingError(f"closing the recording {self.path} failed: {e}", "recording failed") from e
            log.error("recorder: closing %s failed: %s; segments already written are kept", self.path, e)
        finally:
            os.close(self._lock_fd)
            _OPEN.discard(self)
        if self.strict and self._writer.error is not None and not self._reported_error:
            self._reported_error = True
            raise RecordingError(f"the recorder's writer failed: {self._writer.error}; see stats()",
                                 "recording failed") from self._writer.error

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is on its way: keep the data, do not mask it
            ended_well = isinstance(exc, SystemExit) and exc.code in (None, 0)
            self.close(error=None if ended_well or not isinstance(exc, BaseException) else exc)
        except ReplayError as e:
            log.error("recorder: %s", e)
