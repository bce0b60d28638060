"""Engines in worker processes: the Arrow-IPC protocol over pipes, and every way a child
can fail (cannot start, killed, silent past the timeout, answers garbage) surfacing as
EngineError in the parent with the child's stderr."""
from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import replay
from replay.engines.base import GenRequest, ScoreRequest, WeightUpdate
from replay.engines.client import EngineClient
from replay.errors import BadInput, EngineError
from replay.fixes import EngineConfig

REPO = Path(replay.__file__).resolve().parent.parent
FAST_VLLM = {"ignore_eos": True, "kv_cache_memory_bytes": 64 * 2**20}


def _reqs(n=3, max_tokens=8, **kw):
    return [GenRequest(f"r{i}", [1, 5 + i, 6, 7], max_tokens=max_tokens, temperature=0.7, seed=i, **kw)
            for i in range(n)]


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not our child any more: already reaped, no zombie
    return False


@pytest.fixture(scope="module")
def vllm_worker(tiny_model):
    # A float32 body: the comparisons below check the protocol, not bf16 numerics, which
    # change with the batch's composition on CPUs with AMX bf16 kernels.
    client = EngineClient("vllm", tiny_model, EngineConfig(logprobs_mode="processed_logprobs", dtype="float32"),
                          engine_kwargs=FAST_VLLM, timeout=120)
    yield client
    client.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_worker_generates_scores_and_switches_versions(vllm_worker, trainer_side):
    info = vllm_worker.ping()
    assert info["pid"] == vllm_worker.pid != os.getpid()
    assert info["executable"] == sys.executable
    assert info["effective"]["logprobs_mode"] == "processed_logprobs"
    res = vllm_worker.generate(_reqs(num_topk=2))
    assert [r.request_id for r in res] == ["r0", "r1", "r2"]
    assert all(len(r.output_ids) == 8 and r.token_versions == [0] * 8 and len(r.topk_ids) == 8 for r in res)
    scored = vllm_worker.score([ScoreRequest(r.request_id, [1, 5 + i, 6, 7], r.output_ids, temperature=0.7)
                                for i, r in enumerate(res)])
    for g, s in zip(res, scored):
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-4)
    # A new version travels as safetensors bytes; an update mid-call switches back to 0.
    vllm_worker.load_weights(1, trainer_side.version_weights(1))
    assert vllm_worker.version == 1
    mixed = vllm_worker.generate(_reqs(), [WeightUpdate(0, 3)])
    assert vllm_worker.version == 0
    assert all(r.token_versions == [1, 1, 1, 0, 0, 0, 0, 0] for r in mixed)
    assert any(m.output_ids[:3] != r.output_ids[:3] for m, r in zip(mixed, res))
    # Teacher forcing crosses the wire too.
    assert vllm_worker.supports_forced_output
    forced = vllm_worker.generate([GenRequest("f", [1, 5, 6, 7], temperature=0.7, forced_output_ids=res[0].output_ids)])
    assert forced[0].output_ids == res[0].output_ids and forced[0].token_versions == [0] * 8
    np.testing.assert_allclose(forced[0].logprobs, res[0].logprobs, atol=1e-4)
    # Versions kept in the worker are switched without shipping weights again.
    vllm_worker.activate(1)
    assert vllm_worker.version == 1
    vllm_worker.reset_prefix_cache()
    vllm_worker.activate(0)
    assert [r.output_ids for r in vllm_worker.generate(_reqs(num_topk=2))] == [r.output_ids for r in res]
    # The engine's own errors cross the process boundary with their type.
    with pytest.raises(BadInput, match="twice"):
        vllm_worker.generate([GenRequest("x", [1, 5]), GenRequest("x", [1, 6])])
    assert vllm_worker.ping()["pid"] == info["pid"]


def test_worker_reports_a_start_up_failure_with_its_stderr(tmp_path):
    with pytest.raises(EngineError, match="failed to start") as err:
        EngineClient("reference", tmp_path / "no-model", EngineConfig(), device="cpu", start_timeout=120)
    assert "no-model" in str(err.value) and "worker stderr" in str(err.value)


def test_reference_worker_matches_the_in_process_engine_and_closes_cleanly(tiny_model):
    from replay.engines.reference.engine import ReferenceEngine

    local = ReferenceEngine(tiny_model, EngineConfig(), seed=0)
    expected = local.generate(_reqs(num_topk=3))
    client = EngineClient("reference", tiny_model, EngineConfig(), device="cpu")
    from replay.engines.base import Engine

    assert isinstance(client, Engine) and client.name == "reference" and client.versions == [0]
    assert client.effective == local.effective and client.supports_forced_output is True
    got = client.generate(_reqs(num_topk=3))
    for a, b in zip(got, expected):
        assert a.output_ids == b.output_ids and a.token_versions == b.token_versions
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
        assert a.topk_ids == b.topk_ids
    pid, proc = client.pid, client.process
    client.close()
    client.close()
    assert proc.returncode == 0 and _reaped(pid)
    with pytest.raises(EngineError, match="closed"):
        client.ping()


def test_killed_worker_raises_engine_error(tiny_model):
    client = EngineClient("reference", tiny_model, EngineConfig(), device="cpu")
    os.kill(client.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match=r"died.*exit code -9"):
        client.generate(_reqs())
    client.close()


def test_silent_worker_times_out_and_is_killed(tiny_model):
    client = EngineClient("reference", tiny_model, EngineConfig(), device="cpu", timeout=0.3, start_timeout=120)
    proc = client.process
    with pytest.raises(EngineError, match="within the timeout"):
        client.generate(_reqs(n=16, max_tokens=400))
    assert proc.poll() == -signal.SIGKILL
    with pytest.raises(EngineError, match="exit code -9"):
        client.ping()
    client.close()


def test_bad_interpreter_path_raises_engine_error(tiny_model, tmp_path):
    with pytest.raises(EngineError, match="cannot start"):
        EngineClient("reference", tiny_model, python=str(tmp_path / "no" / "python"))


def test_a_reply_that_is_not_a_protocol_message_raises_engine_error(tiny_model, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import struct, sys, time\n"
                    "sys.stderr.write('fake worker says hello\\n'); sys.stderr.flush()\n"
                    "sys.stdout.buffer.write(struct.pack('<Q', 5) + b'hello'); sys.stdout.flush()\n"
                    "time.sleep(60)\n")
    fake.chmod(0o755)
    with pytest.raises(EngineError, match="bad reply") as err:
        EngineClient("reference", tiny_model, python=str(fake), start_timeout=30)
    assert "fake worker says hello" in str(err.value)


def _venv(root: Path, with_replay: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)],
                   check=True, capture_output=True)
    python = root / "bin" / "python"
    if with_replay:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        # This venv's own packages would hold another vLLM; here it borrows the project's.
        lines = [str(REPO), *(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages())]
        (Path(purelib) / "replay_project.pth").write_text("\n".join(lines) + "\n")
    return python


def test_worker_runs_under_a_second_venv(tiny_model, tmp_path):
    python = _venv(tmp_path / "venv2", with_replay=True)
    with EngineClient("reference", tiny_model, EngineConfig(), python=str(python), device="cpu") as client:
        info = client.ping()
        assert info["executable"] == str(python) != sys.executable
        res = client.generate(_reqs(n=2, max_tokens=4))
        assert all(len(r.output_ids) == 4 for r in res)


def test_second_venv_without_the_project_fails_with_the_childs_error(tiny_model, tmp_path):
    python = _venv(tmp_path / "bare", with_replay=False)
    with pytest.raises(EngineError, match="No module named"):
        EngineClient("reference", tiny_model, python=str(python), start_timeout=60)


def test_a_message_naming_an_unknown_call_gets_an_error_naming_it_and_the_worker_goes_on(tiny_model):
    """The protocol's calls are an enum: a message naming another is answered with ``error``
    (its name quoted), and the next calls are served as usual."""
    import io

    import pyarrow as pa

    from replay.engines.reference.engine import ReferenceEngine
    from replay.engines.worker import Call, decode, encode, read_message, serve, write_message

    schema = pa.schema([]).with_metadata({b"replay.call": b"frobnicate", b"replay.meta": b"{}",
                                          b"replay.protocol": b"1"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
    inp, out = io.BytesIO(), io.BytesIO()
    for message in (sink.getvalue().to_pybytes(), encode(Call.PING), encode(Call.CLOSE)):
        write_message(inp, message)
    inp.seek(0)
    serve(ReferenceEngine(tiny_model, EngineConfig(), seed=0), "reference", inp, out)
    out.seek(0)
    replies = [decode(read_message(out)) for _ in range(4)]
    assert [call for call, _, _ in replies] == [Call.READY, Call.ERROR, Call.PING, Call.CLOSE]
    assert "'frobnicate'" in replies[1][1]["message"] and replies[2][1]["engine"] == "reference"
    assert read_message(out) is None
