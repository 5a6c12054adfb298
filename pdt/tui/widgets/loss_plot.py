"""The run screen's loss plot: train and eval loss against the optimizer step.

What it is: a textual-plotext `PlotextPlot` redrawn only when the history changed; long
histories are thinned to a few points per terminal column (plotext draws every point it is
given, and a 100k-step run would otherwise cost a visible frame). What it is not: a metrics
store — the run state keeps the full history.
"""

from __future__ import annotations

from textual_plotext import PlotextPlot

#: Points kept per curve: about two per column of a wide terminal.
MAX_POINTS = 400


def thin(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """Every k-th point so at most `limit` remain; the last point is always kept."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)  # ceil
    out = points[::stride]
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


class LossPlot(PlotextPlot):
    """`show(history)` with the state's {'train/loss': [(step, value)], 'eval/loss': [...]}."""

    DEFAULT_CSS = """
    LossPlot {
        height: 1fr;
        min-height: 6;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self._sizes: tuple[int, ...] = ()
        self.curves: dict[str, list[tuple[int, float]]] = {}

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def show(self, history: dict[str, list[tuple[int, float]]]) -> None:
        sizes = tuple(len(points) for points in history.values())
        if sizes == self._sizes:
            return
        self._sizes = sizes
        self.curves = {name: thin(points) for name, points in history.items() if points}
        self._draw()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("step")
        for name, points in self.curves.items():
            label = name.split("/")[0]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if name.startswith("eval"):
                plt.plot(xs, ys, label=label, marker="dot", color="orange")
            else:
                plt.plot(xs, ys, label=label, marker="braille", color="cyan")
        if not self.curves:
            plt.title("loss: waiting for the first metric")
        self.refresh()
