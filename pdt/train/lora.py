"""Stage 4: LoRA on the trunk's attention projections, through `peft`.

What it is: injecting LoRA layers into the trunk in place (`peft.inject_adapter_in_model`, so the
sidecar hooks on the same attention/MLP modules keep working), their state dict for checkpoints
(LoRA weights only, safetensors), strict loading, and a context that switches LoRA off for the
KD teacher (the trunk as pretrained; SPEC §2b.8). Why LoRA: full unfreezing of a 20B trunk needs
weights + grads + AdamW moments ≈ 16 bytes/parameter ≈ 336 GB; LoRA of rank 16 on q/k/v/o of
GPT-OSS-20B adds ≈ 0.1% of the parameters. What it is not: the sidecars (`pdt.model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pdt.model.instrument import arch_spec
from pdt.presets.curriculum import LoraSettings


class LoraError(Exception):
    """LoRA cannot be attached or loaded; the message names the module or key."""


def attach_lora(trunk: nn.Module, settings: LoraSettings) -> list[nn.Parameter]:
    """Inject LoRA into `trunk` (in place) and return its trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(settings.target_modules or arch_spec(trunk).lora)
    if not targets:
        raise LoraError(
            f"no LoRA targets for model_type {trunk.config.model_type!r}: set lora.target_modules"
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        # GPT-2 stores its projections as Conv1D with transposed weights.
        fan_in_fan_out=trunk.config.model_type == "gpt2",
    )
    try:
        inject_adapter_in_model(config, trunk)
    except ValueError as exc:
        raise LoraError(f"lora.target_modules {targets}: {exc}") from None
    params = [p for name, p in trunk.named_parameters() if "lora_" in name]
    if not params:
        raise LoraError(f"lora.target_modules {targets} matched no module of the trunk")
    for p in params:
        p.requires_grad_(True)
    return params


def has_lora(trunk: nn.Module) -> bool:
    return any("lora_" in name for name, _ in trunk.named_parameters())


def lora_state_dict(trunk: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in trunk.state_dict().items() if "lora_" in k}


def load_lora_state(trunk: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict: the saved LoRA keys and shapes must equal this trunk's."""
    own = lora_state_dict(trunk)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise LoraError(f"{where}: LoRA keys differ — missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise LoraError(f"{where}: LoRA shapes differ for {bad[:3]} (another lora.rank?)")
    with torch.no_grad():
        params = dict(trunk.named_parameters())
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


@contextlib.contextmanager
def lora_disabled(trunk: nn.Module) -> Iterator[None]:
    """The trunk as pretrained inside the block (no-op without LoRA); LoRA trainable again after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in trunk.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
