"""The runs screen: every run folder under `logs/`, newest first, to attach to or replay.

What it is: a table (run, preset, status, started) read on a worker thread; enter opens the run
screen on that folder — a live run is followed (and can be stopped), a finished one is replayed.
What it is not: a run manager (nothing is deleted or renamed here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from pdt.runs import RunInfo, list_runs
from pdt.telemetry.events import Done, RunStarted
from pdt.tui.event_source import ReplaySource
from pdt.tui.screens.manifests import ManifestPicker, find_manifests

if TYPE_CHECKING:
    from pdt.tui.app import PDTApp

#: DataTable cells are Rich renderables (no theme variables): plain colours.
_STATUS_STYLE = {"running": "bold cyan", "finished": "green", "stopped": "yellow", "failed": "bold red"}


class RunsScreen(Screen):
    """Runs under logs/; enter attaches, escape goes back."""

    HELP = """\
## Runs

Every run folder under `logs/`, newest first.

- **enter** — open it: a running job is followed live (and **s** stops it),
  a finished one is replayed from its `events.jsonl`
- **m** — replay a recorded answer of an inference run (or a pipeline's demo) at its
  recorded pace, from its `manifest-<n>.json` (with several answers, pick one first)
- **escape** — back to the presets
"""

    BINDINGS = [
        Binding("enter", "open", "Open"),
        Binding("m", "replay_manifest", "Replay answer"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    @dataclass
    class RunsLoaded(Message):
        runs: list[RunInfo]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("reading logs/…", id="runs-hint")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "runs"
        table = self.query_one(DataTable)
        table.add_columns("run", "preset", "status", "started")
        self._load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs")
    def _load(self) -> None:
        self.post_message(self.RunsLoaded(list_runs()))

    @on(RunsLoaded)
    def _on_runs(self, message: RunsLoaded) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for run in message.runs:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started))
            status = Text(run.status, style=_STATUS_STYLE.get(run.status, "dim"))
            table.add_row(run.path.name, run.preset, status, started, key=str(run.path))
        hint = self.query_one("#runs-hint", Static)
        if message.runs:
            hint.update(
                f"{len(message.runs)} run(s) — enter: open (live follow or replay) · m: replay an answer"
            )
        else:
            hint.update("No runs yet: runs appear here once a preset has been started.")
        table.focus()

    @on(DataTable.RowSelected)
    def _on_row(self) -> None:
        self.action_open()

    def _selected(self) -> Path | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return None if key is None else Path(key)

    def action_open(self) -> None:
        run_dir = self._selected()
        if run_dir is None:
            return
        app: PDTApp = self.app  # type: ignore[assignment]
        app.pop_screen()
        app.open_run_dir(run_dir)

    def action_replay_manifest(self) -> None:
        run_dir = self._selected()
        if run_dir is None:
            return
        manifests = find_manifests(run_dir)
        if not manifests:
            self.notify(
                "This run has no answer manifest (only inference runs write them).", severity="warning"
            )
        elif len(manifests) == 1:
            self._replay(manifests[0])
        else:
            self.app.push_screen(ManifestPicker(run_dir, manifests), self._replay)

    def _replay(self, path: Path | None) -> None:
        if path is None:
            return
        try:
            source = manifest_replay(path)
        except ImportError as exc:  # pdt.infer.manifest without manifest_events: an older checkout
            self.notify(f"replaying needs pdt.infer.manifest.manifest_events ({exc})", severity="error")
            return
        except Exception as exc:  # noqa: BLE001 - a damaged file is a message, never a crash
            self.notify(f"cannot replay {path.name}: {exc}", severity="error")
            return
        app: PDTApp = self.app  # type: ignore[assignment]
        app.pop_screen()
        app.open_source(source)


def manifest_replay(path: Path) -> ReplaySource:
    """A manifest's recorded answer as an event source, framed as a finished run."""
    from pdt.infer.manifest import load_manifest, manifest_events

    manifest = load_manifest(path)
    events = manifest_events(path)
    t0 = events[0].t if events else time.time()
    t1 = events[-1].t if events else t0
    head = RunStarted(run=path.parent.name, preset=manifest.preset, preset_kind="inference", pid=0, t=t0)
    return ReplaySource([head, *events, Done(status="finished", t=t1)], title=f"replay of {path.name}")
