"""Shared fixtures for the TUI tests: an isolated working folder with a few presets, and helpers
to read what the app actually drew and to wait for the reader thread."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

from pdt.telemetry.events import (
    Checkpoint,
    Done,
    Event,
    Log,
    Memory,
    Metric,
    Progress,
    RunStarted,
    Sample,
)

PRESETS = {
    "quickstart": {
        "name": "quickstart",
        "kind": "pretrain",
        "description": "Start here: the whole pipeline, tiny.",
        "distributed": {"nproc_per_node": 2},
    },
    "alpha": {
        "name": "alpha",
        "kind": "pretrain",
        "description": "Alpha trunk from scratch.",
        "train": {"token_budget": 200000, "lr": 0.002},
    },
    "beta": {"name": "beta", "kind": "pretrain", "description": "Beta trunk from scratch."},
    "broken": {"name": "broken", "kind": "pretrain", "train": {"lrr": 0.1}},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cwd with presets/, logs/ and checkpoints/ (the env points the core at them)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    for name, data in PRESETS.items():
        (presets / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PDT_PRESETS_DIR", str(presets))
    monkeypatch.setenv("PDT_LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("PDT_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    return tmp_path


def screen_text(app: App) -> str:
    """The plain text of what the current screen renders (the same frame a screenshot captures)."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        record=True,
        force_terminal=True,
        color_system="truecolor",
        legacy_windows=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the app run until `condition()` holds; fail with a clear message after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await pilot.pause(0.05)
    await pilot.pause(0.1)  # one more frame so the UI shows what the condition saw


def training_events(steps: int = 40, total: int = 100, final: Event | None = None) -> list[Event]:
    """A recorded run: start, progress + loss every step, eval/checkpoint every 20, sample, memory."""
    t0 = 1_700_000_000.0
    events: list[Event] = [RunStarted(run="alpha-1", preset="alpha", preset_kind="pretrain", pid=4242, t=t0)]
    for step in range(1, steps + 1):
        t = t0 + step * 0.5
        events.append(Progress(step=step, total=total, tokens=step * 2048, t=t))
        events.append(Metric(name="train/loss", value=round(10.0 - step * 0.1875, 4), step=step, t=t))
        if step % 20 == 0:
            events.append(Metric(name="eval/loss", value=round(10.2 - step * 0.18, 4), step=step, t=t))
            events.append(Checkpoint(step=step, slot="current", path=f"checkpoints/alpha/step-{step}", t=t))
            events.append(Log(level="info", message=f"evaluated at step {step}", t=t))
    t = t0 + steps * 0.5
    events += [
        Metric(name="lr", value=0.0025, step=steps, t=t),
        Metric(name="throughput/tokens_per_s", value=4096.0, step=steps, t=t),
        Memory(
            rss_bytes=3 * 2**30,
            available_bytes=12 * 2**30,
            gpu_allocated_bytes=5 * 2**30,
            gpu_reserved_bytes=6 * 2**30,
            gpu_peak_bytes=int(5.5 * 2**30),
            t=t,
        ),
        Sample(text="The history of tea begins in Yunnan", step=steps, prompt="The history of", t=t),
    ]
    if final is not None:
        events.append(final)
    return events


FINISHED = Done(status="finished", t=1_700_000_100.0)
