"""Hardware ceilings for MFU: the dense bf16 matmul rate measured on this GPU, in this run.

What it is: a short, cached measurement (median of timed 8192³ products after warm-up) that MFU
is reported against — a datasheet peak would flatter or punish a given card. What it is not: a
general benchmark harness.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def matmul_peak_flops(
    device: str, dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 10
) -> float:
    """FLOP/s of an n×n×n matmul on `device` (CUDA only; 0.0 elsewhere). Uses random data, not zeros."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(dev)
        times.append(start.elapsed_time(end) / 1000.0)
    times.sort()
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n**3 / times[len(times) // 2]
