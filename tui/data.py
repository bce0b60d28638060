"""The TUI's data layer: open a run and its reference, query them.

Plain Python, no Textual: every function here runs in a worker thread and returns
small dataclasses the screens render. One :class:`Workspace` holds one DuckDB
connection over the run (schema ``run``) and its reference (schema ``ref``); each
call takes its own cursor (one DuckDB cursor per thread) and closes it.
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow.compute as pc

from replay.errors import RecordingError, ReplayError
from replay.fixes import FIX_SHORT
from replay.store.manifest import overall_status, read_manifest
from replay.models import recorded_model
from replay.read.recording import open_recording, sql_error

from tui import engine_adapter
from tui.onset import Onset, onset_by_rule
from tui.stepstats import fetch, match_trainer, sequence_stats, step_metrics

RUN, REF = "run", "ref"
STEP_CACHE = 4  # steps whose rows the step view keeps in memory
# the per-step metrics the timeline plots, in order, with their labels
PLOTTED = (("clip_rate", "clip rate"), ("kl_new_old", "kl_new_old"), ("entropy", "entropy"),
           ("reward", "reward"), ("mean_abs_log_ratio", "mean |r|"))


# ---------------------------------------------------------------- results

@dataclass
class Timeline:
    """Per-step metrics of the run (and reference), and the divergence onset."""

    run: dict[str, list]                 # column -> values, ordered by step
    ref: dict[str, list] | None          # the same for the reference, None without one
    onset: Onset                         # where the run departs from the reference
    status: str                          # the run's status (recording = live)

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.run.get("step", [])]


@dataclass
class SequenceTable:
    """The sequences of one step, worst mismatch first."""

    step: int
    columns: list[str]
    rows: list[tuple]


@dataclass
class SequenceTokens:
    """The generated tokens of one sequence with both logprobs and versions."""

    step: int
    request_id: str
    token_id: list[int]
    lp_rollout: list[float | None]
    lp_trainer: list[float | None]
    log_ratio: list[float | None]
    weight_version: list[int | None]
    trainer_version: int | None
    entropy: list[float | None]
    n_prompt: int = 0                    # prompt length
    num_cached: int | None = None        # prompt tokens served from the prefix cache
    text: list[str] | None = None        # each token as text, when the run's tokenizer is at hand
    # the decomposition of r per token (e_backend, semantics, lag, e_trainer), where the run's
    # reference is stored (replay diagnose); empty otherwise
    components: dict[str, list[float | None]] = field(default_factory=dict)

    def values(self, colour_by: str) -> list[float | None]:
        """The per-token values the token view colours by: ``r`` or a component."""
        return self.log_ratio if colour_by == "r" else self.components.get(colour_by, [None] * len(self.token_id))

    def boundaries(self) -> list[int]:
        """Positions where the weight version that produced the tokens changes."""
        v = self.weight_version
        return [i for i in range(1, len(v)) if v[i] != v[i - 1]]


@dataclass
class TokenDetail:
    """Everything recorded (and replayed) about one token."""

    step: int
    request_id: str
    pos: int
    token_id: int
    lp_rollout: float | None
    lp_trainer: float | None
    log_ratio: float | None
    weight_version: int | None
    trainer_version: int | None
    entropy: float | None
    text: str | None = None                                                      # the token as text
    replays: list[tuple[str, str, float | None]] = field(default_factory=list)  # (config, engine, lp)
    topk: dict[str, list[tuple[int, float]]] = field(default_factory=dict)       # source -> [(id, lp)]
    components: dict[str, float | None] = field(default_factory=dict)           # e_backend, ... at the token


# the columns of the tokens view the token view can colour by, after r
COLOUR_BY = ("r", "e_backend", "e_trainer", "lag", "semantics")


@dataclass
class Components:
    """Per step, the mean |.| of each part of the mismatch (from the stored reference)."""

    step: list[int]
    e_backend: list[float | None]
    e_trainer: list[float | None]
    lag: list[float | None]
    semantics: list[float | None]


def config_label(config_json: str | None, config_id: str) -> str:
    """``v0``, ``v1`` or ``v1+proc+fp32`` (the fixes' short names) for a replayed EngineConfig
    (its id when unknown)."""
    try:
        from replay.fixes import PRESETS, EngineConfig
        cfg = EngineConfig.from_dict(json.loads(config_json))
    except (ReplayError, TypeError, ValueError):
        return config_id
    for name, preset in PRESETS.items():
        if cfg == preset:
            return name
    fixes = cfg.fixes_applied()
    return "v1+" + "+".join(FIX_SHORT.get(f, f) for f in fixes) if fixes else config_id


def _col(rel: duckdb.DuckDBPyRelation) -> dict[str, list]:
    return rel.to_arrow_table().to_pydict()


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ---------------------------------------------------------------- the workspace

class Workspace:
    """A run and (optionally) its reference, open in one DuckDB connection."""

    def __init__(self, run: Path, against: Path | None = None, model: Path | None = None):
        self.run_path = Path(run)
        self.model_path = Path(model) if model is not None else None  # None: the recorded model
        self.ref_path = Path(against) if against is not None else None
        paths = [self.run_path] + ([self.ref_path] if self.ref_path else [])
        names = [RUN, REF][:len(paths)]
        self.rec = open_recording(paths, names=names)
        self._lock = threading.Lock()   # the main connection: refresh and making cursors
        self._idle = threading.Condition(self._lock)   # notified when a cursor closes
        self._cursors: set = set()      # cursors in use by worker threads
        self.generation = 0             # bumped by each refresh
        self._steps: dict = {}          # (generation, step) -> (rollouts, trainer) tables
        self._extras: dict = {}         # (generation, step, request_id) -> (replays, top-k)
        self._tokenizer = None          # the run's tokenizer (False: none found)

    @property
    def has_ref(self) -> bool:
        return self.ref_path is not None

    def close(self, wait: float = 5.0) -> None:
        """Close the connection once the cursors in use are closed: a worker's query still running
        after ``wait`` seconds is interrupted (on its own cursor, where the interrupt reaches it)."""
        with self._lock:
            if not self._idle.wait_for(lambda: not self._cursors, timeout=wait):
                for cur in list(self._cursors):
                    try:
                        cur.interrupt()
                    except duckdb.Error:
                        pass
                self._idle.wait_for(lambda: not self._cursors, timeout=wait)
            try:
                self.rec.close()
            except duckdb.Error:   # a cursor still busy: the process ends soon; do not crash on the way
                pass

    @contextlib.contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A fresh cursor for the calling thread, closed afterwards."""
        with self._lock:
            cur = self.rec.cursor()
            self._cursors.add(cur)
        try:
            yield cur
        finally:
            cur.close()
            with self._lock:
                self._cursors.discard(cur)
                self._idle.notify_all()

    def status(self) -> str:
        """The run's status now: complete, recording (live) or salvaged."""
        if self.rec.salvaged:
            return "salvaged"
        return overall_status(read_manifest(self.run_path))

    def refresh(self) -> None:
        """Re-scan the segments of the recordings (a live run's new batches)."""
        with self._lock:
            self.rec.refresh()
            self.generation += 1

    # ---------------------------------------------------------------- timeline
    def timeline(self) -> Timeline:
        """Per-step metrics of both runs (numpy over the list columns) and the onset by rule."""
        def metrics(schema: str) -> dict[str, list]:
            with self.cursor() as cur:   # a cursor per thread
                return step_metrics(*fetch(cur, schema))
        if self.has_ref:  # both runs at once: DuckDB and numpy release the GIL
            with ThreadPoolExecutor(2) as pool:
                run_f, ref_f = pool.submit(metrics, RUN), pool.submit(metrics, REF)
                run, ref = run_f.result(), ref_f.result()
        else:
            run, ref = metrics(RUN), None
        return Timeline(run, ref, onset_by_rule(run, ref), self.status())

    def bisect_onset(self) -> Onset | None:
        """The onset from ``replay.diagnose.bisect.bisect_steps`` (None when it is absent or fails: the rule stands)."""
        if not self.has_ref:
            return None
        try:
            found = engine_adapter.bisect_steps(self.run_path, self.ref_path)
        except Exception as e:  # noqa: BLE001 - the rule's onset stays; the reason is shown
            return Onset(None, "replay bisect failed", {"reason": " ".join(str(e).split())})
        if found is None:
            return None
        step = found.get("step")
        method = "replay bisect" + (f" {found['method']}" if found.get("method") else "")
        evidence = {"evidence": found.get("evidence")}
        if step is None:
            evidence["reason"] = found.get("reason") or "the run stays within the reference's noise"
        return Onset(None if step is None else int(step), method, evidence)

    # ---------------------------------------------------------------- diagnosis
    def components(self) -> Components | None:
        """Per-step mean |component| of the run from its stored reference; None when the run
        has none yet (``replay diagnose`` or the timeline's ``d`` stores it)."""
        with self.cursor() as cur:
            rows = cur.sql("""SELECT step, avg(abs(e_backend)) FILTER (WHERE isfinite(e_backend)),
                                     avg(abs(e_trainer)) FILTER (WHERE isfinite(e_trainer)),
                                     avg(abs(lag)) FILTER (WHERE isfinite(lag)),
                                     avg(abs(semantics)) FILTER (WHERE isfinite(semantics))
                              FROM run.tokens WHERE lp_ref IS NOT NULL GROUP BY step ORDER BY step""").fetchall()
        if not rows:
            return None
        cols = list(zip(*rows))
        return Components([int(s) for s in cols[0]], *[[_f(x) for x in c] for c in cols[1:]])

    def diagnose(self, progress=None) -> dict:
        """``replay.diagnose.diagnose`` of the run (against the reference when there is one); the
        reference scores and replays go into the run's recording, then the views are re-read."""
        from replay.diagnose import diagnose

        res = diagnose(self.run_path, against=self.ref_path, model_path=self.model_path, progress=progress)
        self.refresh()
        return res

    # ---------------------------------------------------------------- step view
    def step_tables(self, step: int):
        """The rollouts and trainer rows of one step (lists included), cached for the step view."""
        key = (self.generation, step)
        with self._lock:
            hit = self._steps.get(key)
        if hit is not None:
            return hit
        extra = (", output_ids, token_versions, len(prompt_ids) AS n_prompt, "
                 "num_cached_tokens AS cached, time_ns")
        with self.cursor() as cur:
            tables = fetch(cur, RUN, step, extra)
        with self._lock:
            self._steps[key] = tables
            while len(self._steps) > STEP_CACHE:
                self._steps.pop(next(iter(self._steps)))
        return tables

    def sequences(self, step: int) -> SequenceTable:
        """The sequences of ``step``, worst mean |r| first."""
        r, t = self.step_tables(step)
        st = sequence_stats(r, t)
        d = r.select(["request_id", "reward", "cached"]).to_pydict()
        lengths = pc.list_value_length(r.column("output_ids")).to_pylist()
        rows = []
        for i, (rid, versions) in enumerate(zip(d["request_id"], r.column("token_versions").to_pylist())):
            vs = [v for v in (versions or []) if v is not None]
            label = "" if not vs else f"{vs[0]}→{vs[-1]}" if len(set(vs)) > 1 else str(vs[0])
            rows.append((rid, lengths[i], st["mean_abs"][i], st["max_abs"][i], d["reward"][i],
                         label, d["cached"][i]))
        rows.sort(key=lambda x: (x[2] is None, -(x[2] or 0.0), x[0]))
        cols = ["request_id", "n_tokens", "mean |r|", "max |r|", "reward", "versions", "cached"]
        return SequenceTable(step, cols, rows)

    def tokens(self, step: int, request_id: str) -> SequenceTokens:
        """The generated tokens of one sequence, both logprobs aligned by position."""
        r, t = self.step_tables(step)
        rows = [i for i, x in enumerate(r.column("request_id").to_pylist()) if x == request_id]
        if not rows:
            raise RecordingError("no such sequence in the run", "no such sequence",
                                 step=step, request_id=request_id)
        times = r.column("time_ns").to_pylist()
        i = max(rows, key=lambda k: times[k])
        j = match_trainer(r.slice(i, 1), t)[0]
        ids = r.column("output_ids")[i].as_py() or []
        lr = r.column("lr")[i].as_py() or []
        n = len(ids)

        def fit(xs):
            xs = list(xs or [])[:n]
            return xs + [None] * (n - len(xs))
        if j >= 0:
            lt, ent, tver = (fit(t.column("lt")[j].as_py()), fit(t.column("ent")[j].as_py()),
                             t.column("weight_version")[j].as_py())
        else:
            lt, ent, tver = [None] * n, [None] * n, None
        ratio = [None if a is None or b is None else float(a) - float(b) for a, b in zip(lt, lr)]
        return SequenceTokens(step, request_id, ids, lr, lt, ratio, fit(r.column("token_versions")[i].as_py()),
                              tver, ent, n_prompt=r.column("n_prompt")[i].as_py() or 0,
                              num_cached=r.column("cached")[i].as_py(), text=self.token_texts(ids),
                              components=self.token_components(step, request_id, n))

    def token_components(self, step: int, request_id: str, n: int) -> dict[str, list[float | None]]:
        """The decomposition of one sequence's tokens (empty without a stored reference)."""
        names = COLOUR_BY[1:]
        with self.cursor() as cur:
            rows = cur.sql(f"SELECT pos, {', '.join(names)} FROM run.tokens WHERE step = ? AND request_id = ? "
                           "AND lp_ref IS NOT NULL ORDER BY pos", params=[step, request_id]).fetchall()
        if not rows:
            return {}
        out: dict[str, list[float | None]] = {c: [None] * n for c in names}
        for pos, *vals in rows:
            if 0 <= pos < n:
                for c, v in zip(names, vals):
                    out[c][pos] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        return out

    def token_texts(self, ids: list[int]) -> list[str] | None:
        """Each token id as visible text (spaces as ␣, newlines as ⏎), or None without a tokenizer.

        The tokenizer is the ``tokenizer.json`` of the model folder the run config names.
        """
        if self._tokenizer is None:
            self._tokenizer = False
            try:
                _, folder = recorded_model(self.run_path, read_manifest(self.run_path).get("run_config"))
            except ReplayError:   # a damaged carried model: no text, the ids are shown
                folder = None
            if folder is not None and (folder / "tokenizer.json").is_file():
                try:
                    from tokenizers import Tokenizer
                    self._tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
                except Exception:  # noqa: BLE001 - no text then: the ids are shown
                    self._tokenizer = False
        if not self._tokenizer:
            return None
        out = []
        for i in ids:
            t = self._tokenizer.id_to_token(int(i)) if i is not None else None
            t = (t or "").replace("Ġ", "␣").replace("Ċ", "⏎").replace(" ", "␣").replace("\n", "⏎")
            out.append(t or str(i))
        return out

    def sequence_extras(self, step: int, request_id: str) -> tuple[list, dict]:
        """Replayed logprobs (per config) and top-k rows (per source and position) of one sequence, cached."""
        key = (self.generation, step, request_id)
        with self._lock:
            hit = self._extras.get(key)
        if hit is not None:
            return hit
        with self.cursor() as cur:
            replays = cur.sql("""SELECT engine_config, any_value(config), engine,
                                        arg_max(logprobs, time_ns)
                                 FROM run.replays WHERE step = ? AND request_id = ?
                                 GROUP BY engine_config, engine ORDER BY min(time_ns)""",
                              params=[step, request_id]).fetchall()
            topk = cur.sql("""SELECT source, pos, arg_max(ids, time_ns), arg_max(logprobs, time_ns)
                              FROM run.topk WHERE step = ? AND request_id = ?
                              GROUP BY source, pos ORDER BY source, pos""",
                           params=[step, request_id]).fetchall()
        by_pos: dict = {}
        for source, pos, ids, lps in topk:
            by_pos.setdefault(pos, {})[source] = list(zip(ids or [], [_f(x) for x in (lps or [])]))
        out = ([(config_label(cfg, cid), eng or "", lps or []) for cid, cfg, eng, lps in replays], by_pos)
        with self._lock:
            self._extras[key] = out
            while len(self._extras) > 64:
                self._extras.pop(next(iter(self._extras)))
        return out

    def token_detail(self, toks: SequenceTokens, pos: int) -> TokenDetail:
        """Recorded, replayed and top-k values of token ``pos`` of a sequence."""
        d = TokenDetail(toks.step, toks.request_id, pos, toks.token_id[pos], _f(toks.lp_rollout[pos]),
                        _f(toks.lp_trainer[pos]), _f(toks.log_ratio[pos]), toks.weight_version[pos],
                        toks.trainer_version, _f(toks.entropy[pos]),
                        text=toks.text[pos] if toks.text else None)
        replays, topk = self.sequence_extras(toks.step, toks.request_id)
        d.replays = [(label, eng, _f(lps[pos]) if pos < len(lps) else None) for label, eng, lps in replays]
        d.topk = topk.get(pos, {})
        d.components = {k: v[pos] for k, v in toks.components.items() if pos < len(v)}
        return d

    # ---------------------------------------------------------------- replays
    def replay_summary(self, step: int, config_id: str, engine: str = "reference") -> SequenceTable:
        """Per sequence of ``step``: recorded mean |r| beside the replay's (trainer vs replayed lp)
        on ``engine``. Tokens the replayed config could not have sampled (logprob -inf there) are
        counted in "outside support" and left out of the replayed means."""
        q = """WITH rp AS (
                   SELECT request_id, arg_max(logprobs, time_ns) AS lp
                   FROM run.replays WHERE step = ? AND engine_config = ? AND engine = ? GROUP BY request_id),
               t AS (
                   SELECT t.request_id, t.log_ratio, CAST(t.lp_trainer AS DOUBLE) AS lt,
                          CAST(t.lp_rollout AS DOUBLE) AS lr, CAST(rp.lp[t.pos + 1] AS DOUBLE) AS lx
                   FROM run.tokens t JOIN rp ON rp.request_id = t.request_id WHERE t.step = ?)
               SELECT request_id,
                      avg(abs(log_ratio)) AS "recorded |r|",
                      avg(abs(lt - lx)) FILTER (WHERE isfinite(lx)) AS "replayed |r|",
                      avg(abs(lx - lr)) FILTER (WHERE isfinite(lx)) AS "|replay - rollout|",
                      count(*) FILTER (WHERE lx = '-inf'::DOUBLE) AS "outside support"
               FROM t GROUP BY request_id ORDER BY 2 DESC NULLS LAST, 1"""
        with self.cursor() as cur:
            rel = cur.sql(q, params=[step, config_id, engine, step])
            return SequenceTable(step, list(rel.columns), rel.fetchall())

    # ---------------------------------------------------------------- SQL console
    def run_sql(self, sql: str, limit: int = 1000, on_cursor=None) -> tuple[list[str], list[tuple], bool, float, int]:
        """Run the statements of ``sql`` in order; (columns and at most ``limit`` rows of the
        last one that returns rows, truncated?, seconds, statements run). ``on_cursor(cur)`` is
        called with the cursor the query runs on (``cur.interrupt()`` stops it), then with None.
        duckdb.Error and ReplayError propagate."""
        t0 = time.perf_counter()
        cols: list[str] = []
        rows: list[tuple] = []
        with self.cursor() as cur:   # this thread's own cursor: the main connection is not thread-safe
            try:
                statements = [st.query for st in cur.extract_statements(sql)]
            except duckdb.Error as e:
                raise sql_error(e) from e
            if not statements:
                raise ReplayError("the query holds no SQL statement (it is empty or only comments)", "sql error")
            if on_cursor is not None:
                on_cursor(cur)
            try:
                for q in statements:
                    rel = cur.sql(q)
                    if rel is not None:
                        cols = list(rel.columns)
                        rows = rel.limit(limit + 1).fetchall()
            except duckdb.Error as e:
                if isinstance(e, duckdb.InterruptException):
                    raise
                raise sql_error(e) from e
            finally:
                if on_cursor is not None:
                    on_cursor(None)
        return cols, rows[:limit], len(rows) > limit, time.perf_counter() - t0, len(statements)
