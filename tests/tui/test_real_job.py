"""The TUI with a real job: Enter on a tiny preset launches `main.py` as a child process, and the
run screen follows its events.jsonl to the end (progress, loss curve, checkpoint, final status)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import ProgressBar

from pdt.tui.app import PDTApp
from pdt.tui.screens.run import RunScreen
from pdt.tui.widgets.checkpoint_list import CheckpointList
from pdt.tui.widgets.loss_plot import LossPlot
from pdt.tui.widgets.preset_list import PresetList
from pdt.tui.widgets.run_status import RunStatus
from tests.conftest import TINY_PRETRAIN

from .conftest import screen_text, wait_until

TINY_JOB = {
    **TINY_PRETRAIN,
    "name": "e2e_tiny",
    "train": {**TINY_PRETRAIN["train"], "token_budget": 12 * 32 * 4, "eval_every": 6, "eval_batches": 1},
    "checkpoint": {"every_steps": 6},
}


@pytest.mark.timeout(300)
async def test_enter_runs_a_real_job_and_shows_its_progress(workdir: Path) -> None:
    (workdir / "presets" / "e2e_tiny.json").write_text(json.dumps(TINY_JOB), encoding="utf-8")
    app = PDTApp()
    async with app.run_test(size=(100, 30)) as pilot:
        presets = app.screen.query_one(PresetList)
        await wait_until(pilot, lambda: bool(presets.rows))
        presets.highlighted = presets.get_option_index("e2e_tiny")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
        screen = app.screen
        status = screen.query_one(RunStatus)
        await wait_until(pilot, lambda: status.kind in ("finished", "failed", "exited"), timeout=240)
        assert status.kind == "finished", status.text
        bar = screen.query_one(ProgressBar)
        assert (bar.progress, bar.total) == (12, 12)
        curve = screen.query_one(LossPlot).curves["train/loss"]
        assert [step for step, _ in curve] == list(range(1, 13))
        assert "step 12" in str(screen.query_one(CheckpointList).render())
        assert "finished" in screen_text(app)
    assert (workdir / "checkpoints" / "e2e_tiny" / "current" / "state.json").is_file()
