"""What every training job shares around its loop: precision, checkpoint cadence, the rank-0-first
checkpoint load and the emergency save after running out of memory.

What it is: small functions the pretrain and curriculum jobs both call, so the two loops cannot
drift apart on these rules. What it is not: either loop, the optimiser (`pdt.train.optim`) or
checkpoint storage (`pdt.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from pdt.presets.schema import CheckpointConfig
from pdt.train import distributed as D
from pdt.train.checkpoint import CheckpointManager, LoadedCheckpoint


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`precision` auto | bf16 | fp32 → the autocast dtype (None: plain fp32). auto: bf16 on a GPU
    that supports it, fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


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
