"""Distributed plumbing: process-group setup under torchrun, preset broadcast, agreed stop/save.

What it is: thin helpers over `torch.distributed` that are no-ops in a single process, so the
training loop reads the same either way. NCCL on CUDA, gloo on CPU. What it is not: a launcher
(`torchrun` is) nor a sharding policy (the data loader shards by rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """True when launched by torchrun (it sets these variables for every worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


class DistributedSetupError(Exception):
    """The process layout does not fit this machine; the message says what to change."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(backend: str = "auto", want_cuda: bool | None = None) -> DistContext:
    """Initialise the process group when under torchrun with WORLD_SIZE > 1; pick the device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    forced = os.environ.get("PDT_DEVICE", "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise DistributedSetupError(f'PDT_DEVICE={forced!r}: use "cpu", "cuda" or leave it unset')
    if forced == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError(
            "PDT_DEVICE=cuda, but torch sees no CUDA GPU (check the driver and torch build)"
        )
    if want_cuda is None:
        want_cuda = torch.cuda.is_available() if not forced else forced == "cuda"
    use_cuda = want_cuda
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise DistributedSetupError(
            f"process {local_rank} of this node needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} GPU(s) are visible: lower distributed.nproc_per_node (or "
            "torchrun --nproc_per_node) to the number of GPUs"
        )
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(backend=chosen, device_id=device if chosen == "nccl" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's object on every rank (used for the preset choice)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's object, on every rank (used to checkpoint each rank's data cursor)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agree_flags(ctx: DistContext, *flags: bool) -> tuple[bool, ...]:
    """Logical OR of each flag across ranks, so every rank stops / saves at the same step boundary."""
    if not ctx.enabled:
        return tuple(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
