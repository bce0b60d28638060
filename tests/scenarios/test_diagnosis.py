"""``replay diagnose`` on recordings it has never seen: one known cause each (scenario_loop.py).

Every scenario must get its verdict exactly: the backend faults their fix set (searched
among the fixes the recording lacks), the trainer faults their hypothesis, the clean
runs "clean", and the causes nothing models "unexplained". The same scenarios feed
``benchmarks/diagnosis.py``'s confusion table.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import scenario_loop as L
from replay.fixes import FIX_IDS, PRESETS

SCENARIOS = L.scenarios()


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return L.build_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def recorded(llama, tmp_path_factory):
    """Every scenario recorded once: name -> recording folder."""
    out = tmp_path_factory.mktemp("scenarios")
    return {sc.name: L.record(sc, llama, out) for sc in SCENARIOS}


@pytest.fixture(scope="session")
def diagnosed(recorded):
    """name -> diagnose() result (written into the recording, as the CLI does)."""
    from replay.diagnose import diagnose

    return {name: diagnose(path) for name, path in recorded.items()}


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_gets_its_verdict(sc, diagnosed):
    res = diagnosed[sc.name]
    assert res["verdict"] == sc.verdict, res["summary"]
    back, tr = res["backend"], res["trainer"]
    if sc.verdict == "backend":
        assert tuple(back["fixes"]) in sc.fix_sets
        others = [s for s in sc.fix_sets if s != tuple(back["fixes"])]
        assert [tuple(a["fixes"]) for a in back["alternatives"]] == others
        assert back["explained"] is True and back["fidelity"]["exact"]
        # the search ran over what the recording lacks, and says what it had
        assert back["already_applied"] == [f for f in FIX_IDS if f not in sc.faults]
        assert back["lacking"] == [f for f in FIX_IDS if f in sc.faults]
        assert back["residual"]["at_floor"] is True
        rows = {a["label"]: a for a in back["ablation"]}
        assert rows["recorded config"]["at_floor"] is False
        assert all(a["direction"] in ("down", "up", "same") for a in back["ablation"])
        assert tr["explained"] is True and tr["causes"] == []
    if sc.verdict == "trainer":
        assert tr["causes"] == list(sc.causes) and tr["explained"] is True
        assert back["off_floor"] is False
        named = next(h for h in tr["hypotheses"] if h["id"] == sc.causes[0]) if tr["hypotheses"] else None
        if named is not None:
            assert named["at_floor"] is True
    if sc.verdict == "clean":   # also an unpaused update without async scheduling: the same bits as paused
        assert back["off_floor"] is False and tr["off_floor"] is False and tr["causes"] == []
    if sc.verdict == "unexplained":
        assert back["explained"] is False or tr["explained"] is False
        assert back["fixes"] == [] and tr["causes"] == []


def test_trainer_estimates_name_what_was_wrong(diagnosed):
    """The estimated parameters of the named hypotheses are the scenario's."""
    def detail(name, hid):
        return next(h for h in diagnosed[name]["trainer"]["hypotheses"] if h["id"] == hid)["detail"]

    assert detail("trainer:temperature", "temperature")["temperature"] == pytest.approx(1.0, abs=1e-3)
    assert detail("trainer:truncation", "truncation") == {"top_k": -1, "top_p": 0.95,
                                                         "sampler": [{"top_k": -1, "top_p": pytest.approx(0.9)}]}
    assert detail("trainer:position_shift", "position_shift")["shift"] == 1
    assert detail("trainer:stale_version", "stale_version")["version_offset"] == -1
    assert detail("trainer:loss_mask", "loss_mask")["extra_values"] == len(L.PREFIX) + 3 - 1


def test_semantics_and_lag_are_named_with_their_size(recorded, diagnosed):
    """The loop's trainer does not renormalise over top-p: a deliberate difference, named with its
    size (log of the nucleus mass, so negative). Lag is zero exactly on sequences generated wholly
    by the trainer's own version, and there elsewhere."""
    from replay import open_recording

    res = diagnosed["clean"]
    sem = res["trainer"]["semantics"]
    assert sem["name"] == "untruncated" and sem["mean"] < -1e-3
    assert res["components"]["lag"]["mean_abs"] > 1e-3 and res["components"]["lag"]["tokens_with_lag"] > 0
    with open_recording(recorded["clean"]) as rec:
        own, other = rec.sql("""
            SELECT count(*) FILTER (WHERE lag <> 0 AND own), count(*) FILTER (WHERE lag <> 0 AND NOT own)
            FROM (SELECT t.lag, list_distinct(r.token_versions) = [t.trainer_version] AS own
                  FROM tokens t JOIN rollouts r USING (step, request_id))""").fetchall()[0]
    assert own == 0 and other > 0


def test_identity_holds_per_token_in_the_tokens_view(recorded, diagnosed):
    """r = e_trainer + lag + semantics - e_backend, exactly, for every token the reference scored."""
    from replay import open_recording

    # Tokens a component puts at +-inf (outside the reference's support: stale KV or async lag made
    # the engine sample from another distribution) are left out; a clean run has next to none.
    for name, share in (("backend:processed_logprobs+v0_runtime_defaults", 0.5), ("trainer:temperature", 0.95),
                        ("clean", 0.95)):
        with open_recording(recorded[name]) as rec:
            n, n_ref, worst = rec.sql("""
                SELECT count(*), count(lp_ref),
                       max(abs(log_ratio - (e_trainer + lag + semantics - e_backend)))
                FROM tokens WHERE isfinite(e_backend) AND isfinite(semantics) AND isfinite(lag)
                                  AND isfinite(e_trainer)""").fetchall()[0]
            total = rec.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
        assert n == n_ref and n > share * total
        assert worst < 1e-9


def test_reference_is_stored_once_and_reused(recorded, diagnosed):
    from replay.diagnose import diagnose
    from replay.diagnose.reference import reference_scores

    path = recorded["backend:fp32_lm_head"]
    again = reference_scores(path)
    assert again.scored == 0 and len(again.seqs) == diagnosed["backend:fp32_lm_head"]["scoring"]["sequences"]
    res = diagnose(path, write=False)
    assert res["scoring"]["sequences_scored"] == 0
    assert res["verdict"] == "backend" and res["backend"]["fixes"] == ["fp32_lm_head"]


def test_diagnose_cli_json_is_the_documented_api(recorded, tmp_path):
    path = recorded["backend:processed_logprobs"]
    report = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "replay", "diagnose", str(path), "--format", "json",
                           "--report", str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(res) >= {"verdict", "floor", "steps", "onset_step", "components", "backend", "trainer", "tokens",
                        "layer"}
    assert set(res["components"]) >= {"backend", "semantics", "lag", "trainer"}
    assert set(res["backend"]) >= {"explained", "fixes", "already_applied", "residual", "fidelity", "ablation"}
    assert set(res["trainer"]) >= {"explained", "causes", "semantics", "residual"}
    assert res["verdict"] == "backend" and res["backend"]["fixes"] == ["processed_logprobs"]
    assert isinstance(res["floor"], float) and res["floor"] > 0
    tok = res["tokens"][0]
    assert set(tok) >= {"step", "request_id", "pos", "component", "value", "version_boundary", "num_cached_tokens",
                        "lag"} and tok["component"] == "backend"
    html = report.read_text()
    assert "semantic layer" in html and "data:image/png;base64," in html
    assert (tmp_path / "r-components.png").stat().st_size > 1000


def test_diagnose_cli_table_leads_with_the_verdict(recorded):
    proc = subprocess.run([sys.executable, "-m", "replay", "diagnose", str(recorded["trainer:lm_head_dtype"]),
                           "--no-write"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("verdict: trainer") and "lm_head_dtype" in first
    for section in ("semantic layer", "inference path", "objective", "policy lag"):
        assert section in proc.stdout


def test_without_stored_weights_it_says_what_it_can_still_tell(llama, tmp_path):
    """A recording of the weights' hashes only: a clear error naming the versions, exit 1."""
    from replay import Recorder

    path = tmp_path / "no-weights"
    with Recorder(path, run_config={"model": str(llama), "engine": {"config": PRESETS["v0"].to_dict()}}) as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1, 5, 6], output_ids=[7, 8], logprobs=[-0.5, -0.7],
                    token_versions=[3, 3], temperature=0.8, top_p=0.9)
        rec.trainer(step=0, request_id="a", weight_version=3, logprobs=[-0.4, -0.6])
    proc = subprocess.run([sys.executable, "-m", "replay", "diagnose", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "no weights for version(s) 3" in err and "step_metrics" in err and "rec.weights(" in err


def test_without_trainer_rows_the_backend_is_still_diagnosed(llama, tmp_path):
    """Rollouts and weights but no trainer rows: the backend verdict stands, the trainer's says why not."""
    from replay.diagnose import diagnose

    sc = L.Scenario("no-trainer", faults=("fp32_lm_head",), verdict="backend")
    path = L.record(sc, llama, tmp_path)
    import shutil

    from replay.store.manifest import update_manifest

    shutil.rmtree(path / "trainer")   # as if the trainer never wrote: no files, no entries

    def change(man):
        for entry in man["ranks"].values():
            entry.get("segments", {}).pop("trainer", None)
    update_manifest(path, change)
    res = diagnose(path, write=False)
    assert res["verdict"] == "backend" and res["backend"]["fixes"] == ["fp32_lm_head"]
    assert res["trainer"]["explained"] is None and "trainer rows" in res["trainer"]["reason"]
    assert np.isnan(res["components"]["trainer"]["mean"])
    assert res["untested"] == ["trainer"] and "trainer not tested" in res["summary"]


def test_bisect_is_a_view_of_the_diagnosis(recorded):
    """Without a reference run, bisect --by steps finds where the backend leaves the floor; --by
    tokens ranks that component and points at or after the version boundary; --by fixes names the
    fault at that step."""
    from replay.diagnose.bisect import bisect_fixes, bisect_steps, bisect_tokens

    lag = next(sc for sc in SCENARIOS if sc.async_only)
    path = recorded[lag.name]
    st = bisect_steps(path)
    assert st["method"] == "components" and st["component"] == "backend" and st["step"] == 1
    from replay import open_recording

    with open_recording(path) as rec:   # a step whose update lands after some tokens: a boundary inside
        mid = rec.sql("SELECT min(step) FROM events WHERE kind = 'weights_update_start' "
                      "AND CAST(detail->>'after_step' AS INTEGER) > 0").fetchall()[0][0]
    tok = bisect_tokens(path, mid)
    assert tok["component"] == "backend" and tok["flagged"] > 0
    assert tok["with_boundary"] > 0 and tok["at_or_after_boundary"] == tok["with_boundary"]
    assert tuple(bisect_fixes(path, st["step"], write=False)["fixes"]) in lag.fix_sets
    tr = bisect_steps(recorded["trainer:stale_version"])
    assert tr["component"] == "trainer" and tr["step"] == 1   # step 0's "older" weights are the same
    assert bisect_tokens(recorded["trainer:stale_version"], 1)["component"] == "trainer"
    assert bisect_steps(recorded["clean"])["step"] is None


def test_one_version_only_has_no_lag_and_still_gets_a_verdict(llama, tmp_path):
    """A single step: every token and the trainer on version 0. No lag; the fault is still named."""
    from replay.diagnose import diagnose

    path = L.record(L.Scenario("one-step", faults=("processed_logprobs",), verdict="backend"), llama, tmp_path,
                    steps=1)
    res = diagnose(path, write=False)
    assert res["steps"] == [0] and res["components"]["lag"]["mean_abs"] == 0.0
    assert res["components"]["lag"]["tokens_with_lag"] == 0
    assert res["verdict"] == "backend" and res["backend"]["fixes"] == ["processed_logprobs"]


def test_markdown_report_links_its_plots(diagnosed, tmp_path):
    from replay.diagnose.report import write_report
    from replay.errors import BadInput

    files = write_report(diagnosed["trainer:temperature"], tmp_path / "rep" / "t.md")
    md = (tmp_path / "rep" / "t.md").read_text()
    assert files[0].name == "t.md" and all(f.exists() for f in files)
    assert "## objective" in md and "named: temperature" in md and "![t-components](t-components.png)" in md
    with pytest.raises(BadInput, match=r"\.md or \.html"):
        write_report(diagnosed["clean"], tmp_path / "t.pdf")


def test_a_window_that_misses_the_error_names_no_fix(recorded):
    """Replaying only a step where the fault does not show (no update at step 0, so a concurrent
    update cannot matter there) must not come out "explained by no fix": it says the window missed."""
    from replay.diagnose import diagnose

    lag = next(sc for sc in SCENARIOS if sc.async_only)
    res = diagnose(recorded[lag.name], window=[0], write=False)
    assert res["verdict"] == "unexplained" and res["backend"]["explained"] is None
    assert res["backend"]["fixes"] == [] and "--window" in res["backend"]["reason"]


def test_stored_reference_is_not_reused_for_another_floor_dtype(recorded):
    """The floor belongs to a dtype: asking for another one recomputes, never reuses the stored floor."""
    from replay.diagnose.reference import reference_scores

    path = recorded["trainer:position_shift"]
    fp32 = reference_scores(path)
    bf16 = reference_scores(path, dtype="bfloat16", write=False)
    assert bf16.scored == len(bf16.seqs) and bf16.body_dtype == "bfloat16"
    f32 = np.concatenate([s.floor for s in fp32.seqs if s.floor is not None])
    f16 = np.concatenate([s.floor for s in bf16.seqs if s.floor is not None])
    assert np.median(f16[np.isfinite(f16)]) > 100 * np.median(f32[np.isfinite(f32)])
    assert reference_scores(path, write=False).scored == 0   # the float32 rows still serve


def test_one_step_does_not_change_the_runs_trainer_semantics(recorded):
    from replay.diagnose.reference import reference_scores

    path = recorded["clean"]
    whole = reference_scores(path)
    one = reference_scores(path, [2])
    assert whole.trainer_semantics == one.trainer_semantics == "untruncated"


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda:7"], "device"),
    (["--device", "nonsense"], "device"),
])
def test_bad_device_is_one_line(recorded, extra, message):
    proc = subprocess.run([sys.executable, "-m", "replay", "diagnose", str(recorded["clean"]), "--no-write",
                           "--dtype", "float16", *extra], capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err and "Traceback" not in proc.stderr
    assert err[-1].startswith("replay: bad input:") and message in err[-1]


def test_weights_of_another_model_are_one_line(recorded, tmp_path):
    """--model pointing at a checkpoint the recorded weights do not fit (a Qwen2, not the Llama)."""
    from replay.models import build_model

    other = build_model(tmp_path / "qwen", size="tiny", seed=0)
    proc = subprocess.run([sys.executable, "-m", "replay", "diagnose", str(recorded["clean"]), "--no-write",
                           "--dtype", "float16", "--model", str(other)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "does not fit" in proc.stderr.strip().splitlines()[-1]

