"""Snapshots of the main screens at 80×24 and 160×48 (deterministic recordings, no clock)."""
from __future__ import annotations

import pytest
from textual.widgets import TextArea

from tui.app import make_app

from tui_fixtures import ONSET_STEP

pytestmark = pytest.mark.timeout(120)
SIZES = [(80, 24), (160, 48)]


def _app(run_paths):
    run, ref = run_paths
    return make_app(run, ref, root=run.parent.parent)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_timeline(snap_compare, run_paths, size, settle):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("left")   # cursor one step before the onset: both markers show
    assert snap_compare(_app(run_paths), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_step_view(snap_compare, run_paths, size, settle):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter", "w")   # the worst sequence, its worst token
        await settle(pilot)
        assert pilot.app.screen.step == ONSET_STEP
    assert snap_compare(_app(run_paths), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sql_console(snap_compare, run_paths, size, settle):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("s")
        await pilot.pause()
        editor = pilot.app.screen.query_one("#sql-editor", TextArea)
        editor.cursor_blink = False
        await pilot.press("f5")
        await settle(pilot)
    assert snap_compare(_app(run_paths), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help(snap_compare, run_paths, size, settle):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()
    assert snap_compare(_app(run_paths), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_replay_panel(snap_compare, run_paths, size, settle):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("p")
        await settle(pilot)
        await pilot.press("1", "v")        # processed_logprobs on, preset v0
        await pilot.pause()
    assert snap_compare(_app(run_paths), terminal_size=size, run_before=before)
