"""The recorder's writer thread (its segment files: :mod:`replay.store.segments`).

Callers put :class:`~replay.record.convert.Item` s on a bounded queue (a full queue blocks
the caller: back-pressure). One thread drains it, gathers rows per table, and writes
a table's batch when it holds ``batch_rows`` rows or ``batch_tokens`` tokens, when
its oldest row is ``flush_interval_s`` old, on :meth:`Writer.flush` and on close.

Each (table, rank) has one open segment ``part-NNNNN.arrows``: an Arrow IPC stream
with zstd buffers, flushed to the OS after every batch, so a ``kill -9`` loses only
rows not yet written. Past ``segment_bytes`` (in the writer thread, which pauses
for it) and on close (all segments at once) the segment becomes an Arrow IPC file
``part-NNNNN.arrow``: the stream's bytes plus a footer, under a temporary name,
fsync, ``os.replace``, then the stream is deleted. A crash in between leaves the
stream, or the file and the stream (readers prefer the file). Closed segments go to
the manifest with their rows, bytes and sha256 (``on_segment`` during the run,
:attr:`Writer.final_segments` on close).

A failure in the thread (disk full, permission denied, a bug) is logged, counted and
kept in :attr:`Writer.error`; the thread goes on with what it can and never touches
segments already closed.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from replay.record import convert as cv
from replay.store.segments import Segment, next_part, remove_stream, stream_to_file
from replay.schema import SCHEMAS, segment_path
from replay.record.validate import LIST_COLUMNS, StepTracker, row_json, scalar

log = logging.getLogger("replay.record.recorder")


@dataclass
class WriterConfig:
    """How the writer thread batches, bounds and rotates."""

    max_queue_rows: int = 4096            # calls waiting in the queue before callers block
    max_queue_bytes: int = 256 << 20      # estimated bytes waiting before callers block
    batch_rows: int = 256                 # write a table's batch at this many rows ...
    batch_tokens: int = 131072            # ... or at this many tokens (or top-k positions)
    flush_interval_s: float = 1.0         # ... or when its oldest row waited this long
    segment_bytes: int = 8 << 20          # rotate a segment (stream -> file) past this size: smaller
                                          # files let a step filter skip more of a big recording


# ---------------------------------------------------------------- the queue

class BoundedQueue:
    """FIFO of many producers and one consumer, bounded by item count and estimated bytes.

    ``put`` on a full queue waits until the consumer drains it (an empty queue takes
    any item, however large). The common path takes no lock the consumer holds: a
    deque append and a wake-up only when the consumer sleeps, so a producer never
    waits on the consumer's thread unless the queue is full.
    """

    def __init__(self, max_items: int, max_bytes: int, wake_items: int = 1, wake_bytes: int = 0):
        self._items: collections.deque = collections.deque()
        self._max_items, self._max_bytes = max_items, max_bytes
        # the consumer sleeps until this many items / bytes are queued (or an urgent put,
        # or its own timeout): fewer wake-ups, bigger batches, less GIL traffic
        self._wake_items = max(1, min(wake_items, max_items))
        self._wake_bytes = min(wake_bytes, max_bytes)
        self._bytes_in = 0                 # bytes put so far (producers)
        self._bytes_out = 0                # bytes taken so far (consumer)
        self._count_lock = threading.Lock()  # producers only: keeps _bytes_in exact
        self._wake = threading.Event()     # set to wake the sleeping consumer
        self._sleeping = False
        self._space = threading.Condition()  # producers wait here while the queue is full
        self._blocked = 0
        self.closed = False                # set when the consumer is gone

    def _full(self) -> bool:
        return bool(self._items) and (len(self._items) >= self._max_items
                                      or self._bytes_in - self._bytes_out >= self._max_bytes)

    def put(self, item: Any, nbytes: int = 0, urgent: bool = False) -> bool:
        """Queue ``item``; False (and nothing queued) once the consumer is gone."""
        if self._full():
            with self._space:
                self._blocked += 1
                try:
                    while self._full() and not self.closed:
                        self._space.wait(0.05)  # the timeout guards against a missed notify
                finally:
                    self._blocked -= 1
        if self.closed:
            return False
        with self._count_lock:
            self._bytes_in += nbytes
            self._items.append((item, nbytes))
        if self._sleeping and (urgent or len(self._items) >= self._wake_items
                               or self._bytes_in - self._bytes_out >= self._wake_bytes):
            self._wake.set()
        return True

    def close(self) -> None:
        """The consumer is gone: wake and refuse every producer from now on."""
        self.closed = True
        with self._space:
            self._space.notify_all()

    def get_all(self, timeout: float | None) -> list:
        """Everything queued, waiting up to ``timeout`` seconds (None: forever) for a first item."""
        if not self._items:
            self._sleeping = True
            self._wake.clear()
            if not self._items:
                self._wake.wait(timeout)
            self._sleeping = False
        pop = self._items.popleft
        pairs = [pop() for _ in range(len(self._items))]  # later puts wait for the next call
        self._bytes_out += sum(n for _, n in pairs)
        out = [item for item, _ in pairs]
        if self._blocked:
            with self._space:
                self._space.notify_all()
        return out

    def __len__(self) -> int:
        return len(self._items)


class _Control:
    """A flush or close request: done once everything queued before it is written."""

    def __init__(self, kind: str):
        self.kind = kind
        self.done = threading.Event()


# ---------------------------------------------------------------- the thread

class Writer:
    """Owns the segments of one rank; everything but :meth:`submit`/:meth:`flush`/:meth:`close`
    runs on its own thread."""

    def __init__(self, root: Path, rank: int, config: WriterConfig,
                 on_segment: Callable[[str, dict], None], *, append: bool = False):
        self.root, self.rank, self.config = Path(root), rank, config
        self.on_segment = on_segment
        self.tracker = StepTracker()  # order checks of rows validated here (lenient mode)
        self.queue = BoundedQueue(config.max_queue_rows, config.max_queue_bytes,
                                  wake_items=config.batch_rows, wake_bytes=config.max_queue_bytes // 4)
        self._pending: dict[str, list[tuple]] = collections.defaultdict(list)
        self._pending_tokens: dict[str, int] = collections.defaultdict(int)
        self._oldest: dict[str, int] = {}  # time_ns of the oldest pending row per table
        self._segments: dict[str, Segment] = {}
        self._torn: list[tuple[str, Segment]] = []  # segments given up after a write error
        self.final_segments: list[tuple[str, dict]] = []  # (table, entry) of segments closed on close
        self._parts = {t: next_part(self.root, t, rank) if append else 0 for t in SCHEMAS}
        self.rows: collections.Counter[str] = collections.Counter()    # rows written per table
        self.tokens: collections.Counter[str] = collections.Counter()  # tokens written per table
        self.bytes_closed = 0                 # bytes of closed segment files
        self.rejects = 0                      # rows refused by validation
        self.dropped = 0                      # rows lost to errors of this thread
        self.errors = 0                       # errors of this thread
        self.error: BaseException | None = None  # the first one
        self.cpu_s = 0.0                      # CPU time of this thread so far
        self.dead = False                     # the thread ended on an unexpected error
        self._warned: set = set()
        self._thread = threading.Thread(target=self._run, name=f"replay-writer-{rank}", daemon=True)
        self._thread.start()

    # ---- caller side
    def submit(self, item: tuple, nbytes: int) -> None:
        if not self.queue.put(item, nbytes):  # nothing would ever drain it: the row is lost, counted
            self.dropped += 1

    def _control(self, kind: str) -> None:
        c = _Control(kind)
        if not self._thread.is_alive() or not self.queue.put(c, urgent=True):
            return
        while not c.done.wait(0.1):
            if not self._thread.is_alive():
                return

    def flush(self) -> None:
        self._control("flush")

    def close(self) -> None:
        self._control("close")
        self._thread.join()

    def pending_rows(self) -> int:
        return len(self.queue) + sum(len(v) for v in list(self._pending.values()))

    def open_bytes(self) -> int:
        total = 0
        for seg in list(self._segments.values()):
            try:
                total += seg.bytes
            except (OSError, pa.ArrowException):
                pass
        return total

    # ---- writer thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug here must not hang the callers
            self._fail(e, "the writer thread")
            self.dead = True
            self.queue.close()
            self.dropped += len(self.queue) + sum(len(v) for v in self._pending.values())
        finally:
            self.cpu_s = time.thread_time()

    def _loop(self) -> None:
        interval_ns = int(self.config.flush_interval_s * 1e9)
        while True:
            self.cpu_s = time.thread_time()
            for item in self.queue.get_all(self._next_deadline()):
                if isinstance(item, _Control):
                    self._guard(self._write_all)
                    if item.kind == "close":
                        self._guard(self._close_segments)
                        item.done.set()
                        return
                    item.done.set()
                    continue
                t = item[cv.TABLE]
                self._pending[t].append(item)
                self._pending_tokens[t] += item[cv.TOKENS]
                self._oldest.setdefault(t, item[cv.TIME_NS])
                if len(self._pending[t]) >= self.config.batch_rows or \
                        self._pending_tokens[t] >= self.config.batch_tokens:
                    self._guard(self._write_table, t)
            now = time.time_ns()
            for t, since in list(self._oldest.items()):
                if now - since >= interval_ns:
                    self._guard(self._write_table, t)

    def _next_deadline(self) -> float:
        """Seconds until the oldest pending row is due; the queue is looked at least this often."""
        if not self._oldest:
            return self.config.flush_interval_s
        due = min(self._oldest.values()) / 1e9 + self.config.flush_interval_s
        return min(self.config.flush_interval_s, max(0.0, due - time.time()))

    def _guard(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - never let the thread die: count, log, go on
            self._fail(e, f"{fn.__name__}({args[0]!r})" if args else fn.__name__)

    def _fail(self, e: BaseException, where: str) -> None:
        self.errors += 1
        if self.error is None:
            self.error = e
        key = (type(e), where)
        if key not in self._warned:
            self._warned.add(key)
            log.error("recorder (rank %d) failed in %s: %s: %s; recording goes on with what it can",
                      self.rank, where, type(e).__name__, e, exc_info=not isinstance(e, OSError))

    def _write_all(self) -> None:
        for t in list(self._pending):
            self._guard(self._write_table, t)

    def _write_table(self, table: str) -> None:
        items = self._pending.pop(table, [])
        self._pending_tokens.pop(table, None)
        self._oldest.pop(table, None)
        if not items:
            return
        schema = SCHEMAS[table]
        try:
            if table in LIST_COLUMNS:
                built = cv.build_rows(table, schema, items, self.rank, self.tracker)
            elif table == "topk":
                built = cv.build_topk(schema, items, self.rank, self.tracker)
            else:
                built = cv.build_simple(table, schema, items, self.rank)
        except Exception:
            self.dropped += len(items)
            raise
        if built.rejects:
            self._reject(built.rejects)
        if built.batch is not None:
            self._append(table, built.batch, built.tokens)
        if built.rejects and table != "rejects":
            self._write_table("rejects")

    def _reject(self, rejects: list) -> None:
        for item, p in rejects:
            self.rejects += 1
            table, row = item[cv.TABLE], cv.row_of(item)
            key = (table, p.field)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("recorder: %s row refused (field %s: %s; step=%s, request_id=%s); it goes to "
                            "the rejects table, further ones for this field are not logged",
                            table, p.field, p.reason, row.get("step"), row.get("request_id"))
            self._pending["rejects"].append(reject_item(table, row, p, item[cv.TIME_NS]))

    def _append(self, table: str, batch: pa.RecordBatch, tokens: int) -> None:
        seg = self._segments.get(table)
        try:
            if seg is None:
                part = self._parts[table]
                self._parts[table] += 1
                seg = self._segments[table] = Segment(
                    segment_path(self.root, table, self.rank, part, open_=True), SCHEMAS[table])
            seg.write(batch)
        except Exception:
            self.dropped += batch.num_rows
            if seg is not None:  # a torn stream takes no more batches: the next goes to a new part
                self._segments.pop(table, None)
                seg.abandon()
                self._torn.append((table, seg))  # its complete batches become a file on close
            raise
        self.rows[table] += batch.num_rows
        if tokens:
            self.tokens[table] += tokens
        if seg.bytes >= self.config.segment_bytes:
            self._rotate(table)

    def _rotate(self, table: str) -> None:
        seg = self._segments.pop(table)
        seg.close()
        self._finalize(table, seg)

    def _closed(self, seg: Segment) -> dict:
        """Close ``seg``'s stream into its file; the file's manifest entry (its stream stays)."""
        final = seg.path.with_suffix(".arrow")
        entry = stream_to_file(seg.path, final)
        entry["path"] = final.relative_to(self.root).as_posix()
        return entry

    def _finalize(self, table: str, seg: Segment) -> None:
        entry = self._closed(seg)
        self.bytes_closed += entry["bytes"]
        self.on_segment(table, entry)
        remove_stream(seg.path)  # only now: until the manifest lists the file, its stream is read

    def _close_segments(self) -> None:
        """Turn every open (and torn) segment into a file, several at once (their fsyncs overlap).

        The entries are kept in :attr:`final_segments` for one manifest update on close;
        the streams stay until :meth:`remove_closed_streams` (after that update).
        """
        for seg in self._segments.values():
            seg.close()
        todo = list(self._segments.items()) + self._torn
        self._segments.clear()
        self._torn = []
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(todo)), thread_name_prefix="replay-close") as pool:
            futures = [(table, pool.submit(self._closed, seg)) for table, seg in todo]
            for table, fut in futures:
                try:
                    entry = fut.result()
                except Exception as e:  # noqa: BLE001 - the stream stays for readers to salvage
                    self._fail(e, f"_finalize({table!r})")
                    continue
                self.bytes_closed += entry["bytes"]
                self.final_segments.append((table, entry))

    def remove_closed_streams(self) -> None:
        """Delete the streams of :attr:`final_segments`, once the manifest lists their files."""
        for _, entry in self.final_segments:
            remove_stream((self.root / entry["path"]).with_suffix(".arrows"))


def reject_item(table: str, row: dict, problem: Any, time_ns: int) -> tuple:
    """The ``rejects`` row for a refused ``row`` of ``table``: everything kept as JSON."""
    rid = row.get("request_id")
    return cv.Item("rejects", {"table": table, "step": _int_or_none(row.get("step")),
                               "request_id": rid if isinstance(rid, str) else None,
                               "field": problem.field, "reason": problem.reason,
                               "row": row_json(row)}, time_ns, True)


def _int_or_none(x: Any) -> int | None:
    x = scalar(x)
    return x if isinstance(x, int) and not isinstance(x, bool) else None
