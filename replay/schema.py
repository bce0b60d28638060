"""Arrow schemas of a recording (schema v1) and its on-disk layout (DESIGN §3).

A recording is a directory::

    <recording>/
      manifest.json                     schema_version, run_id, created_at, status, run_config, ranks
      run.json                          the run's header (run_id, run_config), written once: a lost
                                        manifest is rebuilt from it and the segments (replay doctor)
      manifest.lock                     flock'ed by writers while they update manifest.json
      rank-0000.lock                    held (flock) by rank 0's writer for its whole life
      rollouts/rank-0000/part-00000.arrow     closed segment: Arrow IPC file (random access)
      rollouts/rank-0000/part-00001.arrows    open segment: Arrow IPC stream (survives kill -9)
      events/ trainer/ topk/ metrics/ weights/ rejects/ replays/ reference/   one folder per table
      weights/blobs/<sha256>.zst              weight blobs (replay.store.weights)
      model/model.json, model/config.json ... the checkpoint's small files (Recorder.model), each
                                        with its sha256; its weights are weight version 0

Every table carries ``rank`` and ``time_ns`` besides its key columns, so rows of
several ranks stay apart and can be put in order.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
# The one namespaced key under which every table's schema metadata records its version.
SCHEMA_KEY = b"replay.schema_version"
TABLE_KEY = b"replay.table"

MANIFEST = "manifest.json"
RUN_FILE = "run.json"   # run_id, created_at, schema_version, run_config: written once, never changed
MANIFEST_LOCK = "manifest.lock"
STREAM_SUFFIX = ".arrows"   # open segment, Arrow IPC stream format
FILE_SUFFIX = ".arrow"      # closed segment, Arrow IPC file format
SEGMENT_RE = re.compile(r"^part-(\d{5,})\.(arrow|arrows)$")
RANK_DIR_RE = re.compile(r"^rank-(\d{4,})$")

STATUSES = ("recording", "complete", "salvaged")

_ids = pa.list_(pa.int32())
_lps = pa.list_(pa.float32())
_vers = pa.list_(pa.int64())

_FIELDS: dict[str, list[pa.Field]] = {
    "events": [
        pa.field("seq", pa.int64(), nullable=False),          # global order of events within a rank
        pa.field("time_ns", pa.int64(), nullable=False),      # wall clock, ns since epoch
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),        # run_start, step_start, request_submitted, ...
        pa.field("step", pa.int64()),
        pa.field("weight_version", pa.int64()),
        pa.field("request_id", pa.string()),
        pa.field("detail", pa.string()),                      # JSON object: everything else (mode, position, ...)
    ],
    "rollouts": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string()),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("prompt_ids", _ids, nullable=False),
        pa.field("output_ids", _ids, nullable=False),
        pa.field("logprobs", _lps, nullable=False),           # engine logprob of each output token
        pa.field("token_versions", _vers),                    # weight version that produced each output token
        pa.field("reward", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("temperature", pa.float32()),
        pa.field("top_p", pa.float32()),
        pa.field("top_k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("logprobs_mode", pa.string()),               # raw_logprobs | processed_logprobs
        pa.field("engine", pa.string()),                      # engine name and version, e.g. vllm-0.32.0
        pa.field("engine_config", pa.string()),               # EngineConfig id, when known
        pa.field("num_cached_tokens", pa.int32()),            # prompt tokens served from the prefix cache
    ],
    "trainer": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("weight_version", pa.int64()),               # the trainer's weights when it scored
        pa.field("logprobs", _lps, nullable=False),           # trainer logprob of each output token
        pa.field("entropy", _lps),                            # entropy of the trainer's distribution per token
        pa.field("advantage", pa.float32()),
    ],
    "topk": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),      # engine | trainer | replay
        pa.field("pos", pa.int32(), nullable=False),          # index of the output token
        pa.field("ids", _ids, nullable=False),                # k token ids, best first
        pa.field("logprobs", _lps, nullable=False),           # their logprobs
    ],
    "metrics": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("source", pa.string()),                      # who computed it: trainer, engine, replay, ...
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
    ],
    "weights": [
        pa.field("version", pa.int64(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("sha256", pa.string(), nullable=False),      # of the safetensors bytes of the full state dict
        pa.field("nbytes", pa.int64()),                       # uncompressed size
        pa.field("blob", pa.string()),                        # path relative to the recording, NULL if external
        pa.field("base_version", pa.int64()),                 # set when the blob is an XOR delta
        pa.field("path", pa.string()),                        # external checkpoint path (hash-only records)
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
    ],
    "rejects": [
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("table", pa.string(), nullable=False),       # the table the row was meant for
        pa.field("step", pa.int64()),
        pa.field("request_id", pa.string()),
        pa.field("field", pa.string()),                       # the offending field
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string()),                         # the row as JSON, so nothing is lost
    ],
    "replays": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("engine_config", pa.string(), nullable=False),  # EngineConfig id
        pa.field("config", pa.string()),                         # EngineConfig as JSON
        pa.field("engine", pa.string()),                         # reference | vllm-<version>
        pa.field("mode", pa.string(), nullable=False),           # score | regenerate
        pa.field("replay_id", pa.string(), nullable=False),      # one id per replay run
        pa.field("logprobs", _lps),                              # replayed logprob per output token
        pa.field("output_ids", _ids),                            # regenerate: replayed tokens
        pa.field("first_diff", pa.int32()),                      # regenerate: first differing position, NULL if none
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
    ],
    # Exact reference scoring of recorded tokens (replay.diagnose.reference, DESIGN §8.1):
    # fp32, teacher-forced prefill, the stored weights of each token's own version.
    "reference": [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ref_key", pa.string(), nullable=False),        # hash of what the scores depend on
        pa.field("generation", pa.int64(), nullable=False),      # scoring pass; the highest wins
        pa.field("token_versions", _vers),                       # the version each token was scored with
        pa.field("trainer_version", pa.int64()),                 # the trainer's version the *_tr columns use
        pa.field("lp_sampler", _lps),                            # under the sampler's distribution (T, top-k, top-p)
        pa.field("lp_tempered", _lps),                           # under logits / T, not truncated
        pa.field("lp_sampler_tr", _lps),                         # the same two at the trainer's version
        pa.field("lp_tempered_tr", _lps),
        pa.field("floor", _lps),                                 # |body dtype - exact| per token; NULL: not sampled
        pa.field("floor_trainer", _lps),                         # the same in the trainer's dtype, if it differs
        pa.field("floor_dtype", pa.string()),                    # the body dtype the floor was measured for
        pa.field("trainer_semantics", pa.string()),              # sampler | untruncated, identified over the run
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
    ],
}

TABLES: tuple[str, ...] = tuple(_FIELDS)


def schema(table: str) -> pa.Schema:
    """The Arrow schema of ``table``, with the schema version in its metadata."""
    try:
        fields = _FIELDS[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; tables: {', '.join(TABLES)}") from None
    return pa.schema(fields, metadata={SCHEMA_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()})


SCHEMAS: dict[str, pa.Schema] = {t: schema(t) for t in TABLES}


# ---------------------------------------------------------------- layout helpers

def rank_dir(root: Path, table: str, rank: int) -> Path:
    return Path(root) / table / f"rank-{rank:04d}"


def segment_path(root: Path, table: str, rank: int, part: int, *, open_: bool) -> Path:
    suffix = STREAM_SUFFIX if open_ else FILE_SUFFIX
    return rank_dir(root, table, rank) / f"part-{part:05d}{suffix}"


def rank_lock_path(root: Path, rank: int) -> Path:
    return Path(root) / f"rank-{rank:04d}.lock"
