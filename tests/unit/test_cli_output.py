"""What ``replay rerun`` says on stderr about prefix-cache hits: a line per step for a few steps,
one line over all of them for a range (a 32-step range used to print 32 warnings)."""
from __future__ import annotations

from replay.cli.rerun import prefix_cache_warnings


def _summary(step: int, differ: int) -> dict:
    return {"step": step, "prefix_cache": {"requests": 4, "requests_differ": differ,
                                           "recorded_tokens": 64, "replayed_tokens": 64 - 16 * differ}}


def test_a_few_steps_get_a_line_each():
    lines = prefix_cache_warnings([_summary(0, 1), _summary(1, 0), _summary(2, 2)])
    assert len(lines) == 2
    assert lines[0].startswith("step 0:") and "1 of 4 requests" in lines[0]
    assert lines[1].startswith("step 2:") and "2 of 4 requests (32 cached prompt tokens replayed, 64 recorded)" in lines[1]


def test_a_range_gets_one_line_with_the_totals():
    out = [_summary(s, 0 if s in (5, 6) else 1) for s in range(10)]
    lines = prefix_cache_warnings(out)
    assert lines == [lines[0]] and lines[0].startswith("steps 0-4, 7-9 (8 of 10):")
    assert "8 of 32 requests (384 cached prompt tokens replayed, 512 recorded)" in lines[0]


def test_nothing_differs_nothing_is_said():
    assert prefix_cache_warnings([_summary(0, 0), {"step": 1}]) == []
