"""The TUI's rough edges, each driven through Pilot on recordings the Recorder wrote: a failed
replay resets the panel; a cancelled query stops DuckDB; errors never sit under an earlier
query's rows; the console is sandboxed; toggles read without colour; each engine's replay
is named; tokens outside a config's support are counted, not averaged as inf; the key bar
fits 80 columns; the onset shows under the cursor and the charts label their steps."""
from __future__ import annotations

import hashlib
import json
import sys
import time

import pytest
from textual.widgets import DataTable, Footer, ProgressBar, Static, TextArea

from replay import Recorder
from replay.fixes import resolve
from tui import engine_adapter
from tui.app import make_app
from tui.screens.modals import ErrorScreen
from tui.screens.replay_panel import ReplayScreen
from tui.screens.sql import SqlScreen
from tui.screens.step import StepScreen
from tui.screens.timeline import TimelineScreen
from tui.widgets.plot import MetricPlot, step_axis
from tui.widgets.toggles import MarkedCheckbox, MarkedRadioButton

from tui_fixtures import ONSET_STEP, run_async, screen_text

pytestmark = pytest.mark.timeout(180)


async def _timeline(pilot, settle):
    await settle(pilot)
    assert isinstance(pilot.app.screen, TimelineScreen), pilot.app.screen
    return pilot.app.screen


async def _panel(pilot, settle) -> ReplayScreen:
    await _timeline(pilot, settle)
    await pilot.press("p")
    await settle(pilot)
    assert isinstance(pilot.app.screen, ReplayScreen), pilot.app.screen
    return pilot.app.screen


async def _console(pilot, settle) -> SqlScreen:
    await _timeline(pilot, settle)
    await pilot.press("s")
    assert isinstance(pilot.app.screen, SqlScreen), pilot.app.screen
    return pilot.app.screen


async def _run(pilot, settle, console: SqlScreen, query: str) -> None:
    console.query_one("#sql-editor", TextArea).text = query
    await pilot.press("f5")
    await settle(pilot)


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@run_async
async def test_a_failed_replay_leaves_the_panel_saying_so(run_paths, settle):
    """These recordings name no model: the replay fails. After the error box the panel shows the
    failure, and no progress bar keeps moving."""
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        panel = await _panel(pilot, settle)
        assert engine_adapter.availability("replay") is None   # the engines extra is installed
        await pilot.press("r")
        await settle(pilot, rounds=8)
        assert isinstance(app.screen, ErrorScreen), app.screen
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is panel
        assert panel.query_one("#replay-progress", ProgressBar).display is False
        status = panel.query_one("#replay-status", Static)
        assert "replay failed" in str(status.render()) and status.has_class("error-text")
        assert "replaying" not in str(status.render())


@run_async
async def test_cancelling_a_query_stops_duckdb(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        console = await _console(pilot, settle)
        # 10^11 rows: minutes of a full core unless DuckDB is interrupted
        console.query_one("#sql-editor", TextArea).text = \
            "SELECT sum(a.range * b.range) FROM range(100000000) a, range(1000) b"
        await pilot.press("f5")
        for _ in range(200):  # wait until the query is running on its cursor
            await pilot.pause(0.02)
            if console._cursor is not None:
                break
        assert console._cursor is not None
        t0 = time.monotonic()
        await pilot.press("escape")
        await settle(pilot)   # returns only once the worker thread, and so DuckDB, has stopped
        assert time.monotonic() - t0 < 30
        assert console._cursor is None and app.screen is console
        status = console.query_one("#sql-status", Static)
        assert "cancelled" in str(status.render()) and "running" not in str(status.render())
        assert console.last is None  # nothing came back, nothing is shown as an answer
        # the console still works after the interrupt
        await _run(pilot, settle, console, "SELECT 41 + 1 AS x")
        assert console.query_one("#sql-results", DataTable).get_row_at(0)[0].value == 42


@run_async
async def test_an_error_replaces_the_previous_results_and_statements_are_counted(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        console = await _console(pilot, settle)
        table = console.query_one("#sql-results", DataTable)
        await _run(pilot, settle, console, "SELECT step FROM run.step_metrics ORDER BY step")
        assert table.row_count > 0
        await _run(pilot, settle, console, "SELECT nope FROM run.rollouts")
        assert table.row_count == 0 and len(table.columns) == 0
        assert "nope" in str(console.query_one("#sql-status", Static).render())
        await _run(pilot, settle, console, "SELECT 1 AS a; SELECT 2 AS b")
        assert [c.label.plain for c in table.columns.values()] == ["b"]
        assert "ran 2 statements" in str(console.query_one("#sql-status", Static).render())
        await _run(pilot, settle, console, "-- nothing but a comment")
        assert "no SQL statement" in str(console.query_one("#sql-status", Static).render())


ESCAPES = ["COPY (SELECT 1) TO '{root}/manifest.json' (FORMAT csv)", "SELECT * FROM read_csv('/etc/passwd')",
           "ATTACH '{root}/../x.db' AS x", "INSTALL httpfs", "SET enable_external_access = true"]


@run_async
async def test_the_console_is_sandboxed(run_paths, settle):
    run, ref = run_paths
    before = _hashes(run)
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        console = await _console(pilot, settle)
        for q in ESCAPES:
            await _run(pilot, settle, console, q.format(root=run))
            status = console.query_one("#sql-status", Static)
            assert status.has_class("error-text") and console.last.error, q
            assert "reads its tables and views only" in console.last.error or "locked" in console.last.error, \
                (q, console.last.error)
    assert _hashes(run) == before
    assert not (run.parent / "x.db").exists()


@run_async
async def test_toggles_show_their_state_without_colour(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        panel = await _panel(pilot, settle)
        box = panel.query_one("#fix-fp32_lm_head", MarkedCheckbox)
        assert box.BUTTON_INNER == " " and "✓" not in screen_text(app)
        await pilot.press("4")
        await pilot.pause()
        assert box.value and box.BUTTON_INNER == "✓" and "✓" in screen_text(app)
        v1, v0 = (panel.query_one(f"#preset-{p}", MarkedRadioButton) for p in ("v1", "v0"))
        assert (v1.BUTTON_INNER, v0.BUTTON_INNER) == ("●", "○")
        await pilot.press("v")
        await pilot.pause()
        assert (v1.BUTTON_INNER, v0.BUTTON_INNER) == ("○", "●")
        text = screen_text(app)
        assert "●" in text and "○" in text


def _add_replays(run, step, rows):
    """Replays of every sequence of ``step``, as the replayer writes them (a rank of derived data):
    ``rows`` = [(config, engine, logprob)], the same logprob at every token."""
    from replay import open_recording
    from replay.store.manifest import AUX_RANKS
    with open_recording(run) as rec:
        seqs = rec.sql("SELECT request_id, output_ids FROM rollouts WHERE step = ?", [step]).fetchall()
    with Recorder(run, rank=AUX_RANKS + 7, mode="append", strict=True) as rec:
        for cfg, engine, lp in rows:
            for rid, ids in seqs:
                rec.replay(step=step, request_id=rid, engine_config=cfg.id, mode="score",
                           replay_id=f"{cfg.id}-{engine}", logprobs=[lp] * len(ids), output_ids=ids,
                           config=json.dumps(cfg.to_dict(), sort_keys=True), engine=engine)


@run_async
async def test_each_engines_replay_is_named_and_short_labels_fit_80_columns(run_paths, settle):
    run, ref = run_paths
    full = resolve("v1", ("processed_logprobs", "v0_runtime_defaults", "paused_weight_update"))
    proc = resolve("v1", ("processed_logprobs",))
    _add_replays(run, ONSET_STEP, [(proc, "reference", -0.5), (proc, "vllm", -0.25), (full, "reference", -0.125)])
    app = make_app(run, ref)
    async with app.run_test(size=(80, 24)) as pilot:
        tl = await _timeline(pilot, settle)
        await pilot.press("o")   # the onset step
        await settle(pilot)
        assert tl.step == ONSET_STEP
        await pilot.press("enter")
        await settle(pilot)
        step = app.screen
        assert isinstance(step, StepScreen)
        got = sorted((label, engine, v) for label, engine, v in step.detail.replays)
        assert got == [("v1+proc", "reference", -0.5), ("v1+proc", "vllm", -0.25),
                       ("v1+proc+v0rt+paused", "reference", -0.125)]
        # the detail pane as drawn at its width on an 80-column terminal: each label whole
        from rich.console import Console
        pane = step.query_one("#detail", Static)
        assert 0 < pane.size.width < 80
        console = Console(width=pane.size.width, record=True, file=open("/dev/null", "w"))
        from tui.screens.step import detail_table
        console.print(detail_table(step.detail))
        text = console.export_text()
        lines = [ln.strip() for ln in text.splitlines()]
        shown, label = [], ""
        for ln in lines[lines.index("replayed lp") + 1:]:
            if ln.startswith("top-k"):
                break
            if ln.startswith("on "):
                shown.append((label, ln.split()))
                label = ""
            else:
                label += ln   # a label too long for the column folds onto the next line, whole
        assert shown == [("v1+proc", ["on", "reference", "-0.5000"]), ("v1+proc", ["on", "vllm", "-0.2500"]),
                         ("v1+proc+v0rt+paused", ["on", "reference", "-0.1250"])], text


@run_async
async def test_tokens_outside_the_support_are_counted_not_averaged(run_paths, settle):
    run, ref = run_paths
    from replay import open_recording
    with open_recording(run) as rec:
        seqs = rec.sql("SELECT request_id, output_ids FROM rollouts WHERE step = ? ORDER BY request_id",
                       [ONSET_STEP]).fetchall()
    cfg = resolve("v1", ("processed_logprobs",))
    with Recorder(run, rank=10_000 + 8, mode="append", strict=True) as rec:
        for i, (rid, ids) in enumerate(seqs):
            lps = [-0.5] * len(ids)
            if i == 0:
                lps[0] = float("-inf")   # outside the replayed config's support
            rec.replay(step=ONSET_STEP, request_id=rid, engine_config=cfg.id, mode="score", replay_id="x",
                       output_ids=ids,
                       logprobs=lps, config=json.dumps(cfg.to_dict(), sort_keys=True), engine="reference")
    app = make_app(run, ref)
    async with app.run_test(size=(120, 30)) as pilot:
        panel = await _panel(pilot, settle)
        summary = app.workspace.replay_summary(ONSET_STEP, cfg.id, "reference")
        cols = summary.columns
        assert "outside support" in cols
        rows = {r[0]: r for r in summary.rows}
        first = rows[seqs[0][0]]
        assert first[cols.index("outside support")] == 1
        assert all(v is None or v == v and abs(v) != float("inf") for r in summary.rows for v in r[1:4])
        from tui.messages import ReplayDone
        outcome = engine_adapter.ReplayOutcome(engine_adapter.ReplayRequest(run, ONSET_STEP, "v1",
                                                                            ("processed_logprobs",)), cfg.id)
        panel.post_message(ReplayDone((outcome, summary)))
        await settle(pilot)
        status = str(panel.query_one("#replay-status", Static).render())
        assert "1 token(s) outside the replayed config's support" in status
        assert "inf" not in screen_text(app).replace("-inf", "")  # no bare inf in the table


@run_async
async def test_the_key_bar_fits_80_columns_on_every_screen(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(80, 24)) as pilot:
        seen = []
        for keys in ([], ["enter"], ["p"], ["escape", "escape", "s"]):
            for k in keys:
                await pilot.press(k)
                await settle(pilot)
            await pilot.pause()
            footer = app.screen.query_one(Footer)
            keys_shown = list(footer.query("FooterKey"))
            assert keys_shown, type(app.screen).__name__
            right = max(k.region.right for k in keys_shown)
            assert right <= 80, (type(app.screen).__name__, [(k.description, k.region) for k in keys_shown])
            seen.append(type(app.screen).__name__)
        assert seen == ["TimelineScreen", "StepScreen", "ReplayScreen", "SqlScreen"]


@run_async
async def test_the_onset_shows_under_the_cursor_and_steps_are_labelled(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        tl = await _timeline(pilot, settle)
        await pilot.press("o")            # the cursor onto the onset
        await settle(pilot)
        plot = tl.query(MetricPlot).first()
        assert plot.onset is not None and plot.cursor == plot.onset
        lines = plot.render().plain.splitlines()
        axis = lines[-1]
        assert "▲" in axis                      # the onset marker, under the cursor too
        assert str(int(min(x for x, _ in plot.run))) in axis and str(int(max(x for x, _ in plot.run))) in axis
    # the axis itself: first, middle, last step; the marker at the onset's column
    from rich.style import Style
    ax = step_axis(0, 31, 40, 10, Style(), Style()).plain
    assert ax.startswith("0") and ax.rstrip().endswith("31") and ax[10] == "▲" and " 16 " in ax


def test_vllm_replays_run_in_a_worker_whose_logs_stay_off_the_screen():
    """The panel's vLLM engine runs under a worker process (its stderr is captured for error
    messages), so vLLM's logs are never drawn over the screen."""
    assert engine_adapter.worker_python("vllm") == sys.executable
    assert engine_adapter.worker_python("reference") is None


@run_async
async def test_the_runs_screen_lists_the_folder_of_the_recording_opened(run_paths, settle, tmp_path, monkeypatch):
    """``replay tui PATH`` from anywhere: escape from the timeline shows PATH's siblings, not ./recordings."""
    from tui.cli import runs_root
    from tui.screens.runs import RunsScreen
    run, ref = run_paths
    monkeypatch.chdir(tmp_path)    # no ./recordings here
    app = make_app(run, None, root=runs_root(run, None))
    async with app.run_test(size=(100, 30)) as pilot:
        await _timeline(pilot, settle)
        await pilot.press("escape")
        await settle(pilot)
        runs = app.screen
        assert isinstance(runs, RunsScreen)
        assert sorted(e.name for e in runs.runs) == ["v0", "v1"]


@pytest.mark.timeout(600)
@run_async
async def test_a_copied_recording_replays_with_model(demo_runs, tmp_path, settle):
    """A recording copied where its recorded model path does not resolve: the panel says so; with
    ``--model`` (make_app(model=...)) the same replay runs."""
    import shutil

    from replay import open_recording
    from replay.store.manifest import update_manifest
    out = demo_runs[0]
    with open_recording(out / "v1") as rec:
        model = rec.run_config()["model"]
    run = tmp_path / "copied" / "v1"
    shutil.copytree(out / "v1", run)
    shutil.rmtree(run / "model")   # it only names its model, and the name is wrong here

    def elsewhere(man):
        man["run_config"]["model"] = "/nonexistent/model"
    update_manifest(run, elsewhere)
    for given in (None, model):
        app = make_app(run, None, root=run.parent, model=given)
        async with app.run_test(size=(120, 40)) as pilot:
            await _timeline(pilot, settle)
            await pilot.press("p")
            await settle(pilot)
            panel = app.screen
            await pilot.press("r")
            for _ in range(300):
                await settle(pilot, rounds=1)
                if panel.outcome is not None or isinstance(app.screen, ErrorScreen):
                    break
            if given is None:
                assert isinstance(app.screen, ErrorScreen) and "--model" in app.screen.err_msg
            else:
                assert not isinstance(app.screen, ErrorScreen), app.screen.err_msg
                assert panel.outcome is not None and panel.query_one("#replay-results", DataTable).row_count > 0
