"""A staged job (the dataset build) gets one bar per stage with its counters; a pretrain gets none."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import ProgressBar

from pdt.telemetry.events import Done, Metric, Progress, RunStarted
from pdt.tui.app import PDTApp
from pdt.tui.event_source import ListEventSource
from pdt.tui.screens.run import RunScreen
from pdt.tui.widgets.run_status import RunStatus
from pdt.tui.widgets.stage_bars import StageBars

from .conftest import FINISHED, screen_text, training_events, wait_until

T0 = 1_700_000_000.0


def dataset_events() -> list:
    return [
        RunStarted(run="ds-1", preset="dataset_tiny", preset_kind="dataset", pid=1, t=T0),
        Progress(step=300, total=300, stage="preflight", t=T0 + 1),
        Metric(name="dataset/preflight/rejected_short", value=4, step=300, t=T0 + 1),
        Progress(step=2, total=5, stage="plans", t=T0 + 2),
        Done(status="stopped", t=T0 + 3),
    ]


async def _open(app: PDTApp, pilot, events: list) -> RunScreen:  # noqa: ANN001
    app.open_source(ListEventSource(events, delay=0.001))
    await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
    screen = app.screen
    await wait_until(pilot, lambda: screen.query_one(RunStatus).kind in ("stopped", "finished"))
    return screen


async def test_dataset_stages_each_get_a_bar(workdir: Path) -> None:
    app = PDTApp()
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(app, pilot, dataset_events())
        bars = screen.query_one(StageBars)
        assert bars.has_class("-multi") and bars.display
        assert "preflight  300/300" in bars.row_text("preflight")
        assert "rejected_short 4" in bars.row_text("preflight")
        assert bars.row_text("plans").startswith("plans  2/5")
        plans = bars.query_one("#stage-bar-plans", ProgressBar)
        assert (plans.progress, plans.total) == (2, 5)
        assert "preflight" in screen_text(app) and "plans  2/5" in screen_text(app)


async def test_single_stage_run_has_no_stage_bars(workdir: Path) -> None:
    events = training_events(steps=5, total=10, final=FINISHED)
    events = [
        e
        if not isinstance(e, Progress)
        else Progress(step=e.step, total=e.total, tokens=e.tokens, stage="pretrain", t=e.t)
        for e in events
    ]
    app = PDTApp()
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(app, pilot, events)
        assert not screen.query_one(StageBars).has_class("-multi")


async def test_home_shows_whether_a_dataset_is_built(workdir: Path, monkeypatch) -> None:  # noqa: ANN001
    import json

    from pdt.tui.widgets.preset_list import PresetList

    monkeypatch.setenv("PDT_DATA_DIR", str(workdir / "data"))
    for name in ("ds_built", "ds_new"):
        preset = {"name": name, "kind": "dataset", "description": "a dataset"}
        (workdir / "presets" / f"{name}.json").write_text(json.dumps(preset), encoding="utf-8")
    manifest = workdir / "data" / "processed" / "ds_built" / "export" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}", encoding="utf-8")
    app = PDTApp()
    async with app.run_test(size=(100, 30)) as pilot:
        presets = app.screen.query_one(PresetList)
        await wait_until(pilot, lambda: bool(presets.rows))
        assert presets.row("ds_built").status == "built"
        assert presets.row("ds_new").status == "not started"
        assert "ds_built  built" in screen_text(app)
