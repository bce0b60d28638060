"""The diagnosis in the TUI, driven by Pilot over a real demo run: the verdict and the components
per step on the timeline (`d`), the step view colouring tokens by a component (`c`)."""
from __future__ import annotations

import shutil

import pytest
from textual.widgets import Static

from tui.app import make_app
from tui.screens.step import StepScreen
from tui.screens.timeline import DIAGNOSE_HINT, TimelineScreen
from tui.widgets.plot import MetricPlot
from tui.widgets.tokens import TokenLegend, TokenView, bucket

from tui_fixtures import run_async

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def demo_copy(demo_runs, tmp_path):
    """Private copies of the demo's v1 and v0 (the diagnosis stores its reference in v1)."""
    out = tmp_path / "recordings" / "demo"
    for name in ("v1", "v0"):
        shutil.copytree(demo_runs[0] / name, out / name)
    return out / "v1", out / "v0"


@run_async
async def test_timeline_diagnoses_and_plots_the_components(demo_copy, settle):
    run, ref = demo_copy
    app = make_app(run, ref, root=run.parent.parent)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        tl = app.screen
        assert isinstance(tl, TimelineScreen)
        line = tl.query_one("#tl-diagnosis", Static)
        assert str(line.render()) == DIAGNOSE_HINT              # nothing stored yet
        plot = tl.query_one("#plot-components", MetricPlot)
        assert plot.run == [] and plot.ref == []
        await pilot.press("d")
        await settle(pilot, rounds=8)
        assert tl.diagnosis is not None and tl.diagnosis["verdict"] == "backend"
        text = str(line.render())
        assert text.startswith("diagnosis: backend") and "processed_logprobs" in text
        steps = [r["step"] for r in tl.diagnosis["per_step"]]
        assert [x for x, _ in plot.run] == steps               # |e_backend| per step, from the stored reference
        want = {r["step"]: r["backend_mean_abs"] for r in tl.diagnosis["per_step"]}
        assert all(abs(y - want[x]) < 1e-9 for x, y in plot.run)
        assert all(y == 0.0 for _, y in plot.ref)              # the demo trainer is exact
        assert plot.names == ("backend", "trainer") and plot.onset == tl.diagnosis["onset_step"]


@run_async
async def test_step_view_colours_tokens_by_a_component(demo_copy, settle):
    from replay.diagnose.reference import reference_scores

    run, ref = demo_copy
    reference_scores(run)   # what `replay diagnose` stores first
    app = make_app(run, ref, root=run.parent.parent)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("right", "enter")
        await settle(pilot)
        step = app.screen
        assert isinstance(step, StepScreen)
        legend, view = step.query_one(TokenLegend), step.query_one(TokenView)
        assert legend.what == "r"
        toks = step.tokens
        assert set(toks.components) == {"e_backend", "e_trainer", "lag", "semantics"}
        assert view.buckets == [bucket(None if v is None else abs(v)) for v in toks.log_ratio]
        await pilot.press("c")
        await settle(pilot)
        assert legend.what == "e_backend" and "|e_backend|" in str(legend.render())
        assert view.buckets == [bucket(None if v is None else abs(v)) for v in toks.components["e_backend"]]
        assert view.buckets != [bucket(None if v is None else abs(v)) for v in toks.log_ratio]
        detail = step.detail
        assert set(detail.components) == {"e_backend", "e_trainer", "lag", "semantics"}
        for _ in range(4):                                      # e_trainer, lag, semantics, back to r
            await pilot.press("c")
            await settle(pilot)
        assert legend.what == "r"
