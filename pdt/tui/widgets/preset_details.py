"""The home screen's details pane: the selected preset's description, status and key settings.

What it is: a scrollable static view of one `PresetRow` (an invalid preset shows its error,
one problem per line). What it is not: an editor (see `screens/editor.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Static

from pdt.tui.preset_catalog import PresetRow


def _line(label: str, value: str, style: str = "") -> Content:
    return Content.assemble((f"{label:<12}", "dim"), (value, style))


def _short_path(path: Path) -> str:
    """Relative to the working directory when inside it (shorter, and what the user typed)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class PresetDetails(VerticalScroll):
    """Shows one preset; `show(None)` shows a hint."""

    DEFAULT_CSS = """
    PresetDetails {
        height: 1fr;
        padding: 0 1;
    }
    PresetDetails > Static {
        width: 1fr;
    }
    """

    def compose(self) -> ComposeResult:
        yield Static("Select a preset.", id="details-body")

    def show(self, row: PresetRow | None) -> None:
        self.query_one("#details-body", Static).update(self.describe(row))

    @staticmethod
    def describe(row: PresetRow | None) -> Content:
        if row is None:
            return Content("No presets found: add a JSON preset to the presets folder.")
        info = row.info
        lines: list[Content] = [Content.assemble((info.name, "bold $accent"), (f"  {row.group}", "dim"))]
        if info.description:
            lines += [Content(""), Content(info.description)]
        lines.append(Content(""))
        if info.error:
            lines.append(Content.assemble(("invalid preset", "bold $error"), ("  (e: edit to fix)", "dim")))
            lines += [Content.styled(part, "$error") for part in info.error.split("\n")]
        else:
            lines.append(_line("checkpoint", row.status, "bold" if row.status != "not started" else ""))
        if row.last_run is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_run.started))
            lines.append(_line("last run", f"{row.last_run.status}  {row.last_run.path.name}  ({when})"))
        lines.append(_line("file", _short_path(info.path), "dim"))
        if row.settings:
            lines += [Content(""), Content.styled("settings", "bold")]
            width = max(len(key) for key, _ in row.settings)
            lines += [Content.assemble((f"{key:<{width}}  ", "dim"), value) for key, value in row.settings]
        if not info.error:
            lines += [Content(""), Content.styled("enter: run · e: edit · v: view · d: duplicate", "dim")]
        return Content("\n").join(lines)
