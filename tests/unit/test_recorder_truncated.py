"""-inf is a real logprob where a distribution was truncated (top-k / top-p): accepted in
top-k and replay rows, refused in rollouts and trainer rows; NaN and +inf never pass."""
from __future__ import annotations

import math

import pytest

from replay import BadInput, Recorder, open_recording

NEG = float("-inf")


def test_neg_inf_in_topk_and_replays_is_kept(tmp_path):
    with Recorder(tmp_path / "r", strict=True) as rec:
        rec.topk(step=0, request_id="a", source="engine", ids=[[3, 4]], logprobs=[[-0.1, NEG]])
        rec.replay(step=0, request_id="a", engine_config="abcd1234", mode="score", replay_id="x",
                   logprobs=[-0.5, NEG], output_ids=[5, 6])
    with open_recording(tmp_path / "r") as r:
        assert r.sql("SELECT logprobs FROM topk").fetchall()[0][0][1] == NEG
        lps, first = r.sql("SELECT logprobs, first_diff FROM replays").fetchall()[0]
        assert lps[0] == pytest.approx(-0.5) and math.isinf(lps[1]) and first is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_pos_inf_never_pass(tmp_path, bad):
    with Recorder(tmp_path / "r", strict=True) as rec:
        with pytest.raises(BadInput, match="logprobs"):
            rec.topk(step=0, request_id="a", source="engine", ids=[[3]], logprobs=[[bad]])
        with pytest.raises(BadInput, match="logprobs"):
            rec.replay(step=0, request_id="a", engine_config="c", mode="score", replay_id="x",
                       logprobs=[bad], output_ids=[1])


def test_neg_inf_in_rollouts_goes_to_rejects(tmp_path):
    with Recorder(tmp_path / "r") as rec:
        rec.rollout(step=0, request_id="a", prompt_ids=[1], output_ids=[2], logprobs=[NEG])
        rec.rollout(step=0, request_id="b", prompt_ids=[1], output_ids=[2], logprobs=[-0.1])
    with open_recording(tmp_path / "r") as r:
        assert r.sql("SELECT request_id FROM rollouts").fetchall() == [("b",)]
        assert r.sql("SELECT request_id, field FROM rejects").fetchall() == [("a", "logprobs")]


def test_replays_of_earlier_steps_are_not_refused_as_going_backwards(tmp_path):
    with Recorder(tmp_path / "r", strict=True) as rec:
        for step in (5, 3, 5):
            rec.replay(step=step, request_id="a", engine_config="c", mode="score", replay_id=f"x{step}",
                       logprobs=[-0.1], output_ids=[1])
    with open_recording(tmp_path / "r") as r:
        assert r.sql("SELECT count(*) FROM replays").fetchall()[0][0] == 3
