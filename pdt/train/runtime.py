"""What every training job shares around its loop: precision, checkpoint cadence, the rank-0-first
checkpoint load and the emergency save after running out of memory.

What it is: small functions the pretrain and curriculum jobs both call, so the two loops cannot
drift apart on these rules. What it is not: either loop, the optimiser (`pdt.train.optim`) or
checkpoint storage (`pdt.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch

from pdt.presets.schema import CheckpointConfig
from pdt.train import distributed as D
from pdt.train.checkpoint import CheckpointManager, LoadedCheckpoint


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`precision` auto | bf16 | fp32 → the autocast dtype (None: plain fp32). auto: bf16 on a GPU
    that supports it, and on a CPU that multiplies bf16 natively (`cpu_has_native_bf16`); fp32
    elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU's oneDNN multiplies bf16 in hardware (AVX512-BF16 or AMX: recent Xeon and
    EPYC). There bf16 autocast makes CPU training steps of the tiny presets faster (the CI machine, a
    2-core EPYC: pretrain_tiny 5.3k against 3.6k tokens/s, a stage-3 step ~1.3×); elsewhere bf16 is
    emulated and slower than fp32, so auto stays fp32. `PDT_CPU_BF16=0` turns it off."""
    if os.environ.get("PDT_CPU_BF16", "").strip() == "0":
        return False
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except (RuntimeError, AttributeError):
        return False


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def save_due(step: int, last_saved_step: int, last_save_time: float, every: CheckpointConfig) -> bool:
    """Every `every_steps` steps, and at least every `every_minutes` minutes (never at step 0 or twice)."""
    if step == last_saved_step or step == 0:
        return False
    minutes = (time.monotonic() - last_save_time) / 60.0
    return step % every.every_steps == 0 or minutes >= every.every_minutes


def load_latest(ckpt: CheckpointManager, dist: D.DistContext) -> LoadedCheckpoint | None:
    """Rank 0 verifies (and may quarantine a damaged slot) before the other ranks read `current`."""
    loaded = ckpt.load() if dist.is_main else None
    D.barrier(dist)
    if not dist.is_main:
        loaded = ckpt.load()
    return loaded


def save_after_oom(
    dist: D.DistContext,
    step: int,
    last_saved_step: int,
    optimizer: torch.optim.Optimizer,
    save: Callable[[], None],
    log: Callable[[str, str], None],
) -> None:
    """Keep the last completed step when memory runs out mid-step (single process only: in DDP the
    other ranks may be inside a collective, so there the last periodic checkpoint stands)."""
    optimizer.zero_grad(set_to_none=True)
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    if dist.enabled or step == last_saved_step:
        return
    try:
        save()
        log(f"out of memory: saved step {step} before stopping", "warning")
    except Exception as exc:  # noqa: BLE001 - the OOM is the error to report; this is best effort
        log(
            f"out of memory, and the emergency save failed too ({exc}); the last checkpoint "
            f"(step {last_saved_step}) is intact",
            "warning",
        )
