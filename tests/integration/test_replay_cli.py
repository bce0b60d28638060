"""``replay rerun`` and ``replay bisect`` as a user runs them: reports and the documented JSON schema."""
from __future__ import annotations

import json
import shutil

import pytest

from replay.cli.main import main as cli_main
from replay.fixes import FIX_IDS


@pytest.fixture(scope="module")
def runs(demo_runs, tmp_path_factory):
    """A private copy of the demo's v1 and v0 recordings (the commands write replays into them)."""
    out = tmp_path_factory.mktemp("cli")
    for name in ("v1", "v0"):
        shutil.copytree(demo_runs[0] / name, out / name)
    return out


def run_json(capsys, *argv):
    code = cli_main([*map(str, argv), "--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_bisect_by_steps_names_the_onset_with_evidence(runs, capsys):
    res = run_json(capsys, "bisect", runs / "v1", "--against", runs / "v0", "--by", "steps")
    assert res["method"] == "cusum" and res["step"] is not None and res["step"] <= 1
    assert res["evidence"] and all("step" in row for row in res["evidence"])
    assert cli_main(["bisect", str(runs / "v1"), "--against", str(runs / "v1")]) == 0
    assert "onset: none" in capsys.readouterr().out


def test_bisect_by_fixes_at_the_onset_reports_a_minimal_set_and_the_ablation(runs, capsys):
    res = run_json(capsys, "bisect", runs / "v1", "--against", runs / "v0", "--by", "fixes")
    assert isinstance(res["step"], int) and set(res["fixes"]) <= set(FIX_IDS) and res["fixes"]
    assert res["explained"] is True and res["already_applied"] == [] and res["lacking"] == list(FIX_IDS)
    labels = {row["label"] for row in res["ablation"]}
    assert {"recorded config", *(f"only {f}" for f in FIX_IDS), *(f"all but {f}" for f in FIX_IDS),
            "all lacking fixes"} <= labels
    assert all({"fixes", "config_id", "mean_abs_residual", "direction", "at_floor"} <= set(row)
               for row in res["ablation"])
    rows = {row["label"]: row for row in res["ablation"]}
    minimal = next(r for r in res["ablation"] if r["fixes"] == res["fixes"])
    assert minimal["at_floor"] is True
    assert rows["recorded config"]["at_floor"] is False and rows["recorded config"]["direction"] == "same"
    assert rows["only processed_logprobs"]["direction"] == "down"


def test_bisect_by_tokens_and_layers_name_their_finding(runs, capsys):
    tok = run_json(capsys, "bisect", runs / "v1", "--by", "tokens", "--step", 1)
    assert tok["step"] == 1 and set(tok["token"]) >= {"request_id", "pos"}
    lay = run_json(capsys, "bisect", runs / "v1", "--by", "layers", "--step", 1, "--request",
                   tok["token"]["request_id"], "--pos", tok["token"]["pos"], "--fix", "fp32_lm_head")
    assert lay["layer"] == "lm_head" and lay["layers"][-1]["layer"] == "lm_head"
    assert cli_main(["bisect", str(runs / "v1"), "--by", "tokens", "--step", "1"]) == 0
    assert tok["token"]["request_id"] in capsys.readouterr().out


def test_rerun_batched_and_step_by_step_print_the_same_figures(runs, capsys):
    """Under V0 semantics (no prefix cache) consecutive steps share engine calls; the printed
    fidelity and metrics are those of one step per call, and the recorded v0 run replays exactly."""
    args = ["rerun", runs / "v1", "--step", "0-3", "--preset", "v0", "--no-write"]
    batched = run_json(capsys, *args)
    single = run_json(capsys, *args, "--batch", "1")
    assert [s["step"] for s in batched] == [0, 1, 2, 3]
    for a, b in zip(batched, single):
        assert a["replayed"] == b["replayed"] and a["recorded"] == b["recorded"]
        assert a["replayed"]["mean_abs_log_ratio"] < a["recorded"]["mean_abs_log_ratio"]
    fid = run_json(capsys, "rerun", runs / "v0", "--step", "0-2")
    assert all(s["fidelity"]["exact"] for s in fid)
    one = run_json(capsys, "rerun", runs / "v0", "--step", "1", "--no-write")   # --step N: one object
    assert one["step"] == 1 and one["fidelity"]["exact"]
    assert [s["step"] for s in run_json(capsys, "rerun", runs / "v0", "--step", "1-1", "--no-write")] == [1]
    assert cli_main(["rerun", str(runs / "v0"), "--step", "2", "--no-write"]) == 0
    out = capsys.readouterr()
    assert "exact" in out.out and "step 2 replayed" in out.err


def test_ctrl_c_stops_a_long_bisection_cleanly(runs, tmp_path):
    """SIGINT during ``bisect --by fixes``: exit 130 with a message, and every replay written before
    it is whole (all of the step's requests) in a recording that still opens."""
    import signal
    import subprocess
    import sys

    from replay import open_recording

    path = tmp_path / "v1"
    shutil.copytree(runs / "v1", path)
    # the child takes SIGINT's default whatever this process does with it (a CI runner may ignore it)
    proc = subprocess.Popen([sys.executable, "-m", "replay", "bisect", str(path), "--by", "fixes", "--step", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if sum("replaying step(s) 2 " in s for s in seen) == 3:   # two replays done and written
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + err
    assert "replay: interrupted" in err and "Traceback" not in err
    assert "already applied" not in out
    with open_recording(path) as rec:
        n_req = rec.sql("SELECT count(*) FROM rollouts WHERE step = 2").fetchall()[0][0]
        per_replay = rec.sql("SELECT replay_id, count(*) FROM replays WHERE step = 2 GROUP BY 1").fetchall()
    assert len(per_replay) >= 2 and all(n == n_req for _, n in per_replay)
