"""The home screen's preset list: presets grouped by kind, one row each with its status.

What it is: an `OptionList` whose group headers are disabled options (so the cursor skips
them), rows keyed by preset name, the quickstart starred. What it is not: a loader — the screen
hands it `PresetRow`s read on a worker thread.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.content import Content
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from pdt.tui.preset_catalog import INVALID, KIND_BLURB, QUICKSTART, PresetRow

_STATUS_STYLE = {
    "running": "bold $accent",
    "finished": "$success",
    "not started": "$text-muted",
    INVALID: "$error",
}
#: last run status -> (icon, style); the row shows e.g. "step 50/120  ✖ failed" (details say "last run").
_RUN_MARK = {
    "failed": ("✖", "$error"),
    "stopped": ("■", "$warning"),
    "finished": ("✔", "$success"),
    "unknown": ("?", "dim"),
}


class PresetList(OptionList):
    """Presets grouped by kind. Option ids are preset names; headers have ids `group:<kind>`."""

    BINDINGS = [Binding("enter", "select", "Run")]  # OptionList's own enter is hidden from the footer

    DEFAULT_CSS = """
    PresetList {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self._rows: list[PresetRow] = []

    @property
    def rows(self) -> list[PresetRow]:
        return list(self._rows)

    def set_rows(self, rows: list[PresetRow]) -> None:
        """Replace the rows, keeping the cursor on the same preset (or on the quickstart)."""
        if rows == self._rows:
            return
        keep = self.highlighted_name
        self._rows = list(rows)
        options: list[Option] = []
        group = None
        for row in rows:
            if row.group != group:
                group = row.group
                count = sum(1 for r in rows if r.group == group)
                options.append(Option(self._header(group, count), id=f"group:{group}", disabled=True))
            options.append(Option(self._prompt(row), id=row.name))
        self.set_options(options)
        names = [r.name for r in rows]
        starred = [r.name for r in self._rows if r.starred]
        target = keep if keep in names else (starred[0] if starred else (names or [None])[0])
        if target is not None:
            self.highlighted = self.get_option_index(target)

    @property
    def highlighted_name(self) -> str | None:
        option = self.highlighted_option
        if option is None or option.id is None or option.id.startswith("group:"):
            return None
        return option.id

    def row(self, name: str | None) -> PresetRow | None:
        return next((r for r in self._rows if r.name == name), None)

    @staticmethod
    def _header(group: str, count: int) -> Content:
        blurb = KIND_BLURB.get(group)
        return Content.assemble(
            (group.upper(), "bold"), (f"  {count}", "dim"), (f" · {blurb}" if blurb else "", "dim italic")
        )

    @staticmethod
    def _prompt(row: PresetRow) -> Content:
        star = row.starred
        parts: list[str | tuple[str, str]] = [
            ("★ " + row.name, "bold $accent") if star else ("  " + row.name, "bold"),
            ("  quickstart" if row.featured and row.name != QUICKSTART else "", "$accent"),
            "  ",
            (row.status, _STATUS_STYLE.get(row.status, "")),
        ]
        last = row.last_run_status
        if last and not row.running and last != row.status:
            icon, style = _RUN_MARK.get(last, ("·", "dim"))
            parts += ["  ", (f"{icon} {last}", style)]
        return Content.assemble(*parts)
