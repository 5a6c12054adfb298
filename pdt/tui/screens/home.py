"""The home screen: presets grouped by kind with their status, and the selected one's details.

What it is: the list (`PresetList`) and details pane (`PresetDetails`), refreshed on a worker
thread (preset files, checkpoint states and run folders are read off the UI thread) when the
screen is shown and every few seconds. Keys: enter runs, `e`/`v` edit/view, `d` duplicates,
`r` lists runs to attach to. What it is not: a launcher — the app owns job processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList

from pdt.tui.preset_catalog import PresetRow, load_catalog
from pdt.tui.widgets.preset_details import PresetDetails
from pdt.tui.widgets.preset_list import PresetList

if TYPE_CHECKING:
    from pdt.tui.app import PDTApp

#: Seconds between background refreshes of statuses while the home screen is shown.
REFRESH_S = 5.0


class HomeScreen(Screen):
    """Presets by kind; enter runs the highlighted one."""

    HELP = """\
## Presets

Each preset is a JSON file describing one job. Presets are grouped by kind;
invalid ones are listed last with their error.

- **enter** — run the preset (a job in its own process; the UI stays responsive)
- **e** / **v** — edit / view its JSON (validated before it is saved)
- **d** — duplicate it into a new preset and edit the copy
- **r** — runs under `logs/`: attach to a live one or replay a finished one
- **q** — quit (running jobs keep running)
"""

    BINDINGS = [
        Binding("enter", "run", "Run"),
        Binding("e", "edit", "Edit"),
        Binding("v", "view", "View"),
        Binding("d", "duplicate", "Duplicate"),
        Binding("r", "runs", "Runs"),
    ]

    @dataclass
    class CatalogLoaded(Message):
        rows: list[PresetRow]
        error: str | None = None

    @dataclass
    class Duplicated(Message):
        path: Path

    @property
    def pdt_app(self) -> PDTApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="home-body"):
            yield PresetList(id="presets")
            yield PresetDetails(id="details")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#presets").border_title = "presets"
        self.query_one("#details").border_title = "details"
        self.set_interval(REFRESH_S, self._refresh_if_current)

    def on_screen_resume(self) -> None:
        self.refresh_catalog()

    def _refresh_if_current(self) -> None:
        if self.is_current:
            self.refresh_catalog()

    def refresh_catalog(self) -> None:
        self._load(self.pdt_app.presets_folder, self.pdt_app.running_presets())

    @work(thread=True, exclusive=True, exit_on_error=False, group="catalog")
    def _load(self, folder: Path | None, running: frozenset[str]) -> None:
        try:
            rows = load_catalog(folder, running)
        except Exception as exc:  # noqa: BLE001 - shown in the details pane instead of crashing
            self.post_message(self.CatalogLoaded([], error=f"cannot list presets: {exc}"))
            return
        self.post_message(self.CatalogLoaded(rows))

    @on(CatalogLoaded)
    def _on_catalog(self, message: CatalogLoaded) -> None:
        if message.error:
            self.notify(message.error, severity="error")
            return
        presets = self.query_one(PresetList)
        presets.set_rows(message.rows)
        self.query_one(PresetDetails).show(presets.row(presets.highlighted_name))

    @on(OptionList.OptionHighlighted, "#presets")
    def _on_highlight(self) -> None:
        presets = self.query_one(PresetList)
        self.query_one(PresetDetails).show(presets.row(presets.highlighted_name))

    @on(OptionList.OptionSelected, "#presets")
    def _on_select(self) -> None:
        self.action_run()

    def selected(self) -> PresetRow | None:
        presets = self.query_one(PresetList)
        return presets.row(presets.highlighted_name)

    # ---------------------------------------------------------------- actions

    def action_run(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.info.error:
            self.notify("This preset is invalid: press e to fix it.", severity="error")
            return
        app = self.pdt_app
        running = app.running_run_dir(row.name)
        if running is not None:
            self.notify(f"{row.name} is already running: attaching to it.")
            app.open_run_dir(running)
            return
        app.launch(row.info, row.nproc)

    def action_edit(self) -> None:
        self._open_editor(read_only=False)

    def action_view(self) -> None:
        self._open_editor(read_only=True)

    def _open_editor(self, read_only: bool) -> None:
        from pdt.tui.screens.editor import EditorScreen

        row = self.selected()
        if row is not None:
            self.app.push_screen(EditorScreen(row.info.path, read_only=read_only))

    def action_runs(self) -> None:
        from pdt.tui.screens.runs import RunsScreen

        self.app.push_screen(RunsScreen())

    def action_duplicate(self) -> None:
        row = self.selected()
        if row is not None:
            self._duplicate(row.info.path, row.name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="duplicate")
    def _duplicate(self, path: Path, name: str) -> None:
        try:
            target = duplicate_preset(path, name)
        except (OSError, ValueError) as exc:
            self.app.call_from_thread(self.notify, f"cannot duplicate {name}: {exc}", severity="error")
            return
        self.post_message(self.Duplicated(target))

    @on(Duplicated)
    def _on_duplicated(self, message: Duplicated) -> None:
        from pdt.tui.screens.editor import EditorScreen

        self.notify(f"created {message.path.name}")
        self.app.push_screen(EditorScreen(message.path))


def duplicate_preset(path: Path, name: str) -> Path:
    """Copy a preset to `<name>-copy[-N].json` beside it, renaming it inside (names are unique)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    n, new_name = 1, f"{name}-copy"
    while (path.parent / f"{new_name}.json").exists():
        n += 1
        new_name = f"{name}-copy-{n}"
    data["name"] = new_name
    target = path.parent / f"{new_name}.json"
    with open(target, "x", encoding="utf-8") as fh:  # "x": never overwrite a preset
        fh.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return target
