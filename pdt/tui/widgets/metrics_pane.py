"""The run screen's metrics pane: the latest value of every metric, known ones first.

What it is: a compact label/value table (loss, eval loss and perplexity, learning rate,
tokens/s, MFU when the job reports it, gradient norm, then any other metric by name). What it
is not: a history — the loss curves live in `loss_plot.py`.
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from pdt.tui.units import fmt_count

#: metric name -> (label, format). Order is display order; labels fit a 30-column side pane.
KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "train/loss": ("loss", "{:.4f}"),
    "eval/loss": ("eval", "{:.4f}"),
    "eval/ppl": ("ppl", "{:.2f}"),
    "lr": ("lr", "{:.2e}"),
    "throughput/tokens_per_s": ("tok/s", "{:,.0f}"),
    "throughput/mfu": ("MFU", "{:.1%}"),
    "grad_norm": ("grad", "{:.3f}"),
}


def _fmt(value: float, fmt: str) -> str:
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def pairs_grid(pairs: list[tuple[str, str]], label_w: int = 6, value_w: int = 10) -> Content:
    """Label/value pairs, two per line: "loss  2.3456    eval  2.4012" (32 columns)."""
    cells = [
        Content.assemble((f"{label:<{label_w}}", "dim"), (f"{value:<{value_w}}", "bold"))
        for label, value in pairs
    ]
    lines = [Content("").join(cells[i : i + 2]).rstrip() for i in range(0, len(cells), 2)]
    return Content("\n").join(lines)


class MetricsPane(Static):
    """Latest metrics; `show(metrics)` with the state's name -> value map."""

    DEFAULT_CSS = """
    MetricsPane {
        height: auto;
        padding: 0 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("no metrics yet", id=id)

    def show(self, metrics: dict[str, float]) -> None:
        self.update(self.describe(metrics))

    @staticmethod
    def describe(metrics: dict[str, float]) -> Content:
        if not metrics:
            return Content.styled("no metrics yet", "dim")
        pairs = [
            (label, _fmt(metrics[name], fmt))
            for name, (label, fmt) in KNOWN_METRICS.items()
            if name in metrics
        ]
        grid = pairs_grid(pairs) if pairs else Content("")
        others = []
        for name in sorted(set(metrics) - set(KNOWN_METRICS)):  # unknown names: one per line, full name
            value = metrics[name]
            shown = fmt_count(value) if abs(value) >= 1e4 else f"{value:.4g}"
            others.append(Content.assemble((f"{name} ", "dim"), (shown, "bold")))
        return Content("\n").join([grid, *others] if pairs else others)
