"""The parent side of the worker protocol: an :class:`~replay.engines.base.Engine` whose
work runs in ``python -m replay.engines.worker`` (see :mod:`replay.engines.worker`).

    with EngineClient("vllm", model_path, config) as eng:
        eng.load_weights(3, state_dict)
        results = eng.generate(requests, updates)

``python=PATH`` runs the worker under another interpreter (a venv holding another
vLLM). Every failure of the child — it cannot start, it dies, it is silent past
``timeout``, it answers something that is not a protocol message — raises
:class:`~replay.errors.EngineError` with the tail of the child's stderr. A child that
timed out is killed; ``close()`` ends the child and reaps it, and is safe to call twice.
"""
from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

from replay import errors
from replay.errors import EngineError
from replay.fixes import EngineConfig
from replay.engines import worker as wire
from replay.engines.worker import Call
from replay.engines.base import GenGroup, GenRequest, GenResult, ScoreRequest, ScoreResult, WeightUpdate, groups_by_calls

STDERR_TAIL_LINES = 40


class EngineClient:
    """An engine in a child process (``engine`` is "reference", "vllm" or "vllm-v0")."""

    def __init__(self, engine: str, model_path: Any, config: EngineConfig | None = None, *,
                 python: str | None = None, timeout: float = 600.0, start_timeout: float = 300.0,
                 device: str = "auto", seed: int = 0, engine_kwargs: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None):
        if engine not in wire.ENGINES:
            raise errors.BadInput(f"unknown engine {engine!r}; known engines: {', '.join(wire.ENGINES)}",
                                  field="engine")
        self.engine = engine
        self.config = config or EngineConfig()
        self.version: int | None = None
        self.timeout = float(timeout)
        self.python = python or sys.executable
        self.info: dict[str, Any] = {}  # the worker's ready message: pid, executable, engine, ...
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        cmd = [self.python, "-m", "replay.engines.worker", "--engine", engine, "--model", str(model_path),
               "--config", json.dumps(self.config.to_dict()), "--device", device, "--seed", str(seed),
               "--engine-kwargs", json.dumps(dict(engine_kwargs or {}))]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            self.process: subprocess.Popen | None = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env)
        except OSError as e:
            raise EngineError(f"cannot start the {engine} worker with interpreter {self.python!r}: {e}") from e
        self._drain = threading.Thread(target=self._read_stderr, name=f"{engine}-worker-stderr", daemon=True)
        self._drain.start()
        call, meta, _ = self._receive(Call.READY, start_timeout, starting=True)
        self.info = meta
        self.name = str(meta.get("engine") or engine)
        self.start_seconds = meta.get("start_seconds")
        self.version = meta.get("version")
        self._versions: set[int] = {int(v) for v in meta.get("versions") or ([] if self.version is None
                                                                               else [self.version])}
        self.effective = meta.get("effective")  # what the engine really runs with (vLLM engines)
        # Whether the child engine can teacher-force GenRequest.forced_output_ids through generate().
        self.supports_forced_output = bool(meta.get("supports_forced_output", False))

    # ------------------------------------------------------------------ Engine protocol

    def load_weights(self, version: int, state_dict: Mapping[str, Any], *, activate: bool = True) -> None:
        """Ship ``state_dict`` as safetensors bytes; the worker keeps it as ``version``."""
        import torch
        from safetensors.torch import save as st_save

        blob = st_save({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state_dict.items()})
        _, meta, _ = self._call(Call.LOAD_WEIGHTS, {"version": int(version), "activate": bool(activate)},
                                [{"safetensors": blob}], wire.WEIGHTS_SCHEMA)
        self.version = meta.get("version")
        self._versions.add(int(version))

    @property
    def versions(self) -> list[int]:
        """Every weight version loaded into the child engine."""
        return sorted(self._versions)

    def activate(self, version: int) -> None:
        """Serve an already loaded ``version`` from now on."""
        self.version = self._call(Call.ACTIVATE, {"version": int(version)})[1].get("version")

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry of the child engine."""
        self._call(Call.RESET_PREFIX_CACHE)

    def generate(self, requests: Sequence[GenRequest], updates: Sequence[WeightUpdate] = ()) -> list[GenResult]:
        _, meta, rows = self._call(Call.GENERATE, {"updates": [asdict(u) for u in updates]}, list(requests),
                                   wire.SCHEMAS[GenRequest])
        self.version = meta.get("version")
        return wire.rows_to(GenResult, rows)

    def generate_groups(self, groups: Sequence[GenGroup]) -> list[list[GenResult]]:
        """One :meth:`generate` call per distinct schedule (:func:`~replay.engines.base.groups_by_calls`)."""
        return groups_by_calls(self, groups)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        _, _, rows = self._call(Call.SCORE, {}, list(requests), wire.SCHEMAS[ScoreRequest])
        return wire.rows_to(ScoreResult, rows)

    def hidden_states(self, token_ids: Sequence[int]) -> list[Any]:
        """The child engine's residual stream per layer for ``token_ids`` (float32 numpy arrays)."""
        from safetensors.torch import load as st_load

        _, meta, rows = self._call(Call.HIDDEN_STATES, {"token_ids": [int(t) for t in token_ids]})
        states = st_load(rows[0]["safetensors"])
        return [states[str(i)].numpy() for i in range(int(meta["n"]))]

    def ping(self) -> dict:
        """The worker's info (pid, executable, engine, effective settings)."""
        return self._call(Call.PING)[1]

    def close(self) -> None:
        """Ask the worker to close its engine and exit; kill it if it does not. Safe twice."""
        proc = getattr(self, "process", None)
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    self._call(Call.CLOSE, timeout=min(self.timeout, 60.0))
                except EngineError:
                    pass  # it died or hung on the way out: it is killed below if alive
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self.process = None
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self._drain.join(timeout=5)
            if proc.stderr:
                proc.stderr.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # ---------------------------------------------------------------------- transport

    def _call(self, call: Call, meta: dict | None = None, rows: list | None = None, schema: Any = None,
              timeout: float | None = None) -> tuple[Call, dict, list[dict]]:
        proc = self._running(call)
        timeout = self.timeout if timeout is None else timeout
        self._send(proc, wire.encode(call, meta, rows, schema), call, timeout)
        return self._receive(call, timeout)

    def _send(self, proc: subprocess.Popen, data: bytes, call: Call, timeout: float) -> None:
        """Write one message; a child that stops reading (hung, pipe full) is killed at ``timeout``."""
        failed: list[BaseException] = []

        stdin = proc.stdin
        assert stdin is not None  # the worker is started with stdin=PIPE

        def write() -> None:
            try:
                wire.write_message(stdin, data)
            except (BrokenPipeError, OSError, ValueError) as e:
                failed.append(e)

        writer = threading.Thread(target=write, name=f"{self.engine}-worker-write", daemon=True)
        writer.start()
        writer.join(timeout)
        if writer.is_alive():
            self._kill()
            writer.join(5)
            raise EngineError(f"the {self.engine} worker did not read the {call!r} request within the timeout; "
                              f"it was killed{self._tail()}")
        if failed:
            raise self._died(call, f"the pipe to it broke ({failed[0]})") from failed[0]

    def _running(self, call: Call) -> subprocess.Popen:
        if self.process is None:
            raise EngineError(f"the {self.engine} worker is closed; cannot {call}")
        if self.process.poll() is not None:
            raise self._died(call, "it had already exited")
        return self.process

    def _receive(self, expect: Call, timeout: float, starting: bool = False) -> tuple[Call, dict, list[dict]]:
        proc = self.process
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        head = self._read_exact(fd, wire._LEN.size, deadline, expect, starting)
        body = self._read_exact(fd, wire._LEN.unpack(head)[0], deadline, expect, starting)
        try:
            call, meta, rows = wire.decode(body)
        except ValueError as e:
            self._kill()
            raise EngineError(f"the {self.engine} worker sent a bad reply to {expect!r}: {e}"
                              f"{self._tail()}") from e
        if call is Call.ERROR:
            cls = getattr(errors, meta.get("type", ""), None)
            cls = cls if isinstance(cls, type) and issubclass(cls, errors.ReplayError) else EngineError
            what = "failed to start" if starting else f"failed in {expect}"
            msg = f"the {self.engine} worker {what}: {meta.get('type')}: {meta.get('message')}"
            if starting:
                self._kill()
                raise EngineError(msg + self._tail())
            raise cls(msg)
        if call != expect:
            self._kill()
            raise EngineError(f"the {self.engine} worker answered {call!r} to {expect!r}{self._tail()}")
        return call, meta, rows

    def _read_exact(self, fd: int, n: int, deadline: float, call: Call, starting: bool) -> bytes:
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(wait, 0))[0] if wait > 0 else []
            if not ready:
                self._kill()
                what = "start" if starting else f"answer {call!r}"
                raise EngineError(f"the {self.engine} worker did not {what} within the timeout; it was killed"
                                  f"{self._tail()}")
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise self._died(call, "it closed its output", starting)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _died(self, call: Call, how: str, starting: bool = False) -> EngineError:
        proc = self.process
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
                code = proc.returncode
        when = "while starting" if starting else f"during {call!r}"
        return EngineError(f"the {self.engine} worker (interpreter {self.python}) died {when}: {how}, "
                           f"exit code {code}{self._tail()}")

    def _kill(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _read_stderr(self) -> None:
        proc = self.process
        if proc is None or proc.stderr is None:
            return
        for raw in iter(proc.stderr.readline, b""):
            self._stderr.append(raw.decode(errors="replace").rstrip())

    def _tail(self) -> str:
        proc = self.process
        if proc is not None and proc.poll() is not None:
            self._drain.join(timeout=2)  # the child is gone: read its last words to the end
        lines = [ln for ln in list(self._stderr) if ln.strip()]
        return ("\n--- worker stderr (last lines) ---\n" + "\n".join(lines[-20:])) if lines else ""
