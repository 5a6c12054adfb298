"""Profile a training step and a K = 3 decode step (sidecars on and off) with torch.profiler.

What it is: a diagnostic companion of bench/sidecar_overhead.py, run where a step is slower than
expected. On a GPU it first times a training step's phases on the host and on the GPU timeline
(which side paces the forward?) and lists the step's device→host syncs by Python caller. Then,
for each step under torch.profiler: the wall time, the GPU's busy time (the union of its kernels'
intervals) and the largest idle gaps between kernels with the kernels on either side — a step
whose wall time exceeds its busy time waits on the host (Python, launches, a device→host sync) —
then the ops by self GPU time (CPU time on a CPU-only machine) and, for the decode step, by
self CPU time. What it is not: a benchmark (no JSON; the profiler slows the host).
`--rows N` sets the training rows (multiple of K = 3; default 12).
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sidecar_overhead as so  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

GAP_US = 20.0  # idle stretches shorter than this are launch latency, not worth listing


def _gaps(prof: profile, top: int = 8) -> tuple[float, float, list[tuple[float, str, str]]]:
    """(busy µs, span µs, the `top` largest idle gaps as (µs, kernel before, kernel after))."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    if not kernels:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    start, end, name = kernels[0]
    for k_start, k_end, k_name in kernels[1:]:
        if k_start > end:
            busy += end - start
            if k_start - end >= GAP_US:
                gaps.append((k_start - end, name[:48], k_name[:48]))
            start = k_start
        if k_end >= end:
            end, name = k_end, k_name
    busy += end - start
    return busy, end - kernels[0][0], sorted(gaps, reverse=True)[:top]


def _profile(name: str, fn: Callable[[], None], gpu: bool, steps: int) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for _ in range(3):
        fn()
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if gpu:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e3
    print(f"=== {name} ({steps} steps, {wall:.2f} ms a step under the profiler) ===")
    if gpu:
        busy, span, gaps = _gaps(prof)
        print(f"GPU busy {busy / steps / 1e3:.2f} ms a step of a {span / steps / 1e3:.2f} ms span")
        for gap, before, after in gaps:
            print(f"  idle {gap:8.1f} µs after {before!r} before {after!r}")
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=50))
    if gpu and name.startswith("decode"):
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
        )


class _Phases:
    """Host and GPU-timeline times of a step's phases: `mark` records a host stamp and a CUDA event."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float, torch.cuda.Event]] = []
        self.gc_s = 0.0
        self._gc_start = 0.0

    def mark(self, phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.stamps.append((phase, time.perf_counter(), event))

    def gc_callback(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start


def _phases(name: str, make: Callable[[Callable[[str], None]], Callable[[], None]], steps: int = 15) -> None:
    """Median ms a step: host time until the forward returns / until the step returns, the same
    points on the GPU timeline, the wall time after a sync, and time in Python's GC. A host time
    close to its GPU time means the host paces that phase."""
    rec = _Phases()
    fn = make(rec.mark)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    rows: list[list[float]] = []
    gc.callbacks.append(rec.gc_callback)
    try:
        for _ in range(steps):
            rec.stamps.clear()
            gc_before = rec.gc_s
            rec.mark("start")
            fn()
            rec.mark("end")
            torch.cuda.synchronize()
            wall = time.perf_counter() - rec.stamps[0][1]
            (_, h0, e0), (_, h1, e1), (_, h2, e2) = rec.stamps
            rows.append([(h1 - h0) * 1e3, e0.elapsed_time(e1), (h2 - h0) * 1e3, e0.elapsed_time(e2)])
            rows[-1] += [wall * 1e3, (rec.gc_s - gc_before) * 1e3]
    finally:
        gc.callbacks.remove(rec.gc_callback)
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(
        f"{name:<22} forward host {med[0]:6.2f} gpu {med[1]:6.2f} | step host {med[2]:6.2f} "
        f"gpu {med[3]:6.2f} | wall {med[4]:6.2f} | gc {med[5]:5.2f} (ms, median of {steps})"
    )


def _syncs(name: str, fn: Callable[[], None]) -> None:
    """The device→host synchronisations of one step, by Python caller (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchron" in str(w.message)
    )
    print(f"{name:<22} syncs: {sum(where.values())} {dict(where)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="training rows (a multiple of K = 3)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    model = so._model("pretrain_124m" if gpu else "pretrain_tiny", device)
    batch = max(1, args.rows // so.K) if gpu else 2
    train_on, train_off = so._train_fns(model, batch, 1024 if gpu else 128, device, dtype)
    decode_on, decode_off, _ = so._decode_fns(model, device, dtype)
    if gpu:
        for side in (0, 1):  # twice, alternating, so that drift shows
            for label, pick in (("train, sidecars on", 0), ("train, sidecars off", 1)):
                make = lambda mark, p=pick: so._train_fns(model, batch, 1024, device, dtype, mark)[p]  # noqa: E731
                _phases(f"{label} #{side + 1}", make)
        for label, fn in (("train on", train_on), ("train off", train_off), ("decode on", decode_on)):
            _syncs(label, fn)
    for name, fn in (
        ("train, sidecars on", train_on),
        ("train, sidecars off", train_off),
        ("decode, sidecars on", decode_on),
        ("decode, sidecars off", decode_off),
    ):
        _profile(name, fn, gpu, 3)


if __name__ == "__main__":
    main()
