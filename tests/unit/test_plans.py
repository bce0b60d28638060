"""Where a step's updates landed and when its requests joined, from the recorded tokens alone."""
from __future__ import annotations

import numpy as np

from replay.engines.base import WeightUpdate
from replay.rerun.plans import RecordedRequest, arrivals


def _req(rid: str, versions: list[int]) -> RecordedRequest:
    n = len(versions)
    return RecordedRequest(request_id=rid, group_id=None, prompt_ids=[1], output_ids=[4] * n,
                           logprobs=np.zeros(n, np.float32), token_versions=versions, temperature=1.0,
                           top_p=1.0, top_k=-1, seed=None, num_cached_tokens=None, trainer_logprobs=None)


def test_updates_recorded_without_their_engine_step_are_placed_from_the_tokens():
    """A loop on AsyncLLM does not count engine steps: request a joined at 0 and reaches version 1
    at its token 6, b joined one step later (token 5); version 2 reaches a at token 10 and b at
    token 9. Both updates land where those tokens say: after engine steps 6 and 10."""
    a = _req("a", [0] * 6 + [1] * 4 + [2] * 4)
    b = _req("b", [0] * 5 + [1] * 4 + [2] * 4)
    moved, notes = arrivals(0, [a, b], [WeightUpdate(1, 0), WeightUpdate(2, 0)], unplaced={0, 1})
    assert [(u.version, u.after_step) for u in moved] == [(1, 6), (2, 10)]
    assert (a.arrival_step, b.arrival_step) == (0, 1)
    assert notes and "engine steps 0, 1" in notes[0] and not any("moved by" in n for n in notes)
    recorded = [_req("a", a.token_versions), _req("b", b.token_versions)]   # the same, positions recorded
    again, _ = arrivals(0, recorded, [WeightUpdate(1, 6), WeightUpdate(2, 10)])
    assert again == moved and [r.arrival_step for r in recorded] == [0, 1]


def test_an_unplaced_update_no_request_reached_lands_after_every_token():
    done = [_req("a", [0] * 5), _req("b", [0] * 7)]
    moved, _ = arrivals(0, done, [WeightUpdate(1, 0)], unplaced={0})
    assert [(u.version, u.after_step) for u in moved] == [(1, 7)]
    assert [r.arrival_step for r in done] == [0, 0]


def test_an_unplaced_update_between_finished_and_new_requests_lands_after_the_finished_ones():
    """One request finished before the update (5 tokens, version 0 only), another saw only version 1:
    the update landed after the finished one's last token, and the other joined there."""
    old, new = _req("old", [0] * 5), _req("new", [1] * 3)
    moved, _ = arrivals(0, [old, new], [WeightUpdate(1, 0)], unplaced={0})
    assert [(u.version, u.after_step) for u in moved] == [(1, 5)]
    assert (old.arrival_step, new.arrival_step) == (0, 5)


def test_an_unplaced_update_lands_after_a_request_that_ended_before_it():
    """a (10 tokens, version 0 only) ended before the update; b reaches version 1 at its token 7:
    the update cannot have landed before a's last token, so b joined at engine step 3."""
    a, b = _req("a", [0] * 10), _req("b", [0] * 7 + [1] * 3)
    moved, _ = arrivals(0, [a, b], [WeightUpdate(1, 0)], unplaced={0})
    assert [(u.version, u.after_step) for u in moved] == [(1, 10)]
    assert (a.arrival_step, b.arrival_step) == (0, 3)


def test_a_request_that_only_saw_a_later_update_joined_when_it_landed():
    a = _req("a", [0] * 4 + [1] * 4 + [2] * 4)
    c = _req("c", [2] * 4)                      # joined after the second update
    moved, _ = arrivals(0, [a, c], [WeightUpdate(1, 0), WeightUpdate(2, 0)], unplaced={0, 1})
    assert [(u.version, u.after_step) for u in moved] == [(1, 4), (2, 8)]
    assert (a.arrival_step, c.arrival_step) == (0, 8)
