"""The TUI's data layer and pure helpers: numbers equal the core's SQL views."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest

from replay import Recorder, open_recording
from tui.catalog import describe, find_recordings
from tui.data import Workspace
from tui.onset import OnsetRule, onset_by_rule
from tui.stepstats import fetch, step_metrics
from tui.widgets.plot import braille_rows, data_range, x_to_cell
from tui.widgets.tokens import BUCKET_BOUNDS, bucket, layout

from tui_fixtures import N_STEPS, ONSET_STEP

METRICS = ("n_tokens", "mean_abs_log_ratio", "kl_new_old", "clip_rate", "entropy", "reward")


def _view(path):
    with open_recording(path, salvage=False) as rec:
        cols = ", ".join(("step",) + METRICS)
        return rec.sql(f"SELECT {cols} FROM step_metrics ORDER BY step").to_arrow_table().to_pydict()


def _assert_same(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    for m in METRICS:
        assert got[m] == pytest.approx(want[m], rel=1e-9, abs=1e-12, nan_ok=True), m


def test_step_metrics_equal_the_sql_view_on_awkward_recordings(tmp_path):
    """Trainer rows out of order, scored twice, missing, shorter and longer than the rollout."""
    path = tmp_path / "awkward"
    rng = np.random.default_rng(7)
    with Recorder(path, run_id="awkward") as rec:
        seqs = []
        for step in (2, 0, 1):                       # steps out of order
            for i in range(5):
                n = int(rng.integers(3, 40))
                lp = -(0.1 + rng.gamma(2.0, 0.5, n)).astype(np.float32)
                rid = f"{step}-{i}"
                rec.rollout(step=step, request_id=rid, prompt_ids=[1, 2], output_ids=list(range(n)),
                            logprobs=lp, token_versions=[step] * n, reward=float(rng.random()))
                seqs.append((step, rid, lp))
        rng.shuffle(seqs)
        for k, (step, rid, lp) in enumerate(seqs):
            if k == 0:
                continue                              # never scored
            tlp = np.minimum(lp + rng.normal(0, 0.3, lp.size), -1e-3).astype(np.float32)
            if k == 1:
                tlp = tlp[:-2]                        # trainer saw fewer tokens
            if k == 2:
                tlp = np.append(tlp, -1.0).astype(np.float32)   # and more
            if k == 3:                                # scored twice: the later one counts
                rec.trainer(step=step, request_id=rid, logprobs=tlp - 5.0, entropy=np.ones(lp.size, np.float32))
                rec.flush()
            rec.trainer(step=step, request_id=rid, logprobs=tlp,
                        entropy=rng.uniform(0, 2, tlp.size).astype(np.float32) if k % 2 else None)
    with open_recording(path, salvage=False) as rec, rec.cursor() as cur:
        got = step_metrics(*fetch(cur, rec.names[0]))
    _assert_same(got, _view(path))


def test_step_metrics_equal_the_sql_view_on_the_test_runs(run_paths):
    run, ref = run_paths
    ws = Workspace(run, ref)
    try:
        tl = ws.timeline()
        with ws.cursor() as cur:
            _assert_same(step_metrics(*fetch(cur, "run")), _view(run))
            _assert_same(step_metrics(*fetch(cur, "ref")), _view(ref))
        assert tl.onset.step == ONSET_STEP and tl.onset.method == "rule"
        assert tl.steps == list(range(N_STEPS))
    finally:
        ws.close()


def test_sequences_and_tokens_equal_the_sql_views(run_paths):
    run, ref = run_paths
    ws = Workspace(run, ref)
    try:
        table = ws.sequences(ONSET_STEP)
        want = {r[0]: r[1:] for r in _sql(run, "SELECT request_id, n_tokens, mean_abs_log_ratio, "
                                               "max_abs_log_ratio, num_cached_tokens FROM sequences "
                                               "WHERE step = ?", [ONSET_STEP])}
        assert len(table.rows) == len(want)
        means = [row[2] for row in table.rows]
        assert means == sorted(means, reverse=True)
        for rid, n, mean_r, max_r, _reward, _versions, cached in table.rows:
            assert (n, cached) == (want[rid][0], want[rid][3])
            assert (mean_r, max_r) == (pytest.approx(want[rid][1]), pytest.approx(want[rid][2]))
        rid = table.rows[0][0]
        toks = ws.tokens(ONSET_STEP, rid)
        rows = _sql(run, "SELECT token_id, lp_rollout, lp_trainer, log_ratio, weight_version FROM tokens "
                         "WHERE step = ? AND request_id = ? ORDER BY pos", [ONSET_STEP, rid])
        assert toks.token_id == [r[0] for r in rows]
        assert toks.log_ratio == pytest.approx([r[3] for r in rows])
        assert toks.weight_version == [r[4] for r in rows]
        assert toks.boundaries() == [i for i in range(1, len(rows)) if rows[i][4] != rows[i - 1][4]]
    finally:
        ws.close()


def _sql(path, q, params=None):
    with open_recording(path, salvage=False) as rec:
        return rec.sql(q, params=params).fetchall()


def test_find_and_describe_recordings(recordings):
    (recordings / "notes").mkdir()
    found = find_recordings(recordings)
    assert [p.relative_to(recordings).as_posix() for p in found] == ["demo/v0", "demo/v1"]
    e = describe(found[1], recordings)
    assert (e.name, e.status, e.steps, e.run_id) == ("demo/v1", "complete", N_STEPS, "v1")
    assert e.tokens == _sql(found[1], "SELECT count(*) FROM tokens")[0][0] and e.nbytes > 0
    assert find_recordings(recordings / "demo" / "v0") == [recordings / "demo" / "v0"]


def test_onset_rule():
    ref = {"step": [0, 1, 2, 3], "mean_abs_log_ratio": [0.01, 0.02, 0.01, 0.01], "clip_rate": [0, 0.01, 0, 0]}
    run = {"step": [0, 1, 2, 3], "mean_abs_log_ratio": [0.01, 0.024, 0.05, 0.06], "clip_rate": [0, 0.0, 0.1, 0.2]}
    o = onset_by_rule(run, ref)
    assert o.step == 2 and o.evidence["mean_abs_log_ratio_threshold"] == pytest.approx(1.25 * 0.02 + 1e-3)
    # both metrics must exceed: |r| alone does not make an onset
    run_abs_only = dict(run, clip_rate=[0, 0, 0, 0])
    assert onset_by_rule(run_abs_only, ref).step is None
    assert onset_by_rule(run, None).step is None
    assert onset_by_rule(run, ref, OnsetRule(margin=1.5)).step == 3


def test_braille_plot_and_token_buckets():
    rows = braille_rows([[(0, 0.0), (1, 1.0)]], width=2, height=1)
    # a rising line over 2 cells x 4 dots: bottom-left dot set, top-right dot set
    assert rows[0][0][0] & 0x40 and rows[0][0][1] & 0x08
    assert data_range([[(5, 2.0)]]) == (5.0, 6.0, 1.8, 2.2)
    assert x_to_cell(0, 0, 10, 20) == 0 and x_to_cell(10, 0, 10, 20) == 19
    assert [bucket(x) for x in (0.0, 0.02, 0.07, 0.15, 0.3, 2.0, float("nan"))] == [0, 1, 2, 3, 4, 5, None]
    assert len(BUCKET_BOUNDS) == 5
    lines = layout(["10", "20", "30"], [0, 1, 2], [1, 1, 2], width=9)
    assert [[c.text for c in line] for line in lines] == [["10", "20"], ["┃v2", "30"]]


def test_replay_package_never_imports_textual_or_tui():
    code = ("import sys, replay, replay.cli.main; "
            "bad = [m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'tui'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # `replay --help` lists the UI's command through its entry point: tui.cli loads, Textual does not
    code = ("import sys, contextlib, io\nfrom replay.cli.main import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try: main(['--help'])\n    except SystemExit: pass\n"
            "print('tui' in out.getvalue() and 'tui.cli' in sys.modules and 'textual' not in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "True", res.stdout + res.stderr


def test_tui_command_parses_and_refuses_bad_paths(tmp_path):
    import argparse

    from replay.errors import BadInput
    from tui import cli as tui_cli
    parser = argparse.ArgumentParser()
    tui_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tui", "a/b", "--against", "c", "--root", "rec"])
    assert (str(args.path), str(args.against), str(args.root), args.func) == ("a/b", "c", "rec", tui_cli.run)
    args = parser.parse_args(["tui"])
    assert args.path is None and tui_cli.runs_root(args.path, args.root) == Path("recordings")
    # the runs screen lists the folder of the recording opened, not ./recordings
    run = tmp_path / "runs" / "a"
    assert tui_cli.runs_root(run, None) == (tmp_path / "runs").resolve()
    assert tui_cli.runs_root(run, Path("elsewhere")) == Path("elsewhere")
    with pytest.raises(BadInput, match="not a recording"):
        tui_cli.run(parser.parse_args(["tui", str(tmp_path)]))
    with pytest.raises(BadInput, match="needs a PATH"):
        tui_cli.run(parser.parse_args(["tui", "--against", str(tmp_path)]))
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "manifest.json").write_text("{}")
    with pytest.raises(BadInput, match="not a model folder"):
        tui_cli.run(parser.parse_args(["tui", str(rec), "--model", str(tmp_path)]))


def test_replay_tui_command_reports_a_bad_path_and_exits_1(tmp_path):
    exe = [sys.executable, "-m", "replay"]
    res = subprocess.run(exe + ["tui", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "is not a recording" in res.stderr and "Traceback" not in res.stderr


def test_describe_tells_a_live_writer_from_a_dead_one(tmp_path):
    live = tmp_path / "live"
    rec = Recorder(live, run_id="live")
    try:
        rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[2, 3], logprobs=[-0.5, -0.6])
        rec.flush()
        assert describe(live, tmp_path).status == "recording"
    finally:
        rec.close()
    assert describe(live, tmp_path).status == "complete"
    dead = tmp_path / "dead"
    code = ("import os; from replay import Recorder; r = Recorder(%r, run_id='dead'); "
            "r.rollout(step=0, request_id='a', prompt_ids=[1], output_ids=[2], logprobs=[-0.5]); "
            "r.flush(); os._exit(0)" % str(dead))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert describe(dead, tmp_path).status.startswith("recording (writer gone")
