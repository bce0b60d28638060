"""Fixtures shared by every test folder: one short real demo run, recorded once per session."""
from __future__ import annotations

import pytest

DEMO_STEPS = 6
DEMO_RUNS = ["v0", "v1", "v1+fixes", "v1+processed_logprobs", "v1+fp32_lm_head"]


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """``(out_dir, summary, runs, steps)`` of a short demo on the reference engine: the runs above plus
    v0 under two more seeds (the spread), ``DEMO_STEPS`` steps each."""
    from replay.demo import runner

    out = tmp_path_factory.mktemp("demo")
    summary = runner.main(out=str(out), steps=DEMO_STEPS, runs=DEMO_RUNS, jobs=2)
    return out, summary, DEMO_RUNS, DEMO_STEPS
