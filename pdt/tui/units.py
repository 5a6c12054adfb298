"""Human units for the TUI: durations, counts, signals (bytes: `pdt.telemetry.memory.fmt_bytes`).

What it is: tiny pure formatting functions the widgets share (so "1.2 GiB" and "3m05s" look the
same everywhere). What it is not: a general helper module; it imports nothing from Textual.
"""

from __future__ import annotations

import signal


def fmt_duration(seconds: float | None) -> str:
    """65 -> '1m05s'; 7265 -> '2h01m'; None -> '–'."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN or negative
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def fmt_count(n: float | None) -> str:
    """1234567 -> '1.23M' (tokens, steps)."""
    if n is None:
        return "–"
    value = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{int(value)}" if value == int(value) else f"{value:.2f}"


def fmt_exit_code(code: int) -> str:
    """-9 -> 'code -9 (killed by SIGKILL)': Popen reports death by signal N as -N."""
    if code < 0:
        try:
            return f"code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"code {code}"
    return f"code {code}"
