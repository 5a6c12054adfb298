"""Memory sampling: host RSS/available and GPU allocated/reserved/peak as a `Memory` event; byte units.

What it is: one cheap function, safe to call every few seconds. What it is not: a profiler.
"""

from __future__ import annotations

import os
import sys

from pdt.telemetry.events import Memory


def sample_memory() -> Memory:
    """Current process memory. GPU fields are filled only when torch is loaded and CUDA is in use."""
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss
    available = psutil.virtual_memory().available
    alloc = reserved = peak = 0
    torch = sys.modules.get("torch")  # never import torch just to report memory
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        alloc = torch.cuda.memory_allocated()
        reserved = torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
    return Memory(
        rss_bytes=rss,
        available_bytes=available,
        gpu_allocated_bytes=alloc,
        gpu_reserved_bytes=reserved,
        gpu_peak_bytes=peak,
    )


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units, like nvidia-smi and torch.cuda report)."""
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
