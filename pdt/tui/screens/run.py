"""The run screen: a live (or replayed) view of one run's events — training, or the inference demo.

What it is: a reader thread that polls an `EventSource` ~10×/s and posts batches of events as a
message; the screen folds them into a `RunState` and redraws only the changed panes at most 20×/s.
Keys: `s` stops the job (first press: checkpoint and exit; second press: kill), `escape` goes back
(a job launched here keeps running and can be reattached from the runs list).
An inference run (RunStarted.preset_kind) shows the inference layout from its start; any other
run switches to it as soon as an answer starts (`decode_started`: a pipeline reaching its demo),
and back when a pipeline starts its next preset after the demo. The inference layout: one pane
per stream with its live text (provisional in italics, rolled-back blocks struck through until the
retry commits; stacked at 80 columns, side by side when wide), the notes-bus timeline, readiness
against γ, coverage, the gate trace, speed against the sequential baseline, memory with the KV
cache, and a prompt box that asks the running demo again (`pdt.infer.inbox`); once the job has
ended (or for a replay) the box says so and how to start the demo again.
What it is not: the job — it never touches training, only the event stream and the process.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static
from textual.worker import get_current_worker

from pdt.telemetry.events import Event
from pdt.tui.decode_state import DecodeView
from pdt.tui.event_source import EventSource, ReplaySource
from pdt.tui.run_state import RunState
from pdt.tui.widgets.checkpoint_list import CheckpointList
from pdt.tui.widgets.decode_panes import (
    BusTimeline,
    CoveragePane,
    GatePane,
    ReadinessPane,
    SpeedPane,
    StreamPane,
)
from pdt.tui.widgets.log_tail import LogTail
from pdt.tui.widgets.loss_plot import LossPlot
from pdt.tui.widgets.memory_pane import MemoryPane
from pdt.tui.widgets.metrics_pane import MetricsPane
from pdt.tui.widgets.progress_pane import ProgressPane
from pdt.tui.widgets.run_status import RunStatus
from pdt.tui.widgets.sample_pane import SamplePane
from pdt.tui.widgets.stage_bars import StageBars

#: Columns a stream pane needs to be readable side by side; narrower, the panes stack.
STREAM_MIN_WIDTH = 24
#: Redraws per second at most: the eye does not need more, a fast job must not starve input.
MAX_FPS = 20


class RunScreen(Screen):
    """One run: progress, loss curves, metrics, memory, checkpoints, sample, log, final status."""

    HELP = """\
## Run

A live view of one job (or the replay of a finished one).

- **s** — stop: the job saves a checkpoint at the next step and exits.
  Press **s** again to kill it at once (work since the last checkpoint is lost).
- Inference: type a prompt in the box at the bottom and press **Enter** to ask the
  running demo again (the model stays loaded); **tab** moves between the box and the panes.
- **escape** — back to the presets. A job started here keeps running;
  reattach with **r** on the home screen.
"""

    BINDINGS = [
        Binding("s", "stop", "Stop"),
        Binding("escape", "back", "Back"),
    ]

    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]

    @dataclass
    class EventsArrived(Message):
        """A batch from the reader thread; `ended` marks the last one."""

        events: list[Event]
        run_dir: Path | None = None
        ended: bool = False
        exit_code: int | None = None
        console_tail: list[str] = field(default_factory=list)
        failure: str | None = None

    def __init__(self, source: EventSource) -> None:
        super().__init__()
        self.source = source
        self.state = RunState()
        self.decode = DecodeView()
        self.stop_presses = 0
        self._dirty: set[str] = {"status", "progress"}

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunStatus(id="run-status")
        yield ProgressPane(id="progress")
        yield StageBars(id="stages")
        with Horizontal(id="run-main"):
            yield LossPlot(id="loss-plot")
            with Vertical(id="run-side"):
                yield MetricsPane(id="metrics")
                yield MemoryPane(id="memory")
                with VerticalScroll(id="checkpoints-box"):
                    yield CheckpointList(id="checkpoints")
        with Horizontal(id="run-bottom"):
            yield SamplePane(id="sample")
            yield LogTail(id="log")
        with Vertical(id="decode"):
            yield Static("", id="decode-prompt")
            with Horizontal(id="decode-body"):
                yield Container(id="streams")
                with VerticalScroll(id="decode-side"):
                    yield SpeedPane(id="speed")
                    yield BusTimeline(id="bus")
                    yield ReadinessPane(id="readiness")
                    yield CoveragePane(id="coverage")
                    yield GatePane(id="gates")
                    yield MemoryPane(id="decode-memory")
            yield Input(placeholder="ask again: type a prompt and press Enter", id="ask")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.source.title
        titles = {
            "#loss-plot": "loss",
            "#metrics": "metrics",
            "#memory": "memory",
            "#checkpoints-box": "checkpoints",
            "#sample": "sample",
            "#log": "log",
            "#speed": "speed",
            "#bus": "notes bus",
            "#readiness": "readiness",
            "#coverage": "coverage",
            "#gates": "SNC gates",
            "#decode-memory": "memory",
        }
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.set_interval(1 / MAX_FPS, self._flush)
        self.set_interval(1.0, self._tick)
        self._follow()

    # ---------------------------------------------------------------- reader thread

    @work(thread=True, exclusive=True, exit_on_error=False, group="run-events")
    def _follow(self) -> None:
        worker = get_current_worker()
        source = self.source
        try:
            source.start()
        except Exception as exc:  # noqa: BLE001 - shown to the user, never raised into the UI
            self.post_message(self.EventsArrived([], ended=True, failure=f"could not start the job: {exc}"))
            return
        self.post_message(self.EventsArrived([], run_dir=source.run_dir))
        while not worker.is_cancelled:
            try:
                events, ended = source.poll(), source.ended
            except Exception as exc:  # noqa: BLE001 - a broken file must not take the UI down
                self.post_message(self.EventsArrived([], ended=True, failure=f"reading events failed: {exc}"))
                return
            if ended:
                self.post_message(
                    self.EventsArrived(
                        events,
                        source.run_dir,
                        ended=True,
                        exit_code=source.exit_code(),
                        console_tail=source.console_tail(),
                    )
                )
                return
            if events:
                self.post_message(self.EventsArrived(events, source.run_dir))
            time.sleep(source.poll_interval_s)

    @on(EventsArrived)
    def _on_events(self, message: EventsArrived) -> None:
        if message.run_dir is not None:
            self.sub_title = message.run_dir.name
        self._dirty |= self.state.apply(message.events)
        decode = self.decode.apply(message.events)
        if decode:
            self._dirty |= {f"decode-{name}" for name in decode}
        if message.ended:
            self.state.end(message.exit_code, message.console_tail, message.failure)
            self._dirty |= {"status", "progress", "ended"}
        if self.state.preset_kind == "inference" and not self.decode.active:
            self._dirty.add(
                "decode-header"
            )  # an inference run: its layout from the start, not the first answer

    # ---------------------------------------------------------------- drawing

    def _tick(self) -> None:
        if self.state.final_status() is None:
            self._dirty |= {"progress", "status"}  # elapsed and ETA move with the clock

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        state = self.state
        if any(name.startswith("decode-") for name in dirty):
            self._flush_decode(dirty)
        if dirty & {"progress", "status"}:
            self.query_one(ProgressPane).show(state, time.time())
        if dirty & {"progress", "metrics"}:
            self.query_one(StageBars).show(state)
        if dirty & {"plot", "metrics"}:
            self.query_one(MetricsPane).show(state.metrics)
        if "plot" in dirty:
            self.query_one(LossPlot).show(state.history)
        if "memory" in dirty:
            self.query_one("#memory", MemoryPane).show(state.memory)
        if "checkpoints" in dirty:
            self.query_one(CheckpointList).show(state.checkpoints)
        if "sample" in dirty:
            self.query_one(SamplePane).show(state.sample)
        if state.pending_logs:
            log = self.query_one(LogTail)
            log.add(list(state.pending_logs))
            state.pending_logs.clear()
        if "ended" in dirty:
            final = state.final_status()
            if final is not None and final.kind == "exited":
                self.query_one(LogTail).add_console_tail(state.console_tail)
        if dirty & {"ended", "status", "decode-header"} and self.has_class("-decode"):
            self._show_ask_state()
        if dirty:
            kind, text = self.status()
            self.query_one(RunStatus).set_status(kind, text)

    def _flush_decode(self, dirty: set[str]) -> None:
        """Redraw the inference panes that changed (switching the layout on the first answer)."""
        v = self.decode
        if "decode-memory" in dirty:
            self.query_one("#decode-memory", MemoryPane).show(v.memory)
        if not v.active:
            inference = self.state.preset_kind == "inference"
            self.set_class(inference, "-decode")  # a pipeline past its demo: the training panes again
            if inference and "decode-header" in dirty:
                self.query_one("#decode-prompt", Static).update(
                    Text("loading the trunk and sidecars — the streams appear when the answer starts", "dim")
                )
            return
        if not self.has_class("-decode"):
            self.add_class("-decode")
        streams = self.query_one("#streams", Container)
        if dirty & {"decode-header", "decode-speed"} or len(streams.children) != len(v.streams):
            if len(streams.children) != len(v.streams):
                streams.remove_children()
                streams.mount_all([StreamPane(k) for k in range(len(v.streams))])
                self._grid_streams()
            knobs = f"K={v.k} τ={v.tau} Δ={v.lag} γ={v.gamma:.2f} g={v.g:g}"
            title = f"answer {v.answer + 1}" + (" · writing…" if v.answering else " · done")
            speedup = v.speedup()
            fast = f" ×{speedup:.2f} vs seq" if speedup is not None else ""
            line = Text.assemble((title, "bold"), (fast, "bold green"), "  ", v.prompt, "  ", (knobs, "dim"))
            self.query_one("#decode-prompt", Static).update(line)
        if "decode-streams" in dirty:
            for pane, view in zip(streams.query(StreamPane), v.streams, strict=False):
                pane.show(view)
        panes = {
            "decode-speed": (SpeedPane, "#speed"),
            "decode-notes": (BusTimeline, "#bus"),
            "decode-readiness": (ReadinessPane, "#readiness"),
            "decode-coverage": (CoveragePane, "#coverage"),
            "decode-gates": (GatePane, "#gates"),
        }
        for name, (cls, selector) in panes.items():
            if name in dirty:
                self.query_one(selector, cls).show(v)
        if dirty & {"decode-memory", "decode-speed"}:
            self.query_one("#decode-memory", MemoryPane).show(v.memory)
            self.query_one("#speed", SpeedPane).show(v)

    def can_ask(self) -> bool:
        """Whether the prompt box reaches a job: a run folder is known and its job still runs."""
        return self.source.run_dir is not None and self.state.final_status() is None

    def demo_preset(self) -> str:
        """The inference preset behind this view (a pipeline's: from its answer's manifest folder)."""
        if self.state.preset_kind == "inference" and self.state.preset:
            return self.state.preset
        for answer in reversed(self.decode.answers):
            if answer.manifest:
                return re.sub(r"^\d+-", "", Path(answer.manifest).parent.name)  # <index>-<name> of a pipeline
        return "the inference preset"

    def ask_closed_hint(self) -> str:
        what = "This is a replay" if isinstance(self.source, ReplaySource) else "The demo has ended"
        return (
            f"{what}, so nothing can answer here. To ask again: escape, then Enter on "
            f"{self.demo_preset()} on the home screen (started there, it stays up for more prompts)."
        )

    def ask_closed_placeholder(self) -> str:
        what = "a replay" if isinstance(self.source, ReplaySource) else "ended"
        return f"{what} · to ask again: esc, then Enter on {self.demo_preset()}"

    def _show_ask_state(self) -> None:
        ask = self.query_one("#ask", Input)
        closed = self.state.final_status() is not None or isinstance(self.source, ReplaySource)
        ask.set_class(closed, "-closed")
        if closed:
            ask.placeholder = self.ask_closed_placeholder()
            ask.border_title = "the demo is not running"
        else:
            ask.placeholder = "ask again: type a prompt and press Enter"
            ask.border_title = None

    def on_resize(self) -> None:
        self._grid_streams()

    def _grid_streams(self) -> None:
        """As many stream columns as fit STREAM_MIN_WIDTH each beside the side column (1: stacked)."""
        k = max(1, len(self.decode.streams))
        side = 46 if self.size.width >= 110 else 34  # #decode-side's width in app.tcss
        cols = max(1, min(k, (self.size.width - side) // STREAM_MIN_WIDTH))
        streams = self.query_one("#streams", Container)
        streams.styles.grid_size_columns = cols
        streams.styles.grid_size_rows = -(-k // cols)

    @on(Input.Submitted, "#ask")
    def _on_ask(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if not self.can_ask():
            self.notify(self.ask_closed_hint(), title="Not running", severity="warning", timeout=10)
            return
        from pdt.infer.inbox import ask

        try:
            ask(self.source.run_dir, prompt)
        except (OSError, ValueError) as exc:
            self.notify(f"could not send the prompt: {exc}", severity="error")
            return
        event.input.value = ""
        self.notify(f"asked: {prompt[:60]}", title="Sent to the demo", timeout=4)

    def status(self) -> tuple[str, str]:
        """(kind, text) of the status line."""
        state = self.state
        final = state.final_status()
        if final is not None:
            if final.kind == "exited" and self.stop_presses >= 2:
                saved = f" (last checkpoint: step {state.checkpoints[-1].step})" if state.checkpoints else ""
                return (
                    "stopped",
                    f"killed at step {state.step}: work since the last checkpoint is lost{saved}",
                )
            return final.kind, final.text
        if self.stop_presses == 1:
            return "stopping", "stopping: the job checkpoints and exits at the next step — s again kills it"
        if self.stop_presses >= 2:
            return "stopping", "kill sent: waiting for the process to exit"
        if state.started_t is None:
            return "starting", f"starting {self.source.title}…"
        procs = f" · {state.world_size} processes" if state.world_size > 1 else ""
        return "running", f"running {state.preset} ({state.preset_kind}) · pid {state.pid}{procs}"

    # ---------------------------------------------------------------- actions

    def action_stop(self) -> None:
        if self.state.final_status() is not None or not self.source.can_stop():
            self.notify("Nothing to stop: this run is not running.", severity="warning")
            return
        if self.stop_presses == 0:
            self.source.stop(force=False)
            first = (
                "The demo finishes the answer it is writing (skipping its baselines) and exits.\n"
                if self.has_class("-decode")
                else "The job saves a checkpoint at the next step and exits.\n"
            )
            self.notify(
                first + "Press s again to kill it now (work since the last checkpoint is lost).",
                title="Stopping",
                timeout=8,
            )
        else:
            self.source.stop(force=True)
            self.notify("Kill signal sent.", title="Killed", severity="warning")
        self.stop_presses += 1
        self._dirty.add("status")

    def action_back(self) -> None:
        if self.state.final_status() is None and self.source.can_stop():
            self.notify(
                "The job keeps running in the background: press r on the home screen to reattach.",
                title="Still running",
                timeout=6,
            )
        self.app.pop_screen()
