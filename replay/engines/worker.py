"""An engine in a child process, speaking Arrow IPC over its stdin / stdout pipes.

    python -m replay.engines.worker --engine reference|vllm|vllm-v0 --model PATH --config JSON

Why a process: V0 (vLLM ≤ 0.10) and V1 cannot be installed side by side, so an engine
may live in another Python environment (``EngineClient(..., python=PATH)``), and a
crashing or hanging engine must not take the caller down.

Protocol (version 1). A *message* is an 8-byte little-endian length followed by that
many bytes holding one Arrow IPC stream with one record batch. The schema metadata
key ``replay.call`` names the call, ``replay.meta`` holds its small arguments as JSON;
the rows carry the bulk:

=============== ================================== =====================================
call            request                            reply (same call name)
=============== ================================== =====================================
ready           (sent by the worker once started)  meta: info (pid, executable, engine)
ping            --                                 meta: info
load_weights    meta: version, activate;           meta: version
                one row: safetensors bytes
activate        meta: version                      meta: version
reset_prefix_   --                                 --
cache
generate        meta: updates; rows: GenRequest    rows: GenResult; meta: version
score           rows: ScoreRequest                 rows: ScoreResult
close           --                                 -- (then the worker exits)
=============== ================================== =====================================

Any failure is answered with call ``error`` and meta ``{"type", "message", "traceback"}``.
The worker moves fd 1 to stderr before importing an engine, so library prints and logs
never corrupt the protocol channel.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import traceback
from dataclasses import asdict
from enum import Enum
from typing import IO, Any, BinaryIO

import pyarrow as pa

from replay.engines.base import WORKER_ENGINES as ENGINES
from replay.engines.base import GenRequest, GenResult, ScoreRequest, ScoreResult, WeightUpdate

PROTOCOL_VERSION = 1


class Call(str, Enum):
    """The messages of the protocol; the wire carries their values (a str mix-in, not
    StrEnum: the V0 worker may run under an older Python)."""

    READY = "ready"
    PING = "ping"
    LOAD_WEIGHTS = "load_weights"
    ACTIVATE = "activate"
    RESET_PREFIX_CACHE = "reset_prefix_cache"
    GENERATE = "generate"
    SCORE = "score"
    HIDDEN_STATES = "hidden_states"
    CLOSE = "close"
    ERROR = "error"

    def __str__(self) -> str:    # messages name the wire name: generate, 'generate'
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


_LEN = struct.Struct("<Q")

_ints, _floats = pa.list_(pa.int64()), pa.list_(pa.float64())
SCHEMAS: dict[type, pa.Schema] = {
    GenRequest: pa.schema([("request_id", pa.string()), ("prompt_ids", _ints), ("max_tokens", pa.int64()),
                           ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()),
                           ("seed", pa.int64()), ("num_topk", pa.int64()), ("stop_token_ids", _ints),
                           ("forced_output_ids", _ints), ("arrival_step", pa.int64())]),
    GenResult: pa.schema([("request_id", pa.string()), ("output_ids", _ints), ("logprobs", _floats),
                          ("token_versions", _ints), ("finish_reason", pa.string()),
                          ("num_cached_tokens", pa.int64()), ("topk_ids", pa.list_(_ints)),
                          ("topk_logprobs", pa.list_(_floats))]),
    ScoreRequest: pa.schema([("request_id", pa.string()), ("prompt_ids", _ints), ("output_ids", _ints),
                             ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()),
                             ("num_topk", pa.int64())]),
    ScoreResult: pa.schema([("request_id", pa.string()), ("logprobs", _floats), ("topk_ids", pa.list_(_ints)),
                            ("topk_logprobs", pa.list_(_floats))]),
}
WEIGHTS_SCHEMA = pa.schema([("safetensors", pa.large_binary())])


# ----------------------------------------------------------------------------- codec


def encode(call: Call, meta: dict | None = None, rows: list | None = None, schema: pa.Schema | None = None) -> bytes:
    """One protocol message (without its length prefix)."""
    schema = schema or pa.schema([])
    schema = schema.with_metadata({b"replay.call": call.encode(),
                                   b"replay.meta": json.dumps(meta or {}).encode(),
                                   b"replay.protocol": str(PROTOCOL_VERSION).encode()})
    if rows and not isinstance(rows[0], dict):
        rows = [asdict(r) for r in rows]
    batch = pa.RecordBatch.from_pylist(rows or [], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode(data: bytes) -> tuple[Call, dict, list[dict]]:
    """``(call, meta, rows)`` of one message; ``ValueError`` when it is not one."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise ValueError(f"not an Arrow IPC stream: {e}") from e
    md = table.schema.metadata or {}
    name = md.get(b"replay.call", b"").decode()
    try:
        call = Call(name)
    except ValueError:
        raise ValueError(f"message names no known call (replay.call={name!r})") from None
    return call, json.loads(md.get(b"replay.meta", b"{}")), table.to_pylist()


def write_message(stream: IO[bytes], data: bytes) -> None:
    stream.write(_LEN.pack(len(data)))
    stream.write(data)
    stream.flush()


def read_message(stream: BinaryIO) -> bytes | None:
    """The next message, or ``None`` at a clean end of stream."""
    head = _read_exact(stream, _LEN.size)
    if head is None:
        return None
    body = _read_exact(stream, _LEN.unpack(head)[0])
    if body is None:
        raise EOFError("stream ended inside a message")
    return body


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def rows_to(cls: type, rows: list[dict]) -> list:
    """Wire rows back into dataclasses (nulls in optional list columns stay ``None``)."""
    out = []
    for row in rows:
        if cls is GenRequest and row.get("stop_token_ids") is None:
            row["stop_token_ids"] = []
        out.append(cls(**row))
    return out


def error_message(exc: BaseException) -> bytes:
    return encode(Call.ERROR, {"type": type(exc).__name__, "message": str(getattr(exc, "msg", exc)),
                               "traceback": traceback.format_exc(limit=8)})


# ---------------------------------------------------------------------------- engine


def make_engine(kind: str, model: str, config: Any, device: str, seed: int, engine_kwargs: dict) -> Any:
    """The engine a worker serves."""
    if kind == "reference":
        from replay.engines.reference.engine import ReferenceEngine

        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return ReferenceEngine(model, config, device=device, seed=seed, **engine_kwargs)
    if kind == "vllm":
        from replay.engines.vllm.engine import VLLMEngine

        return VLLMEngine(model, config, device=device, seed=seed, **engine_kwargs)
    if kind == "vllm-v0":
        from replay.engines.vllm.v0 import VLLMV0Engine

        return VLLMV0Engine(model, config, device=device, seed=seed, **engine_kwargs)
    raise ValueError(f"unknown engine {kind!r}; known engines: {', '.join(ENGINES)}")


def info(engine: Any, kind: str) -> dict:
    return {"pid": os.getpid(), "executable": sys.executable, "python": sys.version.split()[0],
            "engine": kind, "protocol": PROTOCOL_VERSION, "version": engine.version, "versions": engine.versions,
            "effective": engine.effective, "start_seconds": engine.start_seconds,
            "supports_forced_output": bool(engine.supports_forced_output)}


def handle(engine: Any, kind: str, call: Call, meta: dict, rows: list[dict]) -> bytes:
    """Run one call on ``engine``; the reply message."""
    if call is Call.PING:
        return encode(Call.PING, info(engine, kind))
    if call is Call.LOAD_WEIGHTS:
        from safetensors.torch import load as st_load

        if len(rows) != 1:
            raise ValueError(f"load_weights carries one row of safetensors bytes, got {len(rows)} rows")
        engine.load_weights(int(meta["version"]), st_load(rows[0]["safetensors"]), activate=bool(meta["activate"]))
        return encode(Call.LOAD_WEIGHTS, {"version": engine.version})
    if call is Call.ACTIVATE:
        engine.activate(int(meta["version"]))
        return encode(Call.ACTIVATE, {"version": engine.version})
    if call is Call.RESET_PREFIX_CACHE:
        engine.reset_prefix_cache()
        return encode(Call.RESET_PREFIX_CACHE)
    if call is Call.GENERATE:
        updates = [WeightUpdate(**u) for u in meta.get("updates", [])]
        results = engine.generate(rows_to(GenRequest, rows), updates)
        return encode(Call.GENERATE, {"version": engine.version}, results, SCHEMAS[GenResult])
    if call is Call.SCORE:
        return encode(Call.SCORE, {}, engine.score(rows_to(ScoreRequest, rows)), SCHEMAS[ScoreResult])
    if call is Call.HIDDEN_STATES:
        import torch
        from safetensors.torch import save as st_save

        states = engine.hidden_states([int(t) for t in meta["token_ids"]])
        blob = st_save({str(i): torch.as_tensor(s).contiguous() for i, s in enumerate(states)})
        return encode(Call.HIDDEN_STATES, {"n": len(states)}, [{"safetensors": blob}], WEIGHTS_SCHEMA)
    if call is Call.CLOSE:
        engine.close()
        return encode(Call.CLOSE)
    raise ValueError(f"the worker does not answer {call!r} calls")


def serve(engine: Any, kind: str, inp: BinaryIO, out: BinaryIO) -> None:
    """Answer messages until ``close`` or the end of ``inp``."""
    write_message(out, encode(Call.READY, info(engine, kind)))
    while True:
        data = read_message(inp)
        if data is None:
            break
        call: Call | None = None
        try:
            call, meta, rows = decode(data)
            reply = handle(engine, kind, call, meta, rows)
        except Exception as e:  # every failure goes back to the caller as a message
            reply = error_message(e)
        write_message(out, reply)
        if call is Call.CLOSE:
            return
    engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replay.engines.worker", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--model", required=True, help="HF-format checkpoint folder")
    p.add_argument("--config", default="{}", help="EngineConfig as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-kwargs", default="{}", help="extra engine constructor arguments as JSON")
    args = p.parse_args(argv)
    # The protocol owns the original stdout; everything printed from here on goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        from replay.fixes import EngineConfig

        config = EngineConfig.from_dict(json.loads(args.config))
        engine = make_engine(args.engine, args.model, config, args.device, args.seed, json.loads(args.engine_kwargs))
    except Exception as e:
        traceback.print_exc()
        write_message(out, error_message(e))
        return 1
    serve(engine, args.engine, inp, out)
    # The engine is closed and the reply sent: skip interpreter teardown (vLLM's and
    # torch's exit hooks take seconds) so the parent's close() returns at once.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
