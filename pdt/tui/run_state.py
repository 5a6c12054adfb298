"""The run screen's model: a fold of a run's events into what the widgets show.

What it is: plain Python (no Textual) so it can be tested and reasoned about alone — progress and
ETA, latest metrics, loss history, memory, checkpoints, the latest sample, new log lines and the
final status. `apply()` returns which sections changed so the screen redraws only those.
What it is not: a reader (see `event_source.py`) nor a widget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdt.telemetry.events import (
    Checkpoint,
    Done,
    Error,
    Event,
    Log,
    Memory,
    Metric,
    Progress,
    RunStarted,
    Sample,
)
from pdt.tui.units import fmt_exit_code

#: Metrics whose whole history is kept for the loss plot; others keep only their latest value.
PLOTTED_METRICS = ("train/loss", "eval/loss")
#: Log lines kept until the log widget takes them (a replay of a long run must not flood the UI).
MAX_PENDING_LOGS = 1000


@dataclass
class FinalStatus:
    """How a run ended: `kind` is finished | stopped | failed | exited; `text` the one-line reason."""

    kind: str
    text: str


@dataclass
class RunState:
    """Everything the run screen displays, updated by `apply(events)`."""

    run: str = ""
    preset: str = ""
    preset_kind: str = ""
    pid: int = 0
    world_size: int = 1
    resumed_from_step: int = 0
    started_t: float | None = None
    last_t: float | None = None
    step: int = 0
    total: int = 0
    tokens: int = 0
    stage: str = ""
    # stage → (done, total), in the order the stages first reported (a dataset build has five)
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(
        default_factory=lambda: {name: [] for name in PLOTTED_METRICS}
    )
    memory: Memory | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    sample: Sample | None = None
    pending_logs: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_LOGS))
    done: Done | None = None
    error: Error | None = None
    ended: bool = False
    exit_code: int | None = None
    failure: str | None = None  # the source itself failed (e.g. the job could not be launched)
    console_tail: list[str] = field(default_factory=list)
    # (t, step) of the first progress event of this process: the rate ignores resumed steps
    _rate_origin: tuple[float, int] | None = None

    def apply(self, events: list[Event]) -> set[str]:
        """Fold events in; return the names of the sections that changed."""
        changed: set[str] = set()
        for event in events:
            self.last_t = event.t
            changed.add(self._apply_one(event))
        return changed

    def _apply_one(self, event: Event) -> str:
        if isinstance(event, Progress):
            if (event.stage, event.total) != (self.stage, self.total) or event.step < self.step:
                self._rate_origin = None  # another stage or job (a pipeline's next child): a new rate
            self.step, self.total, self.tokens, self.stage = (
                event.step,
                event.total,
                event.tokens,
                event.stage,
            )
            if event.stage:
                self.stages[event.stage] = (event.step, event.total)
            if self._rate_origin is None:
                self._rate_origin = (event.t, event.step)
            return "progress"
        if isinstance(event, Metric):
            self.metrics[event.name] = event.value
            if event.name in self.history:
                self.history[event.name].append((event.step, event.value))
                return "plot"
            return "metrics"
        if isinstance(event, Memory):
            self.memory = event
            return "memory"
        if isinstance(event, Checkpoint):
            self.checkpoints.append(event)
            self.pending_logs.append(("checkpoint", f"checkpoint at step {event.step} -> {event.path}"))
            return "checkpoints"
        if isinstance(event, Sample):
            self.sample = event
            return "sample"
        if isinstance(event, Log):
            self.pending_logs.append((event.level, event.message))
            return "logs"
        if isinstance(event, RunStarted):
            return self._apply_started(event)
        if isinstance(event, Done):
            self.done = event
            self.pending_logs.append(("done", f"run {event.status}"))
            return "status"
        if isinstance(event, Error):
            self.error = event
            self.pending_logs.append(("error", event.message))
            return "status"
        return "other"

    def _apply_started(self, event: RunStarted) -> str:
        self.run, self.preset, self.preset_kind = event.run, event.preset, event.preset_kind
        self.pid, self.world_size, self.resumed_from_step = (
            event.pid,
            event.world_size,
            event.resumed_from_step,
        )
        self.started_t = event.t
        self._rate_origin = None  # a restart (torchrun) begins a new rate measurement
        resumed = f", resuming from step {event.resumed_from_step}" if event.resumed_from_step else ""
        self.pending_logs.append(
            (
                "run",
                f"run {event.run} started: preset {event.preset} "
                f"({event.preset_kind}), {event.world_size} process(es){resumed}",
            )
        )
        return "status"

    def end(self, exit_code: int | None, console_tail: list[str], failure: str | None = None) -> None:
        """The source says no more events will come."""
        self.ended = True
        self.exit_code = exit_code
        self.console_tail = list(console_tail)
        self.failure = failure

    # ---------------------------------------------------------------- derived values

    def steps_per_s(self) -> float | None:
        """Optimizer steps per second since the first progress event of this process."""
        if self._rate_origin is None or self.last_t is None:
            return None
        t0, s0 = self._rate_origin
        dt, ds = self.last_t - t0, self.step - s0
        return ds / dt if dt > 0 and ds > 0 else None

    def eta_s(self) -> float | None:
        """Seconds left at the measured step rate; 0 once finished; None before a rate exists."""
        if self.total and self.step >= self.total:
            return 0.0
        rate = self.steps_per_s()
        if rate is None or not self.total:
            return None
        return (self.total - self.step) / rate

    def elapsed_s(self, now: float) -> float | None:
        """Wall time since the run started; a finished run stops at its last event."""
        if self.started_t is None:
            return None
        end = self.last_t if (self.ended or self.done or self.error) and self.last_t else now
        return max(0.0, end - self.started_t)

    def final_status(self) -> FinalStatus | None:
        """None while the run may still produce events."""
        if self.error is not None:
            return FinalStatus("failed", f"failed: {self.error.message}")
        if self.done is not None:
            where = f" at step {self.step}" if self.step else ""
            ckpt = f" (last checkpoint: step {self.checkpoints[-1].step})" if self.checkpoints else ""
            return FinalStatus(self.done.status, f"{self.done.status}{where}{ckpt}")
        if self.failure is not None:
            return FinalStatus("failed", self.failure)
        if not self.ended:
            return None
        if self.exit_code is not None:
            return FinalStatus(
                "exited",
                f"process exited with {fmt_exit_code(self.exit_code)} "
                "without a done/error event — see console.log",
            )
        return FinalStatus(
            "exited", "the run ended without a done/error event (its process is gone) — see console.log"
        )
