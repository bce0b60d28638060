"""Fault-injection kit: a fork server for writer processes, and the writers they run.

Starting a Python process that imports replay costs about a second on two cores, too
much for fifty kill trials. :class:`ForkServer` starts one process that imports the
recorder (no thread started, no recorder opened) and forks a fresh writer per trial;
the writer reports each step it has flushed to a side file (one line per flush, a
plain ``write`` that survives the writer's SIGKILL) and the test kills it by pid.

:class:`LineProcess` also runs the probe server: one process that opens damaged
recordings on request, so a crash or a hang there fails the test that asked.

Only light imports at the top (numpy): this module is imported by the helper
processes as well as by the tests.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# scenario -> recorder options and what each step writes
SCENARIOS: dict[str, dict] = {
    # tiny segments: a rotation (stream -> file, manifest update) every few batches
    "rotate": {"opts": {"segment_bytes": 2048, "batch_rows": 3}, "per_step": 6, "tokens": 24,
               "steps": 100_000, "trainer": False, "weights_every": 0},
    # a weight version (XOR delta against the last) every step
    "weights": {"opts": {"segment_bytes": 1 << 20}, "per_step": 2, "tokens": 16,
                "steps": 100_000, "trainer": False, "weights_every": 1},
    # every table, small segments, and a close after a few steps (kills land in close too)
    "mixed": {"opts": {"segment_bytes": 8192, "batch_rows": 5}, "per_step": 4, "tokens": 20,
              "steps": None, "trainer": True, "weights_every": 4},
}


def weights_of(version: int) -> dict[str, np.ndarray]:
    """The state dict of weight ``version``: a fixed base with one row changed per version."""
    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    w[version % 32] += np.float32(version)
    return {"w": w, "b": np.full(7, version, np.int64)}


def request_id(step: int, i: int) -> str:
    return f"s{step}-r{i}"


def write_run(root: str, scenario: str, seed: int, progress: str) -> None:
    """Write ``scenario`` into ``root``, appending ``<step>`` to ``progress`` after each flush."""
    from replay import Recorder

    sc = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    steps = sc["steps"] if sc["steps"] is not None else int(rng.integers(2, 12))
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"start {steps}\n".encode())
    rec = Recorder(root, run_config={"scenario": scenario, "seed": seed}, flush_interval_s=0.002,
                   **sc["opts"])
    n = sc["tokens"]
    for step in range(steps):
        rec.event("step_start", step=step)
        for i in range(sc["per_step"]):
            rid = request_id(step, i)
            rec.rollout(step=step, request_id=rid, prompt_ids=rng.integers(0, 1000, 8),
                        output_ids=rng.integers(0, 1000, n), logprobs=-rng.random(n).astype(np.float32),
                        token_versions=[step] * n, reward=float(i))
            if sc["trainer"]:
                rec.trainer(step=step, request_id=rid, logprobs=-rng.random(n), weight_version=step)
                rec.topk(step=step, request_id=rid, source="engine", ids=rng.integers(0, 1000, (n, 4)),
                         logprobs=-rng.random((n, 4)))
        if sc["trainer"]:
            rec.metrics(step=step, values={"loss": float(step), "clip_rate": 0.1})
        if sc["weights_every"] and step % sc["weights_every"] == 0:
            rec.weights(version=step, step=step, state_dict=weights_of(step), delta=step > 0)
        rec.event("step_end", step=step)
        rec.flush()
        os.write(fd, f"{step}\n".encode())
    rec.close()
    os.write(fd, b"closed\n")


# ---------------------------------------------------------------- the fork server

def serve() -> None:
    """Fork server loop: one JSON command per stdin line -> ``pid`` line, then ``exit <code>``."""
    import tempfile
    import threading

    with tempfile.TemporaryDirectory() as d:  # warm up: lazy imports and first-use costs, paid once
        write_run(f"{d}/warm", "mixed", 0, f"{d}/progress")
    assert threading.active_count() == 1, "a thread outlived the warm-up: forking would be unsafe"
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                write_run(cmd["root"], cmd["scenario"], cmd["seed"], cmd["progress"])
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"exit {os.waitstatus_to_exitcode(status)}\n")
        out.flush()


class LineProcess:
    """A helper process spoken to in lines: ``faultkit.<entry>()`` runs in it."""

    def __init__(self, entry: str, log: Path):
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import faultkit; faultkit.{entry}()"
        self._log = open(log, "wb")
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, bufsize=0)
        self._buf = b""
        assert self.readline(60) == "ready", f"{entry} did not start: {log.read_text()[-2000:]}"

    def readline(self, timeout: float) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no reply in {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the helper process died (exit {self.proc.wait()}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class ForkServer(LineProcess):
    """The parent's handle on the fork server process."""

    def __init__(self, log: Path):
        super().__init__("serve", log)

    def start(self, **cmd) -> int:
        self.send(cmd)
        kind, pid = self.readline(30).split()
        assert kind == "pid"
        return int(pid)

    def wait(self, timeout: float = 30) -> int:
        kind, code = self.readline(timeout).split()
        assert kind == "exit"
        return int(code)


# ---------------------------------------------------------------- the probe server

def probe(root: str, versions: list[int]) -> dict:
    """Everything a user does with a recording that may be damaged: doctor (read-only),
    open (salvaging), count every table and view, info, load each weight version.

    A :class:`~replay.errors.ReplayError` is an answer; any other exception is reported
    as ``unexpected`` with its traceback."""
    import duckdb

    from replay import open_recording
    from replay.store.doctor import doctor
    from replay.errors import ReplayError
    from replay.schema import TABLES

    out: dict = {"weights": {}}
    try:
        rep = doctor(root, repair=False)
        out["doctor"] = {"ok": rep["ok"], "problems": [p["reason"] for p in rep["problems"]]}
    except ReplayError as e:
        out["doctor"] = {"error": [type(e).__name__, e.title, str(e)]}
    try:
        with open_recording(root, salvage=True) as rec:
            out["counts"] = {}
            for t in (*TABLES, "tokens", "sequences", "step_metrics"):
                try:  # a query runs when fetched: its failures are DuckDB's own errors
                    out["counts"][t] = rec.sql(f"SELECT count(*) FROM (SELECT * FROM {t})").fetchall()[0][0]
                except duckdb.Error as e:
                    out["counts"][t] = ["duckdb.Error", type(e).__name__, str(e)]
            info = rec.info()
            out["salvage"], out["warnings"], out["status"] = info["salvage"], info["warnings"], info["status"]
            for v in versions:
                try:
                    rec.load_weights(v, framework="numpy")
                    out["weights"][v] = "ok"
                except ReplayError as e:
                    out["weights"][v] = [type(e).__name__, e.title, str(e)]
        out["open"] = "ok"
    except ReplayError as e:
        out["open"] = [type(e).__name__, e.title, str(e)]
    return out


def probe_server() -> None:
    """One JSON command per line (``{"root", "versions"}``) -> one JSON reply per line."""
    import replay.store.doctor  # noqa: F401
    import replay.read.recording  # noqa: F401

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = probe(cmd["root"], cmd["versions"])
        except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
            reply = {"unexpected": traceback.format_exc()}
        out.write(json.dumps(reply, default=str) + "\n")
        out.flush()


def read_progress(path: Path) -> tuple[int, int | None, bool]:
    """(steps the run meant to write, last step flushed or None, closed) from a side file."""
    total, last, closed = 0, None, False
    text = path.read_text() if path.exists() else ""
    for line in text.split("\n")[:-1]:  # a line without its newline is not a report
        if line.startswith("start"):
            total = int(line.split()[1])
        elif line == "closed":
            closed = True
        else:
            last = int(line)
    return total, last, closed
