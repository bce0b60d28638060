"""Fault tests of the recorder and the read path (DESIGN §3: recordings are evidence).

Every test here injects real faults (SIGKILL, a file-size limit, damaged bytes, hostile
paths, bad values) and reports how many trials and faults it ran through the
``faults`` fixture; the counts are printed in pytest's terminal summary.
"""
from __future__ import annotations

import collections

import pytest

# test file -> [trials, faults]
_TALLY: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


class FaultTally:
    """Counts trials and injected faults of one test file."""

    def __init__(self, name: str):
        self.name = name

    def add(self, trials: int = 1, faults: int = 0) -> None:
        t = _TALLY[self.name]
        t[0] += trials
        t[1] += faults


@pytest.fixture
def faults(request) -> FaultTally:
    """Where a test counts its trials and faults (printed at the end of the run)."""
    return FaultTally(request.node.path.stem)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TALLY:
        return
    tr = terminalreporter
    tr.write_sep("-", "reliability: trials and faults injected")
    for name in sorted(_TALLY):
        trials, n = _TALLY[name]
        tr.write_line(f"{name:24s} {trials:6d} trials {n:6d} faults")
    tr.write_line(f"{'total':24s} {sum(t for t, _ in _TALLY.values()):6d} trials "
                  f"{sum(f for _, f in _TALLY.values()):6d} faults")
