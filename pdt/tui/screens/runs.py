"""The runs screen: every run folder under `logs/`, newest first, to attach to or replay.

What it is: a table (run, preset, status, started) read on a worker thread; enter opens the run
screen on that folder — a live run is followed (and can be stopped), a finished one is replayed.
What it is not: a run manager (nothing is deleted or renamed here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from pdt.runs import RunInfo, list_runs

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
- **escape** — back to the presets
"""

    BINDINGS = [
        Binding("enter", "open", "Open"),
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
            hint.update(f"{len(message.runs)} run(s) — enter: open (live follow or replay)")
        else:
            hint.update("No runs yet: runs appear here once a preset has been started.")
        table.focus()

    @on(DataTable.RowSelected)
    def _on_row(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        from pathlib import Path

        table = self.query_one(DataTable)
        if table.row_count == 0:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        if key is None:
            return
        app: PDTApp = self.app  # type: ignore[assignment]
        app.pop_screen()
        app.open_run_dir(Path(key))
