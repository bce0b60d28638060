"""A loop on vLLM's AsyncLLM (the CPU build), recorded through ``attach_async`` only: requests
run concurrently, join the running batch at different engine steps, and see a weight update
land while they are in flight, as in PipelineRL; later requests take a prefix-cache block
computed under older weights. A copy of the recording, its checkpoint deleted, replays every
recorded logprob exactly on vLLM.

The loop is this file's own (a tiny Llama, not the demo's pipeline or the example), run as a
script: AsyncLLM starts its engine core in another process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from replay import open_recording  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent('''
    import asyncio, sys
    import torch
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from replay.integrations.vllm import WORKER_EXTENSION, attach_async
    from replay.models import build_model, load_state_dict

    PREFIX = [1, 42, 14, *range(4, 14), 25, *range(26, 41), 14, 42, 14]   # one 32-token block

    async def main(out, model_dir):
        path = build_model(model_dir, "tiny", seed=4, arch="llama")
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(path), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=128,
            kv_cache_memory_bytes=256 * 2**20, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
            block_size=32, worker_extension_cls=WORKER_EXTENSION, disable_log_stats=True))
        run = await attach_async(engine, out, weight_update="paused")
        weights = load_state_dict(path)
        gen = torch.Generator().manual_seed(0)
        for step in range(2):
            started = asyncio.Event()
            def seen(out):   # the signal: some request has its third token
                if len(out.outputs[0].token_ids) >= 3:
                    started.set()
            with run.step(step):
                # ignore_eos: the sequences run on past the model's EOS, which the replay must too
                # the last request samples two completions (n=2)
                sps = [SamplingParams(temperature=0.9, max_tokens=32, logprobs=2, seed=3 + 10 * step + i,
                                      ignore_eos=True, n=2 if i == 3 else 1) for i in range(4)]
                tasks = [asyncio.create_task(run.generate(
                    {"prompt_token_ids": PREFIX + [35 + i, 14, 5 + step]}, sps[i], f"s{step}-r{i}", step=step,
                    reward=float(i), on_output=seen)) for i in range(4)]
                await started.wait()
                weights = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                           for k, v in weights.items()}
                await run.update_weights(step + 1, weights, step=step)   # requests in flight
                await asyncio.gather(*tasks)
        run.close()
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1], sys.argv[2]))
''')


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("async-loop")
    script = root / "loop.py"
    script.write_text(LOOP)
    proc = subprocess.run([sys.executable, str(script), str(root / "rec"), str(root / "model")],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_the_update_lands_in_flight_and_later_requests_hit_stale_blocks(recorded):
    with open_recording(recorded / "rec") as rec:
        rows = rec.sql("SELECT step, request_id, token_versions, num_cached_tokens FROM rollouts "
                       "ORDER BY step, request_id").fetchall()
        order = [r for (r,) in rec.sql("SELECT request_id FROM events WHERE kind = 'request_submitted' "
                                       "ORDER BY seq").fetchall()]
    assert [r[1] for r in rows] == sorted(order) and len(order) == 10
    assert {"s0-r3:0", "s0-r3:1", "s1-r3:0", "s1-r3:1"} <= set(order)
    for step, rid, versions, cached in rows:
        # every request saw both versions: the update landed while each was generating
        assert versions[0] == step and versions[-1] == step + 1, (rid, versions)
        assert versions == sorted(versions)
    # at step 1 every request took the instruction's block from the cache: KV of step 0's weights
    assert all(cached == 32 for step, _, _, cached in rows if step == 1), rows
    with open_recording(recorded / "rec") as rec:
        eos = rec.sql("SELECT count(*) FROM rollouts WHERE list_position(output_ids[:-1], 2) > 0").fetchall()[0][0]
    assert eos > 0   # some sequence went on past an EOS (id 2): a replay must not stop there


def test_a_copy_replays_every_logprob_exactly_on_vllm(recorded, tmp_path):
    moved = tmp_path / "elsewhere" / "rec"
    shutil.copytree(recorded / "rec", moved)
    check = subprocess.run([sys.executable, "-m", "replay", "check", str(moved), "--require", "rerun"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run([sys.executable, "-m", "replay", "rerun", str(moved), "--engine", "vllm", "--step",
                           "all", "--format", "json"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout)
    assert [s["step"] for s in steps] == [0, 1]
    assert all(s["fidelity"]["exact"] for s in steps), [s["fidelity"] for s in steps]
    for s in steps:
        hits = s["prefix_cache"]
        assert hits["recorded_tokens"] == hits["replayed_tokens"] and not hits["requests_differ"], hits
