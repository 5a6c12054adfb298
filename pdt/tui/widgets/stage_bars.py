"""One progress bar per stage, for jobs that run in stages (the dataset build's five).

What it is: a list of `stage  ███░░  done/total` rows, in the order the stages first reported
progress, plus the stage's counters (`dataset/<stage>/<name>` metrics, e.g. QC rejections).
Hidden while a job reports at most one stage (a pretrain). What it is not: the main step bar
(`progress_pane.py`).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from pdt.tui.run_state import RunState
from pdt.tui.units import fmt_count


class StageBars(Vertical):
    """`stage` label, bar and counters per stage."""

    DEFAULT_CSS = """
    StageBars {
        height: auto;
        padding: 0 1;
        display: none;
    }
    StageBars.-multi {
        display: block;
    }
    StageBars > Static {
        height: 1;
    }
    StageBars > ProgressBar > Bar {
        width: 1fr;
    }
    """

    def compose(self) -> ComposeResult:
        return iter(())

    def show(self, state: RunState) -> None:
        stages = state.stages
        self.set_class(len(stages) > 1, "-multi")
        for name, (done, total) in stages.items():
            label_id, bar_id = f"stage-label-{name}", f"stage-bar-{name}"
            if not self.query(f"#{bar_id}"):
                self.mount(Static(id=label_id), ProgressBar(total=None, show_eta=False, id=bar_id))
            bar = self.query_one(f"#{bar_id}", ProgressBar)
            bar.update(total=max(total, 1), progress=done)
            counters = [
                f"{key.rsplit('/', 1)[-1]} {fmt_count(value)}"
                for key, value in state.metrics.items()
                if key.startswith(f"dataset/{name}/")
            ]
            text = f"{name}  {done:,}/{total:,}" + (f"  ·  {'  '.join(counters)}" if counters else "")
            self.query_one(f"#{label_id}", Static).update(text)

    def row_text(self, name: str) -> str:
        return str(self.query_one(f"#stage-label-{name}", Static).render())
