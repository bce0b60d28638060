"""Importers: slime debug dumps (.pt), jsonl and parquet into real recordings."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch

from replay import open_recording
from replay.errors import BadInput
from replay.integrations.importers import ColumnMap, import_slime, import_table

RNG = np.random.default_rng(7)


# ------------------------------------------------------------------ slime-shaped dumps


def _sample_dict(index: int, group: int, prompt: list[int], response: list[int]) -> dict:
    """A dict with the keys of slime's ``Sample.to_dict()`` (slime/utils/types.py)."""
    n = len(response)
    return {
        "group_index": group, "index": index, "rollout_id": None, "prompt": "question",
        "tokens": prompt + response, "multimodal_inputs": None, "multimodal_train_inputs": None,
        "multimodal_train_input_id": None, "apply_chat_template_kwargs": {}, "response": "answer",
        "response_length": n, "label": "42", "reward": float(index % 3) / 2, "loss_mask": [1] * n,
        "weight_versions": ["3"], "rollout_log_probs": [float(x) for x in -RNG.random(n)],
        "rollout_top_p_token_ids": None, "rollout_top_p_token_offsets": None, "rollout_routed_experts": None,
        "remove_sample": False, "teacher_log_probs": None,
        "status": "truncated" if index == 1 else "completed", "metadata": {}, "generate_function_path": None,
        "custom_rm_path": None, "train_metadata": None, "session_id": None, "non_generation_time": 0.0,
        "spec_info": {"spec_accept_token_num": 0, "spec_draft_token_num": 0, "spec_verify_ct": 0,
                      "completion_token_num": 0},
        "prefix_cache_info": {"cached_tokens": 2, "total_prompt_tokens": len(prompt)},
    }


def _rollout_dump(rollout_id: int, n_samples: int = 4) -> dict:
    samples = []
    for i in range(n_samples):
        prompt = [int(x) for x in RNG.integers(4, 60, 3 + i)]
        response = [int(x) for x in RNG.integers(4, 60, 2 + 2 * i)]
        samples.append(_sample_dict(i, i // 2, prompt, response))
    return {"rollout_id": rollout_id, "samples": samples}


def _train_dump(rollout: dict) -> dict:
    """The payload of slime's ``_build_dump_payload`` (format_version 2) for the same samples."""
    samples, shard = [], {"rank": 0, "data_parallel_rank": 0, "sample_indices": [], "partition": [],
                          "micro_batch_indices": [[0, 1]], "num_microbatches": [1], "global_batch_sizes": [4]}
    for pos, s in enumerate(rollout["samples"]):
        n = s["response_length"]
        rollout_lp = torch.tensor(s["rollout_log_probs"], dtype=torch.float32)
        samples.append({
            "data_parallel_rank": 0, "rollout_position": pos, "sample_index": s["index"],
            "tokens": torch.tensor(s["tokens"], dtype=torch.long), "response_lengths": n,
            "rewards": s["reward"], "truncated": int(s["status"] == "truncated"), "rollout_ids": pos,
            "loss_masks": torch.ones(n, dtype=torch.int), "rollout_mask_sums": torch.tensor(float(n)),
            "total_lengths": len(s["tokens"]), "rollout_log_probs": rollout_lp,
            "log_probs": rollout_lp - torch.rand(n) * 0.01, "entropy": torch.rand(n),
            "advantages": torch.full((n,), 0.25 * pos - 0.3), "returns": torch.full((n,), 0.1),
        })
        shard["sample_indices"].append(s["index"])
        shard["partition"].append(pos)
    return {"format_version": 2, "rollout_id": rollout["rollout_id"], "rank": 0, "samples": samples,
            "dp_shards": [shard], "raw_reward": [s["reward"] for s in rollout["samples"]]}


@pytest.fixture
def slime_dumps(tmp_path):
    root = tmp_path / "dump"
    (root / "rollout_data").mkdir(parents=True)
    (root / "train_data").mkdir()
    dumps = []
    for rid in (0, 1):
        r = _rollout_dump(rid)
        t = _train_dump(r)
        torch.save(r, root / "rollout_data" / f"{rid}.pt")
        torch.save(t, root / "train_data" / f"{rid}.pt")
        dumps.append((r, t))
    return root, dumps


def test_slime_dump_tokens_view_matches_row_for_row(slime_dumps, tmp_path):
    root, dumps = slime_dumps
    stats = import_slime(root, tmp_path / "rec")
    assert (stats.files, stats.rollouts, stats.trainer) == (4, 8, 8)
    rec = open_recording(tmp_path / "rec")
    got = rec.sql("SELECT step, request_id, pos, token_id, lp_rollout, lp_trainer, log_ratio, weight_version "
                  "FROM tokens ORDER BY step, request_id, pos").fetchall()
    expected = []
    for r, t in dumps:
        for s, ts in zip(r["samples"], t["samples"]):
            n = s["response_length"]
            for p in range(n):
                expected.append((r["rollout_id"], str(s["index"]), p, s["tokens"][-n + p],
                                 s["rollout_log_probs"][p], float(ts["log_probs"][p])))
    expected.sort(key=lambda e: (e[0], e[1], e[2]))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[:4] == e[:4]
        assert g[4] == pytest.approx(np.float32(e[4])) and g[5] == pytest.approx(np.float32(e[5]))
        assert g[6] == pytest.approx(g[5] - g[4], abs=1e-6)
        assert g[7] == 3  # slime's weight_versions ["3"]
    meta = rec.sql("SELECT request_id, group_id, reward, finish_reason, num_cached_tokens, engine FROM rollouts "
                   "WHERE step = 0 ORDER BY request_id").fetchall()
    assert meta[1] == ("1", "0", 0.5, "length", 2, "sglang") and meta[0][3] == "stop"
    adv = rec.sql("SELECT request_id, advantage, len(entropy) FROM trainer WHERE step = 1 ORDER BY request_id").fetchall()
    assert [a for _, a, _ in adv] == pytest.approx([-0.3, -0.05, 0.2, 0.45])


def test_slime_train_dump_alone_gives_rollouts_and_trainer_rows(slime_dumps, tmp_path):
    root, dumps = slime_dumps
    stats = import_slime(root / "train_data" / "1.pt", tmp_path / "rec")
    assert (stats.rollouts, stats.trainer, sorted(stats.steps)) == (4, 4, [1])
    rec = open_recording(tmp_path / "rec")
    rows = rec.sql("SELECT request_id, logprobs, output_ids FROM rollouts ORDER BY request_id").fetchall()
    for (rid, lps, out), s in zip(rows, dumps[1][0]["samples"]):
        assert rid == str(s["index"]) and out == s["tokens"][-s["response_length"]:]
        np.testing.assert_allclose(lps, np.float32(s["rollout_log_probs"]))


def _multi_turn(index: int = 0) -> tuple[dict, dict]:
    """A two-turn sample: the model writes 3 tokens, a tool appends 2 (loss mask 0, logprob 0.0
    as slime's multi-turn examples fill them), the model writes 2 more under a newer version."""
    prompt, response = [5, 6, 7, 8], [20, 21, 22, 40, 41, 23, 24]
    s = _sample_dict(index, 0, prompt, response)
    s["loss_mask"] = [1, 1, 1, 0, 0, 1, 1]
    s["rollout_log_probs"] = [-0.5, -0.25, -1.0, 0.0, 0.0, -0.75, -0.125]
    s["weight_versions"] = ["3", "4"]
    s["reward"] = 1.0
    t = _train_dump({"rollout_id": 2, "samples": [s]})
    t["samples"][0]["loss_masks"] = torch.tensor(s["loss_mask"], dtype=torch.int)
    return {"rollout_id": 2, "samples": [s]}, t


def test_a_multi_turn_sample_becomes_one_row_per_turn(tmp_path):
    """Tokens a tool appended were never sampled: they are the next turn's prompt, not output, so
    no metric counts their logprob 0.0; each turn has its own weight version, and the reward is
    the last turn's."""
    r, t = _multi_turn()
    (tmp_path / "src").mkdir()
    torch.save(r, tmp_path / "src" / "rollout_2.pt")
    torch.save(t, tmp_path / "src" / "train_2.pt")
    stats = import_slime(tmp_path / "src", tmp_path / "rec")
    assert (stats.rollouts, stats.trainer, stats.warnings) == (2, 2, [])
    rec = open_recording(tmp_path / "rec")
    rows = rec.sql("SELECT request_id, prompt_ids, output_ids, logprobs, token_versions, reward, finish_reason "
                   "FROM rollouts ORDER BY request_id").fetchall()
    assert [x[0] for x in rows] == ["0/turn0", "0/turn1"]
    assert rows[0][1:3] == ([5, 6, 7, 8], [20, 21, 22]) and rows[1][1:3] == ([5, 6, 7, 8, 20, 21, 22, 40, 41], [23, 24])
    assert rows[0][3] == [-0.5, -0.25, -1.0] and rows[1][3] == [-0.75, -0.125]
    assert rows[0][4] == [3, 3, 3] and rows[1][4] == [4, 4]
    assert (rows[0][5], rows[1][5]) == (None, 1.0) and (rows[0][6], rows[1][6]) == (None, "stop")
    tok = rec.sql("SELECT count(*), count(lp_trainer), max(lp_rollout) FROM tokens").fetchall()[0]
    assert tok == (5, 5, pytest.approx(-0.125))   # the tool's 0.0 logprobs are nowhere
    sm = rec.sql("SELECT reward FROM step_metrics").fetchall()
    assert sm == [(1.0,)]


def test_a_train_dump_that_splits_turns_otherwise_is_refused(tmp_path):
    r, t = _multi_turn()
    t["samples"][0]["loss_masks"] = torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.int)
    (tmp_path / "src").mkdir()
    torch.save(r, tmp_path / "src" / "rollout_2.pt")
    torch.save(t, tmp_path / "src" / "train_2.pt")
    with pytest.raises(BadInput, match="loss mask") as err:
        import_slime(tmp_path / "src", tmp_path / "rec")
    assert err.value.field == "loss_masks" and not (tmp_path / "rec").exists()


def test_weight_versions_that_fit_no_turn_count_are_unknown_and_said(tmp_path):
    r, _ = _multi_turn()
    r["samples"][0]["weight_versions"] = ["3", "4", "5"]
    torch.save(r, tmp_path / "2.pt")
    stats = import_slime(tmp_path / "2.pt", tmp_path / "rec")
    assert any("3 weight versions for 2 turns" in w for w in stats.warnings)
    assert open_recording(tmp_path / "rec").sql("SELECT count(token_versions) FROM rollouts").fetchall() == [(0,)]


def test_a_dict_reward_needs_its_key(tmp_path):
    dump = _rollout_dump(0, 2)
    for s in dump["samples"]:
        s["reward"] = {"acc": 1.0, "format": 0.5}
    torch.save(dump, tmp_path / "0.pt")
    stats = import_slime(tmp_path / "0.pt", tmp_path / "a")
    assert stats.warnings == ["rewards are dicts (keys: acc, format); recorded as NULL: pass --reward-key KEY "
                              "to record one of them"]
    assert open_recording(tmp_path / "a").sql("SELECT count(reward) FROM rollouts").fetchall() == [(0,)]
    import_slime(tmp_path / "0.pt", tmp_path / "b", reward_key="format")
    assert open_recording(tmp_path / "b").sql("SELECT DISTINCT reward FROM rollouts").fetchall() == [(0.5,)]
    with pytest.raises(BadInput, match="no key 'score'.*acc, format"):
        import_slime(tmp_path / "0.pt", tmp_path / "c", reward_key="score")
    proc = subprocess.run([sys.executable, "-m", "replay", "import", "slime", str(tmp_path / "0.pt"),
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "warning: rewards are dicts" in proc.stderr


def test_evaluation_dumps_are_told_by_their_own_rollout_id(tmp_path):
    """slime writes an evaluation dump through the training template with ``eval_`` before the id
    (``rollout_{rollout_id}.pt`` -> ``rollout_eval_3.pt``), holding the same rollout id: skipped.
    A name that merely contains ``eval`` is training data; two training dumps of one id are refused."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save(_rollout_dump(3), src / "rollout_3.pt")
    torch.save(_rollout_dump(3), src / "rollout_eval_3.pt")
    torch.save(_rollout_dump(4), src / "medieval_4.pt")
    stats = import_slime(src, tmp_path / "rec")
    assert sorted(stats.steps) == [3, 4] and stats.files == 2
    assert len(stats.skipped) == 1 and "rollout_eval_3.pt" in stats.skipped[0]
    torch.save(_rollout_dump(3), src / "copy_of_3.pt")
    with pytest.raises(BadInput, match="both rollout dumps of rollout 3") as err:
        import_slime(src, tmp_path / "rec2")
    assert "copy_of_3.pt" in str(err.value) and "rollout_3.pt" in str(err.value)


class Opaque:
    """A class torch's weights-only loader does not allow."""

    def __init__(self, x):
        self.x = x


def test_pickle_needing_full_unpickling_is_refused(tmp_path):
    dump = _rollout_dump(2, 2)
    dump["samples"][0]["metadata"] = {"obj": Opaque(1)}
    path = tmp_path / "2.pt"
    torch.save(dump, path)
    with pytest.raises(BadInput) as err:
        import_slime(path, tmp_path / "rec")
    assert str(path) in str(err.value) and "--trust-pickle" in str(err.value)
    assert "Opaque" in str(err.value)  # the reason names what needs unpickling
    assert not (tmp_path / "rec").exists()
    stats = import_slime(path, tmp_path / "rec", trust_pickle=True)
    assert stats.rollouts == 2


def test_numpy_arrays_in_a_dump_load_without_full_unpickling(tmp_path):
    dump = _rollout_dump(3, 2)
    s = dump["samples"][1]
    s["rollout_log_probs"] = np.asarray(s["rollout_log_probs"], dtype=np.float32)
    s["tokens"] = np.asarray(s["tokens"], dtype=np.int64)
    s["rollout_routed_experts"] = np.zeros((3, 2, 2), dtype=np.uint8)
    s["reward"] = np.float32(0.75)
    torch.save(dump, tmp_path / "3.pt")
    import_slime(tmp_path / "3.pt", tmp_path / "rec")
    rows = open_recording(tmp_path / "rec").sql("SELECT output_ids, logprobs, reward FROM rollouts "
                                                "WHERE request_id = '1'").fetchall()
    n = s["response_length"]
    assert rows[0][0] == s["tokens"][-n:].tolist() and rows[0][2] == 0.75
    np.testing.assert_array_equal(np.float32(rows[0][1]), s["rollout_log_probs"])
    dump["samples"][0]["metadata"] = {"objects": np.array([Opaque(1)], dtype=object)}
    torch.save(dump, tmp_path / "4.pt")
    with pytest.raises(BadInput, match="--trust-pickle"):
        import_slime(tmp_path / "4.pt", tmp_path / "rec4")


def test_slime_bad_field_names_file_and_row(tmp_path):
    dump = _rollout_dump(0, 3)
    dump["samples"][2]["rollout_log_probs"] = dump["samples"][2]["rollout_log_probs"][:-1]
    torch.save(dump, tmp_path / "0.pt")
    with pytest.raises(BadInput) as err:
        import_slime(tmp_path / "0.pt", tmp_path / "rec")
    msg = str(err.value)
    assert "0.pt: row 2" in msg and "rollout_log_probs" in msg and err.value.field == "rollout_log_probs"


# ------------------------------------------------------------------------ jsonl, parquet


def _table_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        k = 1 + i % 4
        lp = [float(x) for x in -RNG.random(k)]
        rows.append({"step": i // 3, "rid": f"r{i}", "prompt": [1, 2, i + 3], "out": [int(x) for x in RNG.integers(4, 60, k)],
                     "lp": lp, "tlp": [x - 0.01 * j for j, x in enumerate(lp)], "r": float(i), "v": i // 3 + 1})
    return rows


COLS = ColumnMap(request_id="rid", prompt_ids="prompt", output_ids="out", logprobs="lp", trainer_logprobs="tlp",
                 reward="r", version="v")


def _check_round_trip(rows: list[dict], path) -> None:
    rec = open_recording(path)
    got = rec.sql("SELECT step, request_id, prompt_ids, output_ids, logprobs, reward, token_versions FROM rollouts "
                  "ORDER BY request_id").fetchall()
    assert len(got) == len(rows)
    for g, r in zip(got, sorted(rows, key=lambda r: r["rid"])):
        assert g[:4] == (r["step"], r["rid"], r["prompt"], r["out"]) and g[5] == r["r"]
        np.testing.assert_allclose(g[4], np.float32(r["lp"]))
        assert g[6] == [r["v"]] * len(r["out"])
    lr = rec.sql("SELECT request_id, pos, log_ratio FROM tokens ORDER BY request_id, pos").fetchall()
    by_id = {r["rid"]: r for r in rows}
    for rid, pos, ratio in lr:
        assert ratio == pytest.approx(by_id[rid]["tlp"][pos] - by_id[rid]["lp"][pos], abs=1e-5)


def test_jsonl_round_trip(tmp_path):
    rows = _table_rows()
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = import_table("jsonl", src, tmp_path / "rec", columns=COLS)
    assert (stats.rollouts, stats.trainer, sorted(stats.steps)) == (6, 6, [0, 1])
    _check_round_trip(rows, tmp_path / "rec")


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _table_rows(9)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    stats = import_table("parquet", tmp_path / "rows.parquet", tmp_path / "rec", columns=COLS)
    assert stats.rollouts == 9
    _check_round_trip(rows, tmp_path / "rec")


def test_row_the_recorder_refuses_names_its_source_and_leaves_nothing(tmp_path):
    rows = _table_rows(4)
    rows[2]["tlp"][0] = 0.5  # a positive logprob: the recorder refuses it
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BadInput) as err:
        import_table("jsonl", src, tmp_path / "rec", columns=COLS)
    assert f"{src}: row 2" in str(err.value) and err.value.field == "logprobs" and err.value.request_id == "r2"
    assert not (tmp_path / "rec").exists()


def test_jsonl_error_names_file_row_and_field(tmp_path):
    rows = _table_rows(3)
    rows[1]["lp"] = rows[1]["lp"] + [0.0]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BadInput) as err:
        import_table("jsonl", src, tmp_path / "rec", columns=COLS)
    assert f"{src}: row 1" in str(err.value) and err.value.field == "lp"
    assert not (tmp_path / "rec").exists()


def test_cli_import_jsonl_with_column_flags(tmp_path):
    rows = _table_rows(4)
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    from replay.cli.importers import add_parser
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    args = parser.parse_args(["import", "jsonl", str(src), str(tmp_path / "rec"), "--request-col", "rid",
                              "--prompt-ids-col", "prompt", "--output-ids-col", "out", "--logprobs-col", "lp",
                              "--trainer-logprobs-col", "tlp", "--reward-col", "r", "--version-col", "v",
                              "--format", "json"])
    assert isinstance(args, Namespace) and args.func(args) == 0
    _check_round_trip(rows, tmp_path / "rec")


def test_replay_import_command_line(slime_dumps, tmp_path):
    """The console entry point runs the importer end to end (exit code and JSON summary)."""
    root, _ = slime_dumps
    proc = subprocess.run([sys.executable, "-m", "replay", "import", "slime", str(root), str(tmp_path / "rec"),
                           "--format", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["rollouts"], out["trainer"], out["steps"]) == (8, 8, [0, 1])
    dump = _rollout_dump(5, 1)
    dump["samples"][0]["metadata"] = {"obj": Namespace(a=1)}
    torch.save(dump, tmp_path / "5.pt")
    proc = subprocess.run([sys.executable, "-m", "replay", "import", "slime", str(tmp_path / "5.pt"),
                           str(tmp_path / "rec5")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--trust-pickle" in proc.stderr and "argparse.Namespace" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback
