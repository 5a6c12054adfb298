"""The inference view's panes: the streams' live text, the notes bus, readiness, coverage, gates, speed.

What it is: static widgets that render a `DecodeView` (pdt.tui.decode_state): `StreamPane` (one
stream: committed text plain, the block being written in italics, withdrawn blocks struck through
in red until the retry commits), `BusTimeline` (per stream the committed note versions by round;
`*` marks a forced commit), `ReadinessPane` (per stream the latest scores against γ, ✓ commit /
↺ rollback / ! forced), `CoveragePane` (each plan item's latest coverage probability, a bar per
stream), `GatePane` (λ per instrumented layer) and `SpeedPane` (live tokens/s, the timings of PDT
and its baselines, the speedup against sequential, KV cache bytes).
What it is not: the fold of events (pdt.tui.decode_state) or the screen.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from pdt.telemetry.memory import fmt_bytes
from pdt.tui.decode_state import DecodeView, StreamView

_DECISION = {"commit": ("✓", "green"), "rollback": ("↺", "red"), "forced": ("!", "yellow")}
_BARS = " ▁▂▃▄▅▆▇█"


def stream_text(s: StreamView, tail_chars: int = 4000) -> Text:
    """Committed text, then the withdrawn blocks (struck), then the block being written (italic)."""
    out = Text()
    committed = s.committed[-tail_chars:]
    out.append(committed)
    for block in s.struck:
        out.append(block, style="strike red")
        out.append(" ↺ ", style="dim red")
    out.append(s.provisional, style="italic yellow")
    if s.done:
        out.append(f"  ⏹ {s.done}", style="dim")
    if not (committed or s.struck or s.provisional or s.done):
        out.append("waiting for the first token…", style="dim")
    return out


class StreamPane(VerticalScroll):
    """One stream's text; follows the end while new tokens arrive."""

    DEFAULT_CSS = """
    StreamPane {
        border: round $primary 40%;
        border-title-color: $text-accent;
        border-title-style: bold;
        height: 1fr;
        width: 1fr;
        scrollbar-size-vertical: 1;
    }
    StreamPane > Static {
        padding: 0 1;
    }
    """

    def __init__(self, index: int) -> None:
        super().__init__(id=f"stream-{index}", classes="stream-pane")
        self.index = index
        self.body = Static(Text("waiting for the first token…", style="dim"), classes="stream-text")

    def compose(self):  # noqa: ANN201 - Textual's compose
        yield self.body

    def show(self, s: StreamView) -> None:
        state = f"round {s.round}" + (f" · retry {s.attempt}" if s.attempt else "")
        if s.done:
            state = f"done ({s.done})"
        self.border_title = f"stream {self.index} · {state}"
        self.border_subtitle = f"{s.tokens} tok · {s.rollbacks} ↺" if s.tokens else ""
        self.body.update(stream_text(s))
        self.scroll_end(animate=False)


class BusTimeline(Static):
    """Per stream, the committed note versions by round (v0 of a round, v1 after a retry…)."""

    DEFAULT_CSS = "BusTimeline { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView) -> Text:
        out = Text()
        plan = v.notes.get(-1, {})
        out.append("plan ", style="bold")
        out.append(f"snapshot 0 v{plan[0][0]}" if 0 in plan else "—", style="cyan")
        out.append(f"   Δ={v.lag}\n", style="dim")
        for k in range(v.k):
            out.append(f"s{k}   ", style="bold")
            rounds = v.notes.get(k, {})
            if not rounds:
                out.append("no note yet", style="dim")
            for r in sorted(rounds):
                version, forced = rounds[r]
                label = f"r{r}" + (f".v{version}" if version else "") + ("*" if forced else "")
                out.append(label + " ", style="yellow" if forced else "green")
            out.append("\n")
        return out


class ReadinessPane(Static):
    """The latest readiness scores of each stream against γ."""

    DEFAULT_CSS = "ReadinessPane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView, last: int = 6) -> None:
        self.update(self.describe(v, last))

    @staticmethod
    def describe(v: DecodeView, last: int = 6) -> Text:
        out = Text(f"γ = {v.gamma:.3f}\n", style="dim")
        for k in range(v.k):
            out.append(f"s{k} ", style="bold")
            scores = v.readiness.get(k, [])[-last:]
            if not scores:
                out.append("—", style="dim")
            for r, attempt, score, decision in scores:
                mark, style = _DECISION.get(decision, ("?", "dim"))
                out.append(f"r{r}{'′' * attempt} {score:.2f}{mark} ", style=style)
            out.append("\n")
        return out


class CoveragePane(Static):
    """Each plan item's latest coverage probability per stream (a bar; dim when below 0.5)."""

    DEFAULT_CSS = "CoveragePane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView, width: int = 22) -> None:
        self.update(self.describe(v, width))

    @staticmethod
    def describe(v: DecodeView, width: int = 22) -> Text:
        out = Text()
        if not v.coverage:
            return Text("no block finished yet", style="dim")
        for k in sorted(v.coverage):
            items, probs = v.coverage[k]
            bars = "".join(_BARS[min(8, int(p * 8 + 0.5))] for p in probs)
            covered = sum(p >= 0.5 for p in probs)
            out.append(f"s{k} ", style="bold")
            out.append(bars[:width], style="green")
            out.append(f" {covered}/{len(probs)}", style="dim")
            named = [f"{item}" for item, p in zip(items, probs, strict=False) if p >= 0.5][:2]
            if named:
                out.append("  " + ", ".join(named)[:width], style="dim")
            out.append("\n")
        return out


class GatePane(Static):
    """λ_l of every instrumented layer (the notes cross-attention gate), and the external g."""

    DEFAULT_CSS = "GatePane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView) -> Text:
        if not v.gates:
            return Text(f"g = {v.g:g} · gates after the answer", style="dim")
        out = Text(f"g = {v.g:g} · α = {v.alpha:g}\n", style="dim")
        for layer, value in zip(v.layers, v.gates, strict=False):
            bar = "█" * max(1, int(value * 20)) if value > 0 else ""
            out.append(f"L{layer:<3}", style="bold")
            out.append(f"{value:.3f} ", style="cyan")
            out.append(bar + "\n", style="cyan")
        return out


class SpeedPane(Static):
    """Live tokens/s, each mode's timing, PDT's speedup against sequential, KV cache bytes."""

    DEFAULT_CSS = "SpeedPane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView) -> Text:
        out = Text()
        out.append(f"live {v.live_tokens_per_s():.1f} tok/s", style="bold")
        speedup = v.speedup()
        if speedup is not None:
            style = "bold green" if speedup >= 1 else "bold red"
            out.append(f"  ×{speedup:.2f} vs sequential", style=style)
        out.append("\n")
        for mode in ("pdt", "sequential", "independent"):
            t = v.timings.get(mode)
            if t is not None:
                out.append(f"{mode[:11]:<11} ", style="bold")
                out.append(f"{t.tokens} tok · {t.seconds:.2f} s · {t.tokens_per_s:.1f}/s\n")
        if v.memory is not None and v.memory.kv_cache_bytes:
            out.append(f"KV cache {fmt_bytes(v.memory.kv_cache_bytes)}", style="dim")
        return out
