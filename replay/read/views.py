"""Datasets over a recording's segments, and the SQL of its derived views.

Each table becomes one ``pyarrow.dataset``: the closed ``.arrow`` segments as a file
dataset (DuckDB pushes projections and filters into its scan) plus, as an in-memory
part, the complete batches of the open ``.arrows`` streams. Every part is read with
the table's current schema (:data:`replay.schema.SCHEMAS`, all fields nullable):

* a column missing from an older segment reads as NULL;
* a column the current schema does not know (written by a newer writer) is kept,
  appended after the known ones, with the type of the first segment that has it; a
  segment giving it another type drops it from the view, with a warning.

The derived views are plain SQL over the table views of one schema: ``tokens`` (one
row per generated token), ``sequences`` (one row per rollout) and ``step_metrics``
(one row per step, from :func:`replay.metrics.step_metrics_lists_sql`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.ipc as ipc

from replay.errors import RecordingError, one_line
from replay.store.files import LOCAL, Files
from replay.store.segments import Part, StreamContents, file_schema, read_stream
from replay.schema import SCHEMAS

DERIVED = ("tokens", "sequences", "step_metrics")


@dataclass
class TableScan:
    """One table's dataset and what went into it."""

    dataset: ds.Dataset                     # what DuckDB scans
    files: list[Path] = field(default_factory=list)    # closed segments
    streams: list[Path] = field(default_factory=list)  # open segments read into memory
    stream_rows: int = 0                    # rows held in memory from open segments
    skipped_bytes: int = 0                  # truncated tails of open segments
    warnings: list[str] = field(default_factory=list)


def base_schema(table: str) -> pa.Schema:
    """The current schema of ``table`` with every field nullable (old segments lack some)."""
    s = SCHEMAS[table]
    return pa.schema([f.with_nullable(True) for f in s], metadata=s.metadata)


def _add_extras(fields: list[pa.Field], known: dict[str, pa.DataType], base: set[str],
                schema: pa.Schema, dropped: set[str], where: Path, warnings: list[str]) -> None:
    """Append to ``fields`` the columns of ``schema`` the current schema does not know."""
    for f in schema:
        if f.name in base or f.name in dropped:
            continue
        if f.name not in known:
            known[f.name] = f.type
            fields.append(f.with_nullable(True))
        elif known[f.name] != f.type:
            dropped.add(f.name)
            warnings.append(f"column {f.name!r} has type {f.type} in {where} but "
                            f"{known[f.name]} elsewhere: left out of the view")


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column stored as ``got`` reads safely as ``want`` (widening casts only)."""
    if got == want or pa.types.is_null(got):
        return True
    if pa.types.is_integer(got):
        return pa.types.is_integer(want) or pa.types.is_floating(want)
    if pa.types.is_floating(got):
        return pa.types.is_floating(want)
    if pa.types.is_string(got) or pa.types.is_large_string(got):
        return pa.types.is_string(want) or pa.types.is_large_string(want)
    if pa.types.is_list(got) or pa.types.is_large_list(got):
        return (pa.types.is_list(want) or pa.types.is_large_list(want)) and \
            _compatible(got.value_type, want.value_type)
    return False


def check_types(schema: pa.Schema, base: pa.Schema, where: Path) -> None:
    for f in schema:
        i = base.get_field_index(f.name)
        if i >= 0 and not _compatible(f.type, base.field(i).type):
            raise RecordingError(f"column {f.name!r} of {where} has type {f.type}, but the "
                                 f"schema says {base.field(i).type}: the segment does not belong "
                                 "to this table", "bad segment", field=f.name)


def _conform(batch: pa.RecordBatch, schema: pa.Schema, where: Path) -> pa.RecordBatch:
    cols = []
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        if i < 0:
            cols.append(pa.nulls(batch.num_rows, f.type))
            continue
        col = batch.column(i)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise RecordingError(f"column {f.name!r} of {where} has type {col.type}, which "
                                     f"does not convert to {f.type}: {one_line(e)}",
                                     "bad segment", field=f.name) from None
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


_BOUNDS: dict[tuple[str, str, int, int], tuple[int, int] | None] = {}  # (files, path, mtime, size) -> steps


def _step_bounds(path: Path, files: Files = LOCAL) -> tuple[int, int] | None:
    """(min, max) step of a closed segment, or None if it has no step column, no rows or a
    NULL step. Reads the step column only; cached while the file is unchanged."""
    st = files.stat(path)
    if st is None:
        raise FileNotFoundError(str(path))
    key = (files.key, str(path), st[1], st[0])
    if key in _BOUNDS:
        return _BOUNDS[key]
    bounds = None
    with files.open(path) as src:
        idx = ipc.open_file(src).schema.get_field_index("step")
        if idx >= 0:
            reader = ipc.open_file(src, options=ipc.IpcReadOptions(included_fields=[idx]))
            lo = hi = None
            for i in range(reader.num_record_batches):
                col = reader.get_batch(i).column(0)
                if col.null_count:
                    lo = None
                    break
                if len(col):
                    mm = pc.min_max(col)
                    a, b = mm["min"].as_py(), mm["max"].as_py()
                    lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
            bounds = None if lo is None or hi is None else (int(lo), int(hi))  # (hi is set with lo)
    _BOUNDS[key] = bounds
    return bounds


def _file_dataset(paths: list[Path], schema: pa.Schema, files: Files = LOCAL) -> ds.Dataset:
    """The closed segments as one dataset. Each fragment carries its step range as a
    guarantee, so a filter on ``step`` skips whole segments (IPC files have no statistics
    of their own: without this, every filtered query would decompress every segment)."""
    if "step" not in schema.names or not pa.types.is_integer(schema.field("step").type):
        return ds.dataset([str(p) for p in paths], format="ipc", schema=schema, filesystem=files.fs)
    step = pc.field("step")
    guarantees = []
    for p in paths:
        try:
            b = _step_bounds(p, files)
        except (OSError, pa.ArrowException):
            b = None
        guarantees.append(pc.scalar(True) if b is None else (step >= b[0]) & (step <= b[1]))
    return ds.FileSystemDataset.from_paths([str(p) for p in paths], schema=schema,
                                           format=ds.IpcFileFormat(),
                                           filesystem=files.fs,
                                           partitions=guarantees)


StreamCache = dict  # path -> (size, mtime_ns, StreamContents): open segments already read


def _read_cached(path: Path, cache: StreamCache | None, files: Files = LOCAL) -> StreamContents:
    """read_stream, reusing the last read while the stream has not changed (live refresh)."""
    if cache is None:
        return read_stream(path, files)
    st = files.stat(path)
    if st is None:
        raise FileNotFoundError(str(path))
    hit = cache.get(path)
    if hit is not None and (hit[0], hit[1]) == st:
        return hit[2]
    contents = read_stream(path, files)
    cache[path] = (st[0], st[1], contents)
    return contents


def scan_table(table: str, parts: list[Part], cache: StreamCache | None = None, files: Files = LOCAL,
               admit: Callable[[Part, Path], bool] | None = None) -> TableScan:
    """The dataset of one table over ``parts``; the closed file of a part wins over its stream.

    The parts' paths are paths in ``files`` (this machine's folders by default).
    ``admit(part, path)``: whether to read the closed file that replaced a stream since the
    listing (its writer closed it); without it, such a file is read.
    """
    schema_of = functools.partial(file_schema, files=files)
    read = functools.partial(_read_cached, cache=cache, files=files)
    warnings: list[str] = []
    closed_files: list[tuple[Path, pa.Schema]] = []
    streams = []
    for p in parts:
        if p.file is not None:
            try:
                closed_files.append((p.file, schema_of(p.file)))
                continue
            except FileNotFoundError:
                if p.stream is None:  # listed and verified a moment ago: someone removed it
                    raise RecordingError(f"segment {p.file} disappeared while the recording was being "
                                         "opened (set aside or deleted meanwhile?); open it again",
                                         "damaged recording") from None
            except RecordingError:
                if p.stream is None:
                    raise
                warnings.append(f"{p.file} is torn; read its stream {p.stream.name} instead")
        if p.stream is not None:
            try:
                streams.append(read(p.stream))
            except FileNotFoundError:  # closed by its writer since the listing
                closed = p.stream.with_suffix(".arrow")
                if admit is not None and not admit(p, closed):
                    warnings.append(f"{p.stream} was closed while being read, and its closed "
                                    f"file is not listed in the manifest: not read")
                    continue
                try:
                    closed_files.append((closed, schema_of(closed)))
                except FileNotFoundError:
                    pass
    base = base_schema(table)
    fields = list(base)
    names = set(base.names)
    known: dict[str, pa.DataType] = {}
    dropped: set[str] = set()
    for path, sch in closed_files:
        check_types(sch, base, path)
        _add_extras(fields, known, names, sch, dropped, path, warnings)
    for c in streams:
        if c.schema is not None:
            check_types(c.schema, base, c.path)
            _add_extras(fields, known, names, c.schema, dropped, c.path, warnings)
    schema = pa.schema([f for f in fields if f.name not in dropped], metadata=base.metadata)
    children: list[ds.Dataset] = []
    if closed_files:
        children.append(_file_dataset([p for p, _ in closed_files], schema, files))
    batches = [_conform(b, schema, c.path) for c in streams for b in c.batches]
    if batches:
        children.append(ds.dataset(pa.Table.from_batches(batches, schema=schema)))
    for c in streams:
        if c.error:
            warnings.append(f"{c.path}: {c.error}")
    if not children:
        dataset = ds.dataset(schema.empty_table())
    elif len(children) == 1:
        dataset = children[0]
    else:
        dataset = ds.dataset(children)
    return TableScan(dataset, [p for p, _ in closed_files], [c.path for c in streams],
                     sum(c.rows for c in streams), sum(c.skipped_bytes for c in streams), warnings)


# ---------------------------------------------------------------- derived views

def latest_trainer_sql(s: str) -> str:
    """The trainer's latest row of each (step, request_id) of schema ``s``
    (:func:`replay.metrics.latest_scoring_sql`)."""
    from replay.metrics import latest_scoring_sql

    return f"""SELECT step, request_id, weight_version, logprobs, entropy
    FROM {s}.trainer
    QUALIFY row_number() OVER (PARTITION BY step, request_id ORDER BY {latest_scoring_sql()} DESC) = 1"""


def tokens_sql(s: str) -> str:
    """One row per generated token of schema ``s``'s rollouts, with the trainer's view of it
    and, where the ``reference`` table holds the sequence (``replay diagnose``), the exact
    decomposition of the mismatch (DESIGN §8.1)::

        log_ratio = e_trainer + lag + semantics - e_backend      (per token, exactly)

    ``lp_ref`` is the token's logprob under the sampler's distribution at its own version;
    ``e_backend = lp_rollout - lp_ref``; ``semantics`` the trainer's deliberate difference
    from the sampler (its identified semantics) at the token's version; ``lag`` the same
    reference moved from the token's version to the trainer's; ``e_trainer = lp_trainer -``
    that reference. ``ref_floor`` is the measured floor of the token (NULL unless sampled).

    The trainer's latest scoring (:func:`~replay.metrics.latest_scoring_sql`) of each (step, request_id) and the
    latest generation of its reference are joined on the whole sequence first, then
    unnested by position together, so the view costs one pass over the token lists and
    no token-level join.
    """
    def d(col: str) -> str:
        return f"CAST({col}[pos + 1] AS DOUBLE)"

    return f"""WITH tr AS ({latest_trainer_sql(s)}
), ref AS (
    SELECT step, request_id, lp_sampler, lp_tempered, lp_sampler_tr, lp_tempered_tr, floor
    FROM {s}.reference
    QUALIFY row_number() OVER (PARTITION BY step, request_id ORDER BY generation DESC, time_ns DESC) = 1
), sem AS (
    SELECT coalesce(arg_max(trainer_semantics, generation), 'sampler') = 'untruncated' AS untruncated
    FROM {s}.reference
), seq AS (
    SELECT r.step, r.request_id, r.rank, r.output_ids, r.logprobs AS lp_r,
           r.token_versions AS tv, t.logprobs AS lp_t, t.entropy AS ent,
           t.weight_version AS trainer_version,
           f.lp_sampler AS ref_s,
           CASE WHEN (SELECT untruncated FROM sem) THEN f.lp_tempered ELSE f.lp_sampler END AS star,
           CASE WHEN (SELECT untruncated FROM sem) THEN f.lp_tempered_tr ELSE f.lp_sampler_tr END AS star_tr,
           f.floor AS fl
    FROM {s}.rollouts r
    LEFT JOIN tr t ON r.step = t.step AND r.request_id = t.request_id
    LEFT JOIN ref f ON r.step = f.step AND r.request_id = f.request_id
)
SELECT step, request_id, CAST(pos AS INTEGER) AS pos,
       output_ids[pos + 1] AS token_id,
       lp_r[pos + 1] AS lp_rollout,
       lp_t[pos + 1] AS lp_trainer,
       {d("lp_t")} - {d("lp_r")} AS log_ratio,
       tv[pos + 1] AS weight_version,
       trainer_version,
       ent[pos + 1] AS entropy,
       rank,
       ref_s[pos + 1] AS lp_ref,
       {d("lp_r")} - {d("ref_s")} AS e_backend,
       {d("star")} - {d("ref_s")} AS semantics,
       {d("star_tr")} - {d("star")} AS lag,
       {d("lp_t")} - {d("star_tr")} AS e_trainer,
       fl[pos + 1] AS ref_floor
FROM (SELECT *, unnest(range(len(output_ids))) AS pos FROM seq)"""


def sequences_sql(s: str) -> str:
    """One row per rollout of schema ``s``, with its mismatch summary (for a step view)."""
    return f"""SELECT r.step, r.request_id, r.group_id, r.rank,
       len(r.output_ids) AS n_tokens,
       len(r.prompt_ids) AS n_prompt_tokens,
       r.reward, r.finish_reason,
       m.mean_abs_log_ratio, m.max_abs_log_ratio, m.n_scored,
       r.token_versions[1] AS first_version,
       r.token_versions[-1] AS last_version,
       len(list_distinct(r.token_versions)) AS n_versions,
       m.trainer_version,
       r.num_cached_tokens
FROM {s}.rollouts r
LEFT JOIN (
    SELECT step, request_id,
           avg(abs(log_ratio)) AS mean_abs_log_ratio,
           max(abs(log_ratio)) AS max_abs_log_ratio,
           count(log_ratio) AS n_scored,
           any_value(trainer_version) AS trainer_version
    FROM {s}.tokens
    GROUP BY step, request_id
) m ON m.step = r.step AND m.request_id = r.request_id"""


def step_metrics_view_sql(s: str) -> str | None:
    """The per-step metrics of schema ``s``; None when replay.metrics cannot be loaded.

    Computed from the ``rollouts`` and ``trainer`` tables directly rather than over the
    ``tokens`` view (same rows and values, a fraction of the time and memory: see
    :func:`replay.metrics.step_metrics_lists_sql`).
    """
    try:
        from replay.metrics import step_metrics_lists_sql
    except ImportError:
        return None
    return step_metrics_lists_sql(rollouts=f"{s}.rollouts", trainer=f"{s}.trainer")
