"""Fixtures of the TUI tests: recordings written by the real Recorder (see tui_fixtures)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from textual.worker import WorkerCancelled, WorkerFailed

from tui_fixtures import ONSET_STEP, make_run

@pytest.fixture(scope="session")
def recordings_master(tmp_path_factory) -> Path:
    """recordings/demo/{v0,v1}: the reference and the diverging run (written once)."""
    root = tmp_path_factory.mktemp("master") / "recordings"
    make_run(root / "demo" / "v0", diverge_from=None, seed=1)
    make_run(root / "demo" / "v1", diverge_from=ONSET_STEP, seed=1)
    return root


@pytest.fixture
def recordings(recordings_master, tmp_path) -> Path:
    """A private copy of the recordings folder (replays may write into it)."""
    root = tmp_path / "recordings"
    shutil.copytree(recordings_master, root)
    return root


@pytest.fixture
def run_paths(recordings) -> tuple[Path, Path]:
    return recordings / "demo" / "v1", recordings / "demo" / "v0"


async def _settle(pilot, rounds: int = 4) -> None:
    """Let messages and workers finish: pause, wait for every worker, repeat."""
    app = pilot.app
    for _ in range(rounds):
        await pilot.pause()
        try:
            await app.workers.wait_for_complete()
        except (WorkerCancelled, WorkerFailed):
            pass  # a cancelled or failed worker is what some tests look at
    await pilot.pause()


@pytest.fixture
def settle():
    """``await settle(pilot)``: wait for the app's workers and messages instead of sleeping."""
    return _settle
