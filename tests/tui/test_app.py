"""The TUI driven by Pilot over real recordings written by the Recorder."""
from __future__ import annotations

import duckdb
import pytest
from textual.widgets import Checkbox, DataTable, Static, TextArea

from replay import Recorder, open_recording
from tui import engine_adapter
from tui.app import make_app
from tui.screens.modals import ErrorScreen, HelpScreen
from tui.screens.replay_panel import ReplayScreen
from tui.screens.runs import RunsScreen
from tui.screens.sql import SqlScreen
from tui.screens.step import StepScreen
from tui.screens.timeline import TimelineScreen
from tui.widgets.plot import MetricPlot
from tui.widgets.tokens import TokenView, bucket

from tui_fixtures import N_SEQS, ONSET_STEP, run_async, screen_text, write_steps

pytestmark = pytest.mark.timeout(120)


def sql(path, query, params=None):
    with open_recording(path, salvage=False) as rec:
        return rec.sql(query, params=params).fetchall()


async def open_timeline(pilot, settle):
    await settle(pilot)
    assert isinstance(pilot.app.screen, TimelineScreen), pilot.app.screen
    return pilot.app.screen


@run_async
async def test_runs_screen_lists_recordings_and_opens_run_against_reference(recordings, settle):
    app = make_app(root=recordings)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        assert [e.name for e in screen.runs] == ["demo/v0", "demo/v1"]
        tokens = sql(recordings / "demo" / "v1", "SELECT count(*) FROM tokens")[0][0]
        v1 = screen.runs[1]
        assert (v1.status, v1.steps, v1.rollouts, v1.tokens) == ("complete", 6, 6 * N_SEQS, tokens)
        table = screen.query_one("#runs", DataTable)
        assert table.row_count == 2
        await pilot.press("r")                  # v0 is highlighted: the reference
        assert screen.reference == recordings / "demo" / "v0"
        assert str(table.get_row_at(0)[0]) == "ref"
        await pilot.click("#runs", offset=(8, 2))   # a click highlights v1, a second click opens it
        assert screen.highlighted().name == "demo/v1" and isinstance(app.screen, RunsScreen)
        await pilot.click("#runs", offset=(8, 2))
        tl = await open_timeline(pilot, settle)
        assert app.workspace.run_path == recordings / "demo" / "v1"
        assert app.workspace.ref_path == recordings / "demo" / "v0"
        assert tl.timeline.onset.step == ONSET_STEP


@run_async
async def test_timeline_marks_onset_and_matches_sql(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref, root=run.parent.parent)
    async with app.run_test(size=(80, 24)) as pilot:
        tl = await open_timeline(pilot, settle)
        assert tl.timeline.onset.step == ONSET_STEP
        assert tl.step == ONSET_STEP            # the cursor starts at the onset
        plots = list(tl.query(MetricPlot))
        assert [p.metric for p in plots] == ["clip_rate", "kl_new_old", "entropy", "reward",
                                             "mean_abs_log_ratio", "components"]
        assert plots[-1].run == [] and plots[-1].ref == []   # no reference stored: nothing to plot yet
        # every curve equals the core's step_metrics view, for the run and the reference
        for path, side in ((run, "run"), (ref, "ref")):
            for metric in ("clip_rate", "kl_new_old", "entropy", "reward", "mean_abs_log_ratio"):
                want = sql(path, f"SELECT step, {metric} FROM step_metrics ORDER BY step")
                plot = tl.query_one(f"#plot-{metric}", MetricPlot)
                got = plot.run if side == "run" else plot.ref
                assert [x for x, _ in got] == [float(s) for s, _ in want]
                assert [y for _, y in got] == pytest.approx([v for _, v in want], rel=1e-9, abs=1e-12)
        clip = tl.query_one("#plot-clip_rate", MetricPlot)
        assert clip.onset == ONSET_STEP and len(clip.ref) == 6
        assert f"onset: step {ONSET_STEP}" in str(tl.query_one("#tl-status", Static).render())
        # the onset column carries the onset style in the drawn plot
        onset_bg = clip.get_component_rich_style("metricplot--onset").bgcolor
        await pilot.press("home")
        rendered = clip.render()
        assert any(span.style.bgcolor == onset_bg for span in rendered.spans
                   if hasattr(span.style, "bgcolor"))
        assert tl.step == 0
        await pilot.press("right", "right")
        assert tl.step == 2 and clip.cursor == 2
        await pilot.press("o")
        assert tl.step == ONSET_STEP


@run_async
async def test_step_view_worst_sequence_token_colours_and_detail(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(120, 40)) as pilot:
        await open_timeline(pilot, settle)
        await pilot.press("enter")
        await settle(pilot)
        step = app.screen
        assert isinstance(step, StepScreen) and step.step == ONSET_STEP
        order = [r[0] for r in sql(run, "SELECT request_id FROM sequences WHERE step = ? "
                                        "ORDER BY mean_abs_log_ratio DESC", [ONSET_STEP])]
        table = step.query_one("#seqs", DataTable)
        shown = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert shown == order
        want = sql(run, "SELECT request_id, n_tokens, mean_abs_log_ratio, max_abs_log_ratio, num_cached_tokens "
                        "FROM sequences WHERE step = ? ORDER BY mean_abs_log_ratio DESC", [ONSET_STEP])
        for i, (rid, n, mean_r, max_r, cached) in enumerate(want):
            row = table.get_row_at(i)
            assert (row[1].value, row[6].value) == (n, cached)
            assert (row[2].value, row[3].value) == (pytest.approx(mean_r), pytest.approx(max_r))
        worst = order[0]
        await pilot.press("enter")              # into the worst sequence's tokens
        await settle(pilot)
        view = step.query_one(TokenView)
        assert view.has_focus and step.tokens.request_id == worst
        rows = sql(run, "SELECT pos, token_id, lp_rollout, lp_trainer, log_ratio, weight_version "
                        "FROM tokens WHERE step = ? AND request_id = ? ORDER BY pos", [ONSET_STEP, worst])
        assert view.labels == [str(r[1]) for r in rows]
        assert view.buckets == [bucket(abs(r[4])) for r in rows]
        # the drawn cells carry the colour of their bucket
        for i, r in enumerate(rows):
            want = view.get_component_rich_style(f"tokens--r{bucket(abs(r[4]))}").bgcolor
            assert view.style_of(i).bgcolor == want
        # a weight-version boundary is marked where SQL says the version changes
        changes = [rows[i][5] for i in range(1, len(rows)) if rows[i][5] != rows[i - 1][5]]
        assert changes, "the diverging run has a mid-sequence weight update"
        markers = [c.text for line in view._lines for c in line if c.token is None]
        assert markers == [f"┃v{v}" for v in changes]
        # the worst token, and its detail pane
        await pilot.press("w")
        await settle(pilot)
        pos = max(rows, key=lambda r: abs(r[4]))[0]
        assert view.cursor == pos
        d = step.detail
        assert d.pos == pos and d.token_id == rows[pos][1]
        assert d.lp_rollout == pytest.approx(rows[pos][2])
        assert d.lp_trainer == pytest.approx(rows[pos][3])
        assert d.log_ratio == pytest.approx(rows[pos][4])
        topk = sql(run, "SELECT source, ids, logprobs FROM topk WHERE step = ? AND request_id = ? "
                        "AND pos = ? ORDER BY source", [ONSET_STEP, worst, pos])
        assert {s: [i for i, _ in v] for s, v in d.topk.items()} == {s: ids for s, ids, _ in topk}
        text = screen_text(app)
        assert f"token id {rows[pos][1]:>20}" in " ".join(text.split("│")) or str(rows[pos][1]) in text
        assert f"{rows[pos][3]:.4f}" in text
        # moving the cursor updates the detail
        await pilot.press("home")
        await settle(pilot)
        assert step.detail.pos == 0 and step.detail.token_id == rows[0][1]
        # a click on a token moves the cursor there (second token of the first token line)
        x = len(view._lines[0][0].text) + 1
        await pilot.click(TokenView, offset=(1 + x, len(view._info_lines)))
        await settle(pilot)
        assert view.cursor == 1 and step.detail.pos == 1


@run_async
async def test_step_view_sorts_by_keys_and_header_click(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(120, 40)) as pilot:
        await open_timeline(pilot, settle)
        await pilot.press("enter")
        await settle(pilot)
        step = app.screen
        table = step.query_one("#seqs", DataTable)
        await pilot.press("left_square_bracket", "left_square_bracket")   # sort by n_tokens ↓
        by_len = [r[0] for r in sql(run, "SELECT request_id FROM sequences WHERE step = ? "
                                         "ORDER BY n_tokens DESC", [ONSET_STEP])]
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == by_len
        await pilot.press("f")
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == by_len[::-1]
        # a click on the "max |r|" header sorts by it, a second click flips the order
        x = sum(c.get_render_width(table) for c in table.ordered_columns[:3]) + 1
        await pilot.click("#seqs", offset=(x, 0))
        by_max = [r[0] for r in sql(run, "SELECT request_id FROM sequences WHERE step = ? "
                                         "ORDER BY max_abs_log_ratio DESC", [ONSET_STEP])]
        assert step.sort_col == 3 and step.sort_reverse
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == by_max
        await pilot.click("#seqs", offset=(x, 0))
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == by_max[::-1]
        await pilot.press("full_stop")           # next step
        await settle(pilot)
        assert step.step == ONSET_STEP + 1
        assert str(table.get_row_at(0)[0]).startswith(f"s{ONSET_STEP + 1}-")


@run_async
async def test_replay_panel_toggles_fix_and_replays_or_says_why_not(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_timeline(pilot, settle)
        await pilot.press("p")
        await settle(pilot)
        panel = app.screen
        assert isinstance(panel, ReplayScreen) and panel.step == ONSET_STEP
        await pilot.press("1")
        assert panel.query_one("#fix-processed_logprobs", Checkbox).value is True
        await pilot.press("v", "e")
        req = panel.request()
        assert (req.fixes, req.preset, req.engine) == (("processed_logprobs",), "v0", "vllm")
        await pilot.press("e", "v")
        await pilot.press("r")
        await settle(pilot, rounds=10)
        reason = engine_adapter.availability("replay")
        status = str(panel.query_one("#replay-status", Static).render())
        if reason is not None:
            assert f"replay engine not available: {reason}" in status
            assert panel.query_one("#replay-results", DataTable).row_count == 0
        elif isinstance(app.screen, ErrorScreen):
            # the engine could not replay these recordings: a clear error, no numbers
            assert app.screen.err_title and app.screen.err_msg
        else:
            n = sql(run, "SELECT count(*) FROM sequences WHERE step = ?", [ONSET_STEP])[0][0]
            assert panel.query_one("#replay-results", DataTable).row_count == n


@run_async
async def test_sql_console_runs_query_shows_errors_and_keeps_history(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_timeline(pilot, settle)
        await pilot.press("s")
        console = app.screen
        assert isinstance(console, SqlScreen)
        editor = console.query_one("#sql-editor", TextArea)
        q1 = "SELECT step, count(*) AS n FROM run.tokens GROUP BY step ORDER BY step"
        editor.text = q1
        await pilot.press("f5")
        await settle(pilot)
        want = sql(run, "SELECT step, count(*) FROM tokens GROUP BY step ORDER BY step")
        table = console.query_one("#sql-results", DataTable)
        assert table.row_count == len(want)
        got = [tuple(c.value for c in table.get_row_at(i)) for i in range(table.row_count)]
        assert got == want
        # the reference's schema is there too
        editor.text = "SELECT count(*) FROM ref.sequences"
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert table.get_row_at(0)[0].value == 6 * N_SEQS
        # a bad query: the error in place, the app goes on
        editor.text = "SELEC nonsense FROM nowhere"
        await pilot.press("f5")
        await settle(pilot)
        status = console.query_one("#sql-status", Static)
        assert "error" in str(status.render()).lower() and status.has_class("error-text")
        assert console.last.error and isinstance(app.screen, SqlScreen)
        with pytest.raises(duckdb.Error):
            duckdb.sql("SELEC nonsense FROM nowhere")
        # history
        assert console.history == [q1, "SELECT count(*) FROM ref.sequences", "SELEC nonsense FROM nowhere"]
        await pilot.press("ctrl+up")
        assert editor.text == "SELEC nonsense FROM nowhere"
        await pilot.press("ctrl+up", "ctrl+up")
        assert editor.text == q1
        await pilot.press("ctrl+down")
        assert editor.text == "SELECT count(*) FROM ref.sequences"


@run_async
async def test_live_recording_refreshes_as_steps_arrive(tmp_path, settle):
    path = tmp_path / "recordings" / "live"
    rec = Recorder(path, run_config={"model": "tiny"}, run_id="live")
    try:
        write_steps(rec, range(2), diverge_from=None, seed=3)
        rec.flush()
        app = make_app(path, root=tmp_path / "recordings", live_interval=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            tl = await open_timeline(pilot, settle)
            assert tl.timeline.status == "recording" and tl.timeline.steps == [0, 1]
            assert "live" in str(tl.query_one("#tl-title", Static).render())
            write_steps(rec, range(2, 5), diverge_from=None, seed=3)
            rec.flush()
            for _ in range(500):               # the live timer refreshes every 0.05 s
                if tl.timeline.steps == [0, 1, 2, 3, 4]:
                    break
                await pilot.pause(0.02)
            assert tl.timeline.steps == [0, 1, 2, 3, 4]
            assert len(tl.query_one("#plot-reward", MetricPlot).run) == 5
            rec.close()
            for _ in range(500):
                if tl.timeline.status == "complete":
                    break
                await pilot.pause(0.02)
            assert tl.timeline.status == "complete" and tl._live_timer is None
    finally:
        rec.close()


@run_async
async def test_help_screen_and_error_modal(tmp_path, settle):
    (tmp_path / "empty").mkdir()
    app = make_app(tmp_path / "empty", root=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)          # not a recording
        assert app.screen.err_title == "not a recording"
        assert "manifest.json" in app.screen.err_msg
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        assert "no recordings" in str(app.screen.query_one("#runs-title", Static).render())


@run_async
async def test_escape_cancels_running_work_before_going_back(run_paths, settle):
    run, ref = run_paths
    app = make_app(run, ref)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_timeline(pilot, settle)
        await pilot.press("enter")
        await settle(pilot)
        step = app.screen
        import threading
        gate = threading.Event()

        def slow() -> None:
            gate.wait(5)

        worker = step.run_worker(slow, thread=True, name="slow query", exit_on_error=False)
        await pilot.pause()
        await pilot.press("escape")
        assert worker.is_cancelled and app.screen is step   # cancelled, not gone back
        gate.set()
        await settle(pilot)
        await pilot.press("escape")
        assert isinstance(app.screen, TimelineScreen)


@pytest.mark.slow
@pytest.mark.timeout(900)
@run_async
async def test_real_replay_from_the_panel_lands_beside_the_recorded_values(demo_runs, tmp_path, settle):
    """The demo's v1 run (a real run on the reference engine): replay a step with processed_logprobs."""
    import shutil
    out = demo_runs[0]
    root = tmp_path / "recordings"
    for name in ("v0", "v1"):
        shutil.copytree(out / name, root / name)
    run, ref = root / "v1", root / "v0"
    app = make_app(run, ref, root=root)
    async with app.run_test(size=(120, 40)) as pilot:
        tl = await open_timeline(pilot, settle)
        await pilot.press("home", "right")        # step 1: the first in-flight update lands there
        step_no = tl.step
        await pilot.press("enter")
        await settle(pilot)
        step = app.screen
        await pilot.press("p")
        await settle(pilot)
        panel = app.screen
        assert engine_adapter.availability("replay") is None
        await pilot.press("1", "r")
        for _ in range(600):
            await settle(pilot, rounds=1)
            if panel.outcome is not None or isinstance(app.screen, ErrorScreen):
                break
            await pilot.pause(0.2)
        assert not isinstance(app.screen, ErrorScreen), (app.screen.err_title, app.screen.err_msg)
        cfg_id = panel.outcome.config_id
        want = sql(run, """SELECT t.request_id, avg(abs(t.lp_trainer - rp.logprobs[t.pos + 1]))
                           FROM tokens t JOIN replays rp ON rp.step = t.step AND rp.request_id = t.request_id
                           WHERE t.step = ? AND rp.engine_config = ? GROUP BY 1""", [step_no, cfg_id])
        assert want, "the replay wrote rows into the replays table"
        table = panel.query_one("#replay-results", DataTable)
        assert table.row_count == len(want)
        shown = {str(table.get_row_at(i)[0]): table.get_row_at(i)[2].value for i in range(table.row_count)}
        assert shown == {rid: pytest.approx(v) for rid, v in want}
        assert "processed_logprobs" in str(panel.query_one("#replay-status", Static).render())
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is step
        d = step.detail
        lp = sql(run, "SELECT logprobs[? + 1] FROM replays WHERE step = ? AND request_id = ? "
                      "AND engine_config = ?", [d.pos, step_no, d.request_id, cfg_id])[0][0]
        assert [(label, e, v) for label, e, v in d.replays] == [("v1+proc", "reference", pytest.approx(lp))]
        # bisect the fixes at the same step: the ablation table of replay.diagnose.bisect, in place
        await pilot.press("p")
        await settle(pilot)
        panel = app.screen
        await pilot.press("b")
        for _ in range(3000):
            await settle(pilot, rounds=1)
            if panel.query_one("#ablation", DataTable).display or isinstance(app.screen, ErrorScreen):
                break
            await pilot.pause(0.2)
        assert not isinstance(app.screen, ErrorScreen), (app.screen.err_title, app.screen.err_msg)
        ablation = panel.query_one("#ablation", DataTable)
        labels = [str(ablation.get_row_at(i)[0]) for i in range(ablation.row_count)]
        # the recorded config, each fix alone, all but each, cumulative to the 2nd and 3rd, all four
        assert labels[0] == "recorded" and len(labels) == 1 + 4 + 4 + 2 + 1
        assert labels[1] == "only proc" and labels[-2] == "cum to paused" and labels[-1] == "all lacking"
        assert [str(c.label) for c in ablation.ordered_columns][:3] == ["label", "at_floor", "mean_abs_residual"]
        status = str(panel.query_one("#replay-status", Static).render())
        # step 1's update lands after every prefill: its one inference-path error is the late step
        # of an async update, which either the paused update or async scheduling off removes
        assert "needs processed_logprobs, paused_weight_update, fp32_lm_head" in status
        assert "alternatively: v0_runtime_defaults in place of paused_weight_update" in status
