"""Bad input at every public entry point, and the documented outcome of each.

* Recorder methods: strict mode raises :class:`~replay.errors.BadInput` naming the
  field (and the step and request when they are readable); lenient mode writes one
  ``rejects`` row with the table, field and reason, keeps the good rows around it and
  never raises.
* The command line: exit 2 and a usage message for bad usage; exit 1 and one line
  ``replay: <title>: <message>`` for data errors; never a traceback.
* Importers: a :class:`~replay.errors.BadInput` naming the file, the row and the
  field, and no half-written recording left behind.

Documented choices the matrix pins down: NaN / inf rewards and advantages are stored
as given (a missing reward is a real value in RL logs; only per-token logprobs and
entropies must be finite); a trainer row may repeat a (step, request) (a re-score:
the ``tokens`` view takes the latest); ``rerun --step abc`` is a data error (exit 1,
the step list is parsed after the arguments).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replay import Recorder, open_recording
from replay.cli.main import main as cli_main
from replay.errors import BadInput, ReplayError
from replay.integrations.importers import import_any

pytestmark = pytest.mark.timeout(120)

NAN, INF = float("nan"), float("inf")

GOOD = {
    "event": dict(kind="step_start", step=1),
    "rollout": dict(step=1, request_id="r", prompt_ids=[1, 2], output_ids=[3, 4], logprobs=[-0.1, -0.2]),
    "trainer": dict(step=1, request_id="r", logprobs=[-0.1, -0.2]),
    "topk": dict(step=1, request_id="r", source="engine", ids=[[1, 2], [3, 4]],
                 logprobs=[[-0.1, -0.2], [-0.3, -0.4]]),
    "metrics": dict(step=1, values={"loss": 0.5}),
    "weights": dict(version=1, step=1, state_dict={"w": np.zeros(3, np.float32)}),
}
TABLE = {"event": "events", "rollout": "rollouts", "trainer": "trainer", "topk": "topk",
         "metrics": "metrics", "weights": "weights"}

# (method, fields that replace the good ones, the field the error must name)
BAD = [
    ("event", dict(kind=None), "kind"),
    ("event", dict(kind=""), "kind"),
    ("event", dict(kind=3), "kind"),
    ("event", dict(step=-3), "step"),
    ("event", dict(step="1"), "step"),
    ("event", dict(weight_version="v2"), "weight_version"),
    ("event", dict(request_id=7), "request_id"),
    ("rollout", dict(step=None), "step"),
    ("rollout", dict(step=-1), "step"),
    ("rollout", dict(step=1.5), "step"),
    ("rollout", dict(step="1"), "step"),
    ("rollout", dict(step=True), "step"),
    ("rollout", dict(request_id=None), "request_id"),
    ("rollout", dict(request_id=""), "request_id"),
    ("rollout", dict(request_id=5), "request_id"),
    ("rollout", dict(output_ids=None), "output_ids"),
    ("rollout", dict(output_ids=[1.5, 2.5]), "output_ids"),
    ("rollout", dict(output_ids=np.array([1.0, 2.0])), "output_ids"),
    ("rollout", dict(output_ids=["a", "b"]), "output_ids"),
    ("rollout", dict(output_ids=[[1, 2], [3, 4]]), "output_ids"),
    ("rollout", dict(output_ids=[2 ** 31, 1]), "output_ids"),
    ("rollout", dict(output_ids=np.array([2 ** 40, 1], np.int64)), "output_ids"),
    ("rollout", dict(output_ids=[-1, 2]), "output_ids"),
    ("rollout", dict(output_ids="34"), "output_ids"),
    ("rollout", dict(prompt_ids=[2 ** 40]), "prompt_ids"),
    ("rollout", dict(prompt_ids=None), "prompt_ids"),
    ("rollout", dict(logprobs=None), "logprobs"),
    ("rollout", dict(logprobs=[NAN, -1.0]), "logprobs"),
    ("rollout", dict(logprobs=[INF, -1.0]), "logprobs"),
    ("rollout", dict(logprobs=[-INF, -1.0]), "logprobs"),
    ("rollout", dict(logprobs=[0.5, -1.0]), "logprobs"),
    ("rollout", dict(logprobs=[-1.0]), "logprobs"),
    ("rollout", dict(logprobs=np.zeros((2, 1))), "logprobs"),
    ("rollout", dict(logprobs=["x", "y"]), "logprobs"),
    ("rollout", dict(token_versions=[1]), "token_versions"),
    ("rollout", dict(token_versions=[0.5, 1.5]), "token_versions"),
    ("rollout", dict(reward="high"), "reward"),
    ("rollout", dict(temperature="hot"), "temperature"),
    ("rollout", dict(top_k=1.5), "top_k"),
    ("rollout", dict(seed="x"), "seed"),
    ("rollout", dict(num_cached_tokens=-1), "num_cached_tokens"),
    ("rollout", dict(group_id=3), "group_id"),
    ("trainer", dict(logprobs=[NAN, -1.0]), "logprobs"),
    ("trainer", dict(logprobs=None), "logprobs"),
    ("trainer", dict(entropy=[INF, 1.0]), "entropy"),
    ("trainer", dict(entropy=[1.0]), "entropy"),
    ("trainer", dict(advantage="x"), "advantage"),
    ("trainer", dict(weight_version="x"), "weight_version"),
    ("trainer", dict(step=-2), "step"),
    ("topk", dict(source="bogus"), "source"),
    ("topk", dict(source=None), "source"),
    ("topk", dict(ids=[1, 2]), "ids"),
    ("topk", dict(ids=[[2 ** 33, 1], [1, 2]]), "ids"),
    ("topk", dict(ids=[[-1, 1], [1, 2]]), "ids"),
    ("topk", dict(logprobs=[[-0.1], [-0.2]]), "logprobs"),
    ("topk", dict(logprobs=[[NAN, -0.2], [-0.3, -0.4]]), "logprobs"),
    ("topk", dict(logprobs=[[INF, -0.2], [-0.3, -0.4]]), "logprobs"),
    ("topk", dict(positions=[0]), "positions"),
    ("topk", dict(positions=[0, -1]), "positions"),
    ("metrics", dict(values={}), "values"),
    ("metrics", dict(values="loss"), "values"),
    ("metrics", dict(values={"": 1.0}), "values"),
    ("metrics", dict(values={1: 2.0}), "values"),
    ("metrics", dict(values={"loss": "x"}), "values"),
    ("metrics", dict(values={"loss": [1.0, 2.0]}), "values"),
    ("metrics", dict(step=-1), "step"),
    ("weights", dict(state_dict="x"), "state_dict"),
    ("weights", dict(state_dict={"w": "not an array"}), "state_dict"),
    ("weights", dict(state_dict={"w": np.array(["a"])}), "state_dict"),
    ("weights", dict(state_dict={3: np.zeros(2)}), "state_dict"),
    ("weights", dict(state_dict=None), "state_dict"),
    ("weights", dict(version=-1), "version"),
    ("weights", dict(version=None), "version"),
    ("weights", dict(state_dict=None, sha256="abc", version=2), None),  # a hash-only record: sha256 is free text
]


def _case_id(case) -> str:
    method, over, field = case
    text = ",".join(f"{k}={v!r}"[:30] for k, v in over.items())
    return f"{method}-{text}"


def _call(rec: Recorder, method: str, over: dict):
    kwargs = {**GOOD[method], **over}
    if method == "event":
        kind = kwargs.pop("kind")
        return rec.event(kind, **kwargs)
    return getattr(rec, method)(**kwargs)


STRICT_BAD = [c for c in BAD if c[2] is not None]


@pytest.mark.parametrize("case", STRICT_BAD, ids=[_case_id(c) for c in STRICT_BAD])
def test_strict_raises_bad_input_naming_the_field(tmp_path, faults, case):
    method, over, field = case
    with Recorder(tmp_path / "r", strict=True) as rec:
        with pytest.raises(BadInput) as e:
            _call(rec, method, over)
        assert e.value.field == field, (e.value.field, str(e.value))
        step = {**GOOD[method], **over}.get("step")
        if type(step) is int and step >= 0:
            assert e.value.step == step
        rid = {**GOOD[method], **over}.get("request_id")
        if isinstance(rid, str) and rid and method != "event":
            assert e.value.request_id == rid
        assert f"field={field}" in str(e.value)
        _call(rec, method, {})  # the recorder still works
    faults.add(faults=1)


@pytest.fixture(scope="module")
def lenient_run(tmp_path_factory):
    """Every bad call of the matrix in one lenient recorder, each between two good calls."""
    root = tmp_path_factory.mktemp("lenient") / "r"
    returned = []
    with Recorder(root, strict=False) as rec:
        for k, (method, over, field) in enumerate(STRICT_BAD):
            step = 10 * k
            good = {"step": step} if "step" in GOOD[method] else {}
            if method == "weights":
                good = {"version": 10 * k, "step": step, "state_dict": {"w": np.full(3, k, np.float32)}}
            bad_over = {**good, **over}
            if "request_id" in GOOD[method]:
                good = {**good, "request_id": f"good-{k}-a"}
                bad_over = {"request_id": f"bad-{k}", **bad_over}
            returned.append(_call(rec, method, good))
            returned.append(_call(rec, method, bad_over))
            good_b = dict(good, **({"request_id": f"good-{k}-b"} if "request_id" in good else {}))
            if method == "weights":
                good_b = {**good_b, "version": 10 * k + 1, "state_dict": {"w": np.full(3, -k, np.float32)}}
            elif "step" in good_b:
                good_b["step"] = step + 1
            returned.append(_call(rec, method, good_b))
    stats = rec.stats()  # after close: every batch validated and written
    with open_recording(root) as r:
        rejects = r.sql("SELECT \"table\", field, reason, step, request_id, row FROM rejects").fetchall()
        counts = {t: r.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in set(TABLE.values())}
    return rejects, counts, stats


def test_lenient_sends_each_bad_call_to_rejects_and_keeps_the_good_ones(lenient_run, faults):
    rejects, counts, stats = lenient_run
    assert stats["errors"] == 0 and stats["rejects"] == len(STRICT_BAD)
    assert len(rejects) == len(STRICT_BAD)
    by_table: dict[str, int] = {}
    for method, _, _ in STRICT_BAD:
        by_table[TABLE[method]] = by_table.get(TABLE[method], 0) + 1
    got = sorted((t, f) for t, f, *_ in rejects)
    want = sorted((TABLE[m], f) for m, _, f in STRICT_BAD)
    assert got == want
    for table, field, reason, step, rid, row in rejects:
        assert reason and json.loads(row) is not None
    # each rejects row names the request of the bad call (where it gave a usable one)
    named = [f"bad-{k}" for k, (m, over, _) in enumerate(STRICT_BAD)
             if "request_id" in GOOD[m] and "request_id" not in over]
    assert sorted(rid for *_, rid, _ in rejects if rid) == sorted(named)  # "" and 5: the bad ids themselves
    # two good calls around each bad one, all kept (metrics: one row per value; topk: one per position)
    assert counts["events"] == 2 * by_table["events"]
    assert counts["rollouts"] == 2 * by_table["rollouts"]
    assert counts["trainer"] == 2 * by_table["trainer"]
    assert counts["topk"] == 2 * 2 * by_table["topk"]
    assert counts["metrics"] == 2 * by_table["metrics"]
    assert counts["weights"] == 2 * by_table["weights"]
    faults.add(trials=len(STRICT_BAD), faults=len(rejects))


UNICODE_IDS = ["请求-1", "🚀 rocket", "e\u0301t\u00e9", "ñ/\\\"quote'", "tab\there", "line\nbreak",
               "\u200b zero-width", "x" * 2000, "🙂" * 50]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_unicode_request_ids_round_trip(tmp_path, strict):
    with Recorder(tmp_path / "u", strict=strict) as rec:
        for i, rid in enumerate(UNICODE_IDS):
            rec.rollout(step=1, request_id=rid, prompt_ids=[1], output_ids=[i, i + 1], logprobs=[-1.0, -2.0])
            rec.trainer(step=1, request_id=rid, logprobs=[-1.5, -2.5])
            rec.event("request_finished", step=1, request_id=rid, note=rid)
        assert rec.stats()["rejects"] == 0
    with open_recording(tmp_path / "u") as r:
        got = sorted(x[0] for x in r.sql("SELECT request_id FROM rollouts").fetchall())
        assert got == sorted(UNICODE_IDS)
        joined = r.sql("SELECT request_id, count(lp_trainer) FROM tokens GROUP BY 1").fetchall()
        assert sorted(joined) == sorted((rid, 2) for rid in UNICODE_IDS)
        notes = [json.loads(d)["note"] for (d,) in r.sql("SELECT detail FROM events").fetchall()]
        assert sorted(notes) == sorted(UNICODE_IDS)
        rid = UNICODE_IDS[1]
        assert r.sql("SELECT count(*) FROM rollouts WHERE request_id = ?", [rid]).fetchall()[0][0] == 1


def test_duplicates_and_steps_going_back(tmp_path):
    row = dict(prompt_ids=[1], output_ids=[2], logprobs=[-1.0])
    with Recorder(tmp_path / "s", strict=True) as rec:
        rec.rollout(step=2, request_id="dup", **row)
        with pytest.raises(BadInput) as e:
            rec.rollout(step=2, request_id="dup", **row)
        assert e.value.field == "request_id" and e.value.step == 2 and e.value.request_id == "dup"
        with pytest.raises(BadInput) as e:
            rec.rollout(step=1, request_id="dup", **row)
        assert e.value.field == "step"
        rec.trainer(step=2, request_id="dup", logprobs=[-1.0])
        rec.trainer(step=2, request_id="dup", logprobs=[-0.5])  # a re-score: allowed, the latest counts
    with Recorder(tmp_path / "l") as rec:
        for _ in range(3):
            rec.rollout(step=2, request_id="dup", **row)
        rec.rollout(step=1, request_id="dup", **row)
    with open_recording(tmp_path / "l") as r:
        assert r.sql("SELECT count(*) FROM rollouts").fetchall() == [(1,)]
        assert sorted(r.sql("SELECT field FROM rejects").fetchall()) == [("request_id",), ("request_id",),
                                                                         ("step",)]
    with open_recording(tmp_path / "s") as r:
        assert r.sql("SELECT lp_trainer FROM tokens").fetchall() == [(-0.5,)]


def test_accepted_edge_values(tmp_path):
    """Empty sequences, NaN rewards, -inf in top-k and big (int64) versions and seeds are data."""
    with Recorder(tmp_path / "e", strict=True) as rec:
        rec.rollout(step=0, request_id="empty", prompt_ids=[], output_ids=[], logprobs=[])
        rec.rollout(step=0, request_id="nan-reward", prompt_ids=[1], output_ids=[2], logprobs=[-1.0],
                    reward=NAN, seed=2 ** 62, token_versions=[2 ** 40])
        rec.trainer(step=0, request_id="nan-reward", logprobs=[-1.0], advantage=INF)
        rec.topk(step=0, request_id="nan-reward", source="engine", ids=[[2, 3]], logprobs=[[-0.1, -INF]])
        rec.event("note", value=NAN, items=[1, 2])
    with open_recording(tmp_path / "e") as r:
        rows = dict(r.sql("SELECT request_id, len(output_ids) FROM rollouts").fetchall())
        assert rows == {"empty": 0, "nan-reward": 1}
        (reward, seed, tv), = r.sql("SELECT reward, seed, token_versions[1] FROM rollouts "
                                    "WHERE request_id = 'nan-reward'").fetchall()
        assert math.isnan(reward) and seed == 2 ** 62 and tv == 2 ** 40
        assert r.sql("SELECT logprobs[2] FROM topk").fetchall() == [(-INF,)]


def test_lenient_never_raises_from_hostile_objects(tmp_path):
    class Hostile:
        def __len__(self):
            raise RuntimeError("boom")

        def __array__(self, *a, **k):
            raise RuntimeError("boom")

        def __repr__(self):
            return "<hostile>"

    with Recorder(tmp_path / "h") as rec:
        rec.rollout(step=0, request_id="h", prompt_ids=Hostile(), output_ids=Hostile(), logprobs=Hostile())
        rec.trainer(step=0, request_id="h", logprobs=Hostile())
        rec.topk(step=0, request_id="h", source="engine", ids=Hostile(), logprobs=Hostile())
        rec.metrics(step=0, values={"x": Hostile()})
        rec.event("e", step=0, thing=Hostile())
        rec.rollout(step=1, request_id="ok", prompt_ids=[1], output_ids=[2], logprobs=[-1.0])
        stats = rec.stats()
    with open_recording(tmp_path / "h") as r:
        assert r.sql("SELECT request_id FROM rollouts").fetchall() == [("ok",)]
        assert r.sql("SELECT count(*) FROM rejects").fetchall()[0][0] + stats["errors"] >= 4


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def rec_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "run"
    with Recorder(root, strict=True) as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[2, 3], logprobs=[-1.0, -2.0])
    return root


def run_cli(capsys, argv):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


USAGE = [  # exit 2, a usage message
    [],
    ["nosuch"],
    ["info"],
    ["info", "{rec}", "--format", "xml"],
    ["info", "{rec}", "--bogus"],
    ["sql", "{rec}"],
    ["sql", "{rec}", "SELECT 1", "--max-rows", "many"],
    ["sql", "{rec}", "SELECT 1", "--max-rows", "-5"],
    ["doctor"],
    ["doctor", "{rec}", "--repair-all"],
    ["rerun", "{rec}"],
    ["rerun", "{rec}", "--step", "0", "--fix", "bogus_fix"],
    ["rerun", "{rec}", "--step", "0", "--engine", "tensorrt"],
    ["bisect", "{rec}", "--by", "nothing"],
    ["bisect", "{rec}", "--step", "one"],
    ["import", "csv", "{tmp}/src", "{tmp}/dest"],
    ["import", "jsonl"],
]
DATA = [  # exit 1, one line "replay: <title>: <message>"
    (["info", "{tmp}/missing"], "not a recording"),
    (["info", "{tmp}/afile"], "not a recording"),
    (["info", "{tmp}"], "not a recording"),
    (["sql", "{rec}", "SELEC 1"], "sql error"),
    (["sql", "{rec}", "SELECT * FROM nosuch_table"], "sql error"),
    (["sql", "{rec}", "SELECT 1/0::INTEGER, error('boom')"], "sql error"),
    (["sql", "{tmp}/missing", "SELECT 1"], "not a recording"),
    (["sql", "{rec}", "--file", "{tmp}/missing.sql"], "bad input"),
    (["sql", "{rec}", "{rec}", "SELECT 1", "--names", "a"], "bad input"),
    (["sql", "{rec}", "SELECT 1", "--names", "main"], "bad input"),
    (["doctor", "{tmp}/missing"], "not a recording"),
    (["rerun", "{tmp}/missing", "--step", "0"], None),
    (["rerun", "{rec}", "--step", "abc"], "bad input"),
    (["bisect", "{tmp}/missing"], None),
    (["bisect", "{rec}", "--by", "tokens"], "bad input"),
    (["bisect", "{rec}", "--by", "layers", "--step", "0"], "bad input"),
    (["import", "jsonl", "{tmp}/missing", "{tmp}/dest"], "bad input"),
    (["import", "jsonl", "{tmp}/bad.jsonl", "{tmp}/dest"], "bad input"),
    (["import", "parquet", "{tmp}/bad.parquet", "{tmp}/dest"], "bad input"),
    (["import", "slime", "{tmp}/bad.pt", "{tmp}/dest"], "bad input"),
    (["import", "slime", "{tmp}/afile", "{tmp}/dest", "--trust-pickle"], "bad input"),
    (["sql", "{rec}", "--file", "{tmp}/bad.pt"], "bad input"),
    (["sql", "{rec}", "--file", "{tmp}"], "bad input"),
    (["info", "{tmp}/dirmanifest"], None),
]


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clitmp")
    (tmp / "afile").write_text("x")
    (tmp / "bad.jsonl").write_text('{"step": 0, "output_ids": [1], "logprobs": [-1.0]}\nnot json\n')
    (tmp / "bad.parquet").write_bytes(b"PAR1 but not really")
    (tmp / "bad.pt").write_bytes(b"\x80\x04 not a torch file")
    (tmp / "dirmanifest" / "manifest.json").mkdir(parents=True)
    return tmp


def _fill(argv, rec, tmp):
    return [a.replace("{rec}", str(rec)).replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(a) or "(none)" for a in USAGE])
def test_cli_bad_usage_exits_2(rec_path, cli_tmp, capsys, faults, argv):
    code, out, err = run_cli(capsys, _fill(argv, rec_path, cli_tmp))
    assert code == 2, (code, out, err)
    assert "usage:" in err and "Traceback" not in err
    faults.add(faults=1)


@pytest.mark.parametrize("argv,title", DATA, ids=[" ".join(a) for a, _ in DATA])
def test_cli_data_errors_exit_1_with_one_line(rec_path, cli_tmp, capsys, faults, argv, title):
    code, out, err = run_cli(capsys, _fill(argv, rec_path, cli_tmp))
    assert code == 1, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("  … ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("replay: "), err
    if title is not None:
        assert lines[0].startswith(f"replay: {title}: "), err
    assert not (cli_tmp / "dest").exists(), "a failed import left a recording behind"
    faults.add(faults=1)


def test_console_script_prints_no_traceback(rec_path, cli_tmp):
    exe = str(Path(sys.executable).parent / "replay")
    for argv, code in ((["info", str(cli_tmp / "missing")], 1), (["sql", str(rec_path), "SELEC"], 1),
                       (["info"], 2)):
        r = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == code and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- importers

def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROW = {"step": 0, "request_id": "a", "prompt_ids": [1], "output_ids": [2, 3], "logprobs": [-1.0, -2.0]}
JSONL_BAD = [  # (rows, the field the error must name, a row number the message must name)
    (["{not json"], "line", 0),
    (["[1, 2]"], "line", 0),
    ([{**ROW, "step": None}], "step", 0),
    ([ROW, {**ROW, "request_id": "b", "step": "zero"}], "step", 1),
    ([{**ROW, "output_ids": "23"}], "output_ids", 0),
    ([{**ROW, "output_ids": [2, "x"]}], "output_ids", 0),
    ([{**ROW, "logprobs": [-1.0]}], "logprobs", 0),
    ([{**ROW, "logprobs": None}], "logprobs", 0),
    ([ROW, {**ROW, "request_id": "b", "logprobs": [NAN, -1.0]}], "logprobs", 1),
    ([{**ROW, "logprobs": [INF, -1.0]}], "logprobs", 0),
    ([{**ROW, "output_ids": [2 ** 40, 3]}], "output_ids", 0),
    ([{**ROW, "output_ids": [-5, 3]}], "output_ids", 0),
    ([ROW, dict(ROW)], "request_id", 1),
    ([{**ROW, "trainer_logprobs": [-1.0]}], "trainer_logprobs", 0),
    ([{**ROW, "reward": "high"}], "reward", 0),
]


@pytest.mark.parametrize("rows,field,row", JSONL_BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(JSONL_BAD)])
def test_jsonl_import_bad_rows(tmp_path, faults, rows, field, row):
    src = _jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(BadInput) as e:
        import_any("jsonl", src, tmp_path / "dest")
    assert e.value.field == field, str(e.value)
    assert f"row {row}" in str(e.value) and str(src) in str(e.value)
    assert not (tmp_path / "dest").exists()
    faults.add(faults=1)


def test_jsonl_import_keeps_unicode_ids_and_empty_lines(tmp_path):
    rows = [{**ROW, "request_id": rid} for rid in UNICODE_IDS[:5]]
    src = _jsonl(tmp_path / "in.jsonl", [*rows[:2], "", "   ", *rows[2:]])
    stats = import_any("jsonl", src, tmp_path / "dest")
    assert stats.rollouts == 5
    with open_recording(tmp_path / "dest") as r:
        assert sorted(x[0] for x in r.sql("SELECT request_id FROM rollouts").fetchall()) == sorted(UNICODE_IDS[:5])


def test_parquet_import_bad_files(tmp_path, faults):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {
        "not parquet": (lambda p: p.write_bytes(b"garbage"), "file"),
        "ids as text": (lambda p: pq.write_table(pa.table({"step": [0], "output_ids": ["1 2"],
                                                           "logprobs": [[-1.0]]}), p), "output_ids"),
        "no logprobs": (lambda p: pq.write_table(pa.table({"step": [0], "output_ids": [[1]]}), p), "logprobs"),
        "no step": (lambda p: pq.write_table(pa.table({"output_ids": [[1]], "logprobs": [[-1.0]]}), p), "step"),
    }
    for name, (make, field) in cases.items():
        src = tmp_path / f"{name.replace(' ', '_')}.parquet"
        make(src)
        with pytest.raises(BadInput) as e:
            import_any("parquet", src, tmp_path / "dest")
        assert e.value.field == field, (name, str(e.value))
        assert not (tmp_path / "dest").exists()
        faults.add(faults=1)


def test_slime_import_bad_dumps(tmp_path, faults):
    import torch

    good = {"tokens": [1, 2, 3, 4], "response_length": 2, "rollout_log_probs": [-1.0, -2.0], "index": 0}
    cases = {
        "garbage": (b"not a torch file", "file"),
        "a list": ([1, 2], "samples"),
        "no samples": ({"rollout_id": 0}, "samples"),
        "no rollout id": ({"samples": [good]}, "rollout_id"),
        "sample not a dict": ({"rollout_id": 0, "samples": [3]}, "samples"),
        "response too long": ({"rollout_id": 0, "samples": [{**good, "response_length": 9}]}, "response_length"),
        "logprobs short": ({"rollout_id": 0, "samples": [{**good, "rollout_log_probs": [-1.0]}]},
                           "rollout_log_probs"),
        "logprob nan": ({"rollout_id": 0, "samples": [{**good, "rollout_log_probs": [NAN, -1.0]}]}, "logprobs"),
        "token too big": ({"rollout_id": 0, "samples": [{**good, "tokens": [1, 2, 2 ** 40, 4]}]}, "output_ids"),
    }
    for name, (data, field) in cases.items():
        src = tmp_path / f"{name.replace(' ', '_')}.pt"
        if isinstance(data, bytes):
            src.write_bytes(data)
        else:
            torch.save(data, src)
        with pytest.raises(BadInput) as e:
            import_any("slime", src, tmp_path / "dest")
        assert e.value.field == field, (name, str(e.value))
        assert str(src) in str(e.value)
        assert not (tmp_path / "dest").exists()
        faults.add(faults=1)


def test_import_errors_are_replay_errors_for_missing_sources(tmp_path):
    for kind in ("jsonl", "parquet", "slime"):
        with pytest.raises(ReplayError, match="no such file or folder"):
            import_any(kind, tmp_path / "nothing", tmp_path / "dest")
        (tmp_path / "emptydir").mkdir(exist_ok=True)
        with pytest.raises(BadInput, match="no .* files found"):
            import_any(kind, tmp_path / "emptydir", tmp_path / "dest")
    with pytest.raises(BadInput):
        import_any("csv", tmp_path, tmp_path / "dest")


# ---------------------------------------------------------------- opening

@pytest.mark.parametrize("kwargs,error,field", [
    (dict(rank=-1), BadInput, "rank"),
    (dict(rank="0"), BadInput, "rank"),
    (dict(rank=True), BadInput, "rank"),
    (dict(mode="overwrite"), BadInput, "mode"),
    (dict(run_config="lr=1e-4"), BadInput, "run_config"),
    (dict(run_config=[1, 2]), BadInput, "run_config"),
    (dict(segment_bytez=5), TypeError, None),  # a misspelt option is a programming error
], ids=lambda x: repr(x)[:40])
def test_recorder_constructor_refuses_bad_arguments(tmp_path, faults, kwargs, error, field):
    with pytest.raises(error) as e:
        Recorder(tmp_path / "r", **kwargs)
    if field is not None:
        assert e.value.field == field
    faults.add(faults=1)


def test_recorder_into_a_file_is_a_recording_error(tmp_path):
    (tmp_path / "f").write_text("x")
    from replay.errors import RecordingError
    with pytest.raises(RecordingError, match="cannot record"):
        Recorder(tmp_path / "f")


def test_run_config_with_numpy_and_paths_is_stored_as_json(tmp_path):
    """Training configs hold numpy scalars, arrays and paths: they are kept as JSON values."""
    cfg = {"lr": np.float32(0.5), "steps": np.int64(3), "shape": np.zeros(2), "out": Path("/ckpt"),
           "dtype": np.dtype("float32"), "nested": {"betas": (0.9, 0.95), 1: "one"}}
    with Recorder(tmp_path / "c", run_config=cfg) as rec:
        rec.event("run_start")
    with open_recording(tmp_path / "c") as r:
        got = r.info()["run_config"]
    assert got["lr"] == 0.5 and got["steps"] == 3 and got["shape"] == [0.0, 0.0]
    assert got["nested"] == {"betas": [0.9, 0.95], "1": "one"}
    assert "ckpt" in got["out"] and "float32" in got["dtype"]


def test_a_manifest_that_cannot_be_read_is_a_recording_error(tmp_path):
    from replay.errors import RecordingError
    (tmp_path / "m" / "manifest.json").mkdir(parents=True)
    with pytest.raises(RecordingError) as e:
        open_recording(tmp_path / "m")
    assert e.value.title == "unreadable manifest"
