"""The inference view's model: a fold of an inference run's events into what its panes show.

What it is: plain Python (no Textual) — per stream the committed text, the provisional block
being written, the blocks withdrawn by a rollback (kept so the view can show them struck through
until the retry replaces them), the round and why it stopped; the notes-bus timeline (snapshot
versions per stream and round), readiness per round against γ, the latest coverage of each plan
item, the gate trace, timings with the speedup against `sequential`, memory with the KV cache,
and the finished answers. A `decode_started` of a new answer resets the panes; earlier answers'
merged texts stay in `answers`; a pipeline starting its next preset after the demo makes the view
inactive again (the run screen shows the training panes). `apply()` returns which panes changed.
What it is not: a reader of files (the run screen's source feeds it) nor a widget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdt.telemetry.events import (
    Answer,
    Coverage,
    DecodeStarted,
    Event,
    GateTrace,
    Memory,
    NoteSnapshot,
    Progress,
    Readiness,
    StreamDone,
    StreamRollback,
    StreamToken,
    Timing,
)

#: The stage of a pipeline's own progress (pdt.pipeline.PIPELINE_STAGE; not imported: the pipeline
#: module pulls in the jobs). Its `step < total` after an answer means the next preset started.
PIPELINE_STAGE = "pipeline"

#: Withdrawn blocks kept per stream for display (older ones are dropped).
MAX_STRUCK = 3


@dataclass
class StreamView:
    """One stream's text as the view shows it."""

    committed: str = ""
    provisional: str = ""
    struck: list[str] = field(default_factory=list)  # withdrawn blocks, newest last
    round: int = 0
    attempt: int = 0
    tokens: int = 0  # sampled tokens, withdrawn ones included
    rollbacks: int = 0
    done: str = ""  # eos | budget once stopped


@dataclass
class DecodeView:
    """Everything the inference panes display, updated by `apply(events)`."""

    answer: int = -1
    prompt: str = ""
    k: int = 0
    tau: int = 0
    lag: int = 0
    gamma: float = 0.5
    g: float = 1.0
    alpha: float = 1.0
    layers: list[int] = field(default_factory=list)
    plan_items: list[list[str]] = field(default_factory=list)
    streams: list[StreamView] = field(default_factory=list)
    # stream (−1: snapshot 0) → round → latest committed version, and whether it was forced
    notes: dict[int, dict[int, tuple[int, bool]]] = field(default_factory=dict)
    # stream → [(round, attempt, score, decision)], in arrival order
    readiness: dict[int, list[tuple[int, int, float, str]]] = field(default_factory=dict)
    coverage: dict[int, tuple[list[str], list[float]]] = field(default_factory=dict)
    gates: list[float] = field(default_factory=list)
    timings: dict[str, Timing] = field(default_factory=dict)
    memory: Memory | None = None
    answers: list[Answer] = field(default_factory=list)
    answered: bool = False  # the current answer's `answer` event arrived
    first_token_t: float | None = None
    last_token_t: float | None = None

    @property
    def active(self) -> bool:
        """An answer has started (the run is an inference run, or a pipeline reached its demo)."""
        return self.answer >= 0

    @property
    def answering(self) -> bool:
        return self.active and not self.answered

    def live_tokens_per_s(self) -> float:
        """Sampled tokens per second of the answer so far (all streams together)."""
        tokens = sum(s.tokens for s in self.streams)
        if self.first_token_t is None or self.last_token_t is None or self.last_token_t <= self.first_token_t:
            return 0.0
        return tokens / (self.last_token_t - self.first_token_t)

    def speedup(self) -> float | None:
        """PDT's end-to-end speedup against `sequential` for this answer, once both are timed."""
        pdt = self.timings.get("pdt")
        return pdt.speedup if pdt is not None and pdt.speedup > 0 else None

    def apply(self, events: list[Event]) -> set[str]:
        changed: set[str] = set()
        for event in events:
            changed |= self._apply(event)
        return changed

    def _apply(self, e: Event) -> set[str]:
        if isinstance(e, DecodeStarted):
            if e.mode != "pdt":
                return set()
            self._start(e)
            return {"streams", "notes", "readiness", "coverage", "gates", "speed", "header"}
        if not self.active:
            return {"memory"} if isinstance(e, Memory) and self._memory(e) else set()
        if isinstance(e, Progress) and e.stage == PIPELINE_STAGE and e.step < e.total and not self.answering:
            self.answer = -1  # a pipeline went on to its next preset after the demo: training panes again
            return {"header"}
        if isinstance(e, StreamToken):
            s = self._stream(e.stream)
            if e.attempt > s.attempt or e.round > s.round:
                s.struck = s.struck if e.round == s.round else []
            s.round, s.attempt = e.round, e.attempt
            if e.committed:
                s.committed += e.text
            else:
                s.provisional += e.text
            s.tokens += 1
            self.first_token_t = self.first_token_t or e.t
            self.last_token_t = e.t
            return {"streams", "speed"}
        if isinstance(e, Readiness):
            self.readiness.setdefault(e.stream, []).append((e.round, e.attempt, e.score, e.decision))
            s = self._stream(e.stream)
            if e.decision in ("commit", "forced"):
                s.committed += s.provisional
                s.provisional = ""
                s.struck = []
            return {"readiness", "streams"}
        if isinstance(e, StreamRollback):
            s = self._stream(e.stream)
            s.struck = [*s.struck, s.provisional or e.text][-MAX_STRUCK:]
            s.provisional = ""
            s.rollbacks += 1
            return {"streams"}
        if isinstance(e, NoteSnapshot):
            self.notes.setdefault(e.stream, {})[e.round] = (e.version, e.forced)
            return {"notes"}
        if isinstance(e, Coverage):
            self.coverage[e.stream] = (list(e.items), list(e.probs))
            return {"coverage"}
        if isinstance(e, GateTrace):
            self.gates = list(e.values)
            self.layers = list(e.layers) or self.layers
            return {"gates"}
        if isinstance(e, StreamDone):
            s = self._stream(e.stream)
            s.done = e.reason
            s.committed += e.tail
            return {"streams"}
        if isinstance(e, Timing):
            self.timings[e.mode] = e
            return {"speed"}
        if isinstance(e, Memory):
            return {"memory"} if self._memory(e) else set()
        if isinstance(e, Answer):
            self.answers.append(e)
            self.answered = True
            return {"speed", "header", "streams"}
        return set()

    def _memory(self, e: Memory) -> bool:
        self.memory = e
        return True

    def _start(self, e: DecodeStarted) -> None:
        self.answer, self.prompt = e.answer, e.prompt
        self.k, self.tau, self.lag, self.gamma, self.g, self.alpha = e.k, e.tau, e.lag, e.gamma, e.g, e.alpha
        self.layers = list(e.layers)
        self.plan_items = [list(x) for x in e.plan_items]
        self.streams = [StreamView() for _ in range(e.k)]
        self.notes, self.readiness, self.coverage, self.gates, self.timings = {}, {}, {}, [], {}
        self.first_token_t = self.last_token_t = None
        self.answered = False

    def _stream(self, k: int) -> StreamView:
        while len(self.streams) <= k:
            self.streams.append(StreamView())
        return self.streams[k]
