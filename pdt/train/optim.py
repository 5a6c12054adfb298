"""Optimiser and learning-rate schedule: AdamW with decay groups, linear warm-up + cosine decay.

What it is: construction of the optimiser (fused on CUDA, foreach elsewhere) and a pure function
of the step for the learning rate, so resuming needs no scheduler object beyond the step.
What it is not: the loop that calls them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdt.presets.schema import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers; not norms, biases or embeddings (GPT-2/nanoGPT practice)."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return adamw(param_groups(model, cfg.weight_decay), cfg, device)


def adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over these parameter groups: fused on CUDA, foreach elsewhere."""
    kwargs: dict = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
