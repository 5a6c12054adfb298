"""The inference view's panes: the streams' live text, the notes bus, readiness, coverage, gates, speed.

What it is: static widgets that render a `DecodeView` (pdt.tui.decode_state): `StreamPane` (one
stream: committed text plain, the block being written in italics, withdrawn blocks struck through
in red until the retry commits), `BusTimeline` (per stream one cell per round: the note version
committed to the bus, forced commits marked), `ReadinessPane` (per stream a sparkline of the block
scores coloured by decision — ✓ commit / ↺ rollback / ! forced — and the latest against γ),
`CoveragePane` (each plan item's latest coverage probability, a bar per stream), `GatePane` (λ per
instrumented layer) and `SpeedPane` (the speedup against sequential, live tokens/s, the timings of
PDT and its baselines, KV cache bytes).
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
            state = f"⏹ {s.done}"
        self.border_title = f"stream {self.index} · {state}"
        self.border_subtitle = f"{s.tokens} tok · {s.rollbacks} ↺" if s.tokens else ""
        self.body.update(stream_text(s))
        self.scroll_end(animate=False)


class BusTimeline(Static):
    """Per stream, one cell per round: the note committed to the bus for it (newest rounds last).

    `●` its first version, `◆` a re-commit after a retry (version ≥ 1), `!` forced (committed below
    γ after the last retry), `·` a round with no note yet. A note of round r is read from round r+Δ.
    """

    DEFAULT_CSS = "BusTimeline { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView, width: int = 18) -> Text:
        out = Text()
        plan = v.notes.get(-1, {})
        out.append("plan ", style="bold")
        out.append(f"snapshot 0 v{plan[0][0]}" if 0 in plan else "—", style="cyan")
        out.append(f"   Δ={v.lag}\n", style="dim")
        for k in range(v.k):
            out.append(f"s{k} ", style="bold")
            rounds = v.notes.get(k, {})
            if not rounds:
                out.append("no note yet\n", style="dim")
                continue
            last = max(rounds)
            first = max(0, last - width + 1)
            if first:
                out.append("…", style="dim")
            for r in range(first, last + 1):
                version, forced = rounds.get(r, (-1, False))
                if version < 0:
                    out.append("·", style="dim")
                elif forced:
                    out.append("!", style="bold yellow")
                else:
                    out.append("◆" if version else "●", style="cyan" if version else "green")
            version, forced = rounds[last]
            out.append(f" r{last}" + (f" v{version}" if version else ""), style="dim")
            out.append("\n")
        out.append("● note ◆ re-commit ! forced", style="dim")
        return out


class ReadinessPane(Static):
    """Readiness of every block against γ: a sparkline per stream (green commit, red rollback,
    yellow forced), then the latest score and the number of rollbacks."""

    DEFAULT_CSS = "ReadinessPane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView, width: int = 12) -> Text:
        out = Text(f"γ {v.gamma:.3f}  ✓ok ↺rollback !forced\n", style="dim")
        for k in range(v.k):
            out.append(f"s{k} ", style="bold")
            scores = v.readiness.get(k, [])
            if not scores:
                out.append("—\n", style="dim")
                continue
            for _, _, score, decision in scores[-width:]:
                level = min(8, max(1, int(score * 8 + 0.5)))
                out.append(_BARS[level], style=_DECISION.get(decision, ("?", "dim"))[1])
            r, attempt, score, decision = scores[-1]
            mark, style = _DECISION.get(decision, ("?", "dim"))
            out.append(f" r{r}{'′' * attempt} {score:.2f}{mark}", style=style)
            rollbacks = sum(d == "rollback" for *_, d in scores)
            if rollbacks:
                out.append(f" {rollbacks}↺", style="dim red")
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
    """PDT's speedup against sequential, live tokens/s, each mode's timing, the decode-step engine,
    KV cache bytes."""

    DEFAULT_CSS = "SpeedPane { height: auto; padding: 0 1; }"

    def show(self, v: DecodeView) -> None:
        self.update(self.describe(v))

    @staticmethod
    def describe(v: DecodeView) -> Text:
        out = Text()
        speedup = v.speedup()
        if speedup is not None:
            out.append(f"×{speedup:.2f} vs sequential\n", style="bold green" if speedup >= 1 else "bold red")
        elif v.answering:
            out.append("speedup: once the baselines ran\n", style="dim")
        out.append(f"{'live':<11}{v.live_tokens_per_s():>6.1f} tok/s\n", style="bold")
        for mode in ("pdt", "sequential", "independent"):
            t = v.timings.get(mode)
            if t is not None:
                out.append(f"{mode[:11]:<11}", style="bold")
                out.append(f"{t.tokens_per_s:>6.1f} tok/s {t.seconds:>6.2f}s\n")
        engine = next((t.engine for t in v.timings.values()), None)
        if engine is not None:  # every mode of an answer runs on one engine
            out.append(f"{'step':<11}{engine}\n", style="dim")
        if v.memory is not None and v.memory.kv_cache_bytes:
            out.append(f"KV cache {fmt_bytes(v.memory.kv_cache_bytes)}", style="dim")
        return out.rstrip() or out
