"""The run screen's memory pane: host RSS and available memory, GPU allocated/reserved/peak.

Layout: `rss`/`avail` (host), then `alloc`/`res`/`peak` (GPU, torch.cuda counters), then `kv`
(an inference run's KV cache of all streams) when reported.

What it is: a static view of the latest `Memory` event in binary units. What it is not: a
sampler — the job measures, this only shows (a CPU run reports zero GPU bytes: shown as such).
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from pdt.telemetry.events import Memory
from pdt.telemetry.memory import fmt_bytes
from pdt.tui.widgets.metrics_pane import pairs_grid


class MemoryPane(Static):
    """`show(memory_event)`; None shows a waiting hint."""

    DEFAULT_CSS = """
    MemoryPane {
        height: auto;
        padding: 0 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("no memory report yet", id=id)

    def show(self, memory: Memory | None) -> None:
        self.update(self.describe(memory))

    @staticmethod
    def describe(memory: Memory | None) -> Content:
        if memory is None:
            return Content.styled("no memory report yet", "dim")
        pairs = [("rss", fmt_bytes(memory.rss_bytes)), ("avail", fmt_bytes(memory.available_bytes or None))]
        gpu = bool(memory.gpu_reserved_bytes or memory.gpu_allocated_bytes or memory.gpu_peak_bytes)
        if gpu:
            pairs += [
                ("alloc", fmt_bytes(memory.gpu_allocated_bytes)),
                ("res", fmt_bytes(memory.gpu_reserved_bytes)),
                ("peak", fmt_bytes(memory.gpu_peak_bytes)),
            ]
        if memory.kv_cache_bytes:  # inference only: the K streams' KV cache (on whichever device)
            pairs.append(("kv", fmt_bytes(memory.kv_cache_bytes)))
        if gpu:
            return pairs_grid(pairs)
        return Content("\n").join([pairs_grid(pairs), Content.styled("gpu   none (CPU run)", "dim")])
