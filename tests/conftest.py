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


@pytest.fixture
def relist():
    """``relist(seg)``: record a closed segment the test rewrote (rows, bytes, sha256) in its
    recording's manifest, as its writer would have, so that readers take it as intact."""
    import pyarrow.ipc as ipc

    from replay.store.manifest import update_manifest
    from replay.store.manifest import rank_entries
    from replay.store.segments import sha256_file

    def run(seg):
        root = seg.parents[2]
        rel = f"{seg.parents[1].name}/{seg.parent.name}/{seg.name}"
        rows = ipc.open_file(str(seg)).read_all().num_rows
        rank = int(seg.parent.name.split("-")[1])

        def change(man):
            key, entry = rank_entries(man).get(rank, (str(rank), None))
            if entry is None:  # a rank the test adds: a writer that finished
                entry = man["ranks"][key] = {"status": "complete", "segments": {}}
            segs = entry.setdefault("segments", {}).setdefault(seg.parents[1].name, [])
            segs[:] = [s for s in segs if s.get("path") != rel]
            segs.append({"path": rel, "rows": rows, "bytes": seg.stat().st_size, "sha256": sha256_file(seg)})
        update_manifest(root, change)
    return run
