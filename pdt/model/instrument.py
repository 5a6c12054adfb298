"""Trunk instrumentation: where the sidecars attach, and the forward hooks that put them there.

What it is: a per-architecture table (layer list, attention and MLP attribute names) and the
hooks on the top `n_layers` decoder layers — after self-attention, notes cross-attention (SNC)
adds its gated delta to the attention output; after the MLP, the stream adapter adds its gated
residual. The hooks read a `SidecarContext` set for the duration of one forward; with no context
(or outside `Instrumentation.active`) they return None, so the trunk computes exactly what it
would alone — that is the KD teacher and the `sequential` baseline. What it is not: the sidecar
modules themselves (`pdt.model.sidecars`) nor the composition (`pdt.model.pdt_model`).

Hooks, not copies: the modules registered here sit in the trunk's real forward (SPEC §2b.1 — a
reference implementation wrote sidecars into a Python copy of the layer list, which did nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedTrunkError(Exception):
    """The trunk's architecture has no row in the instrumentation table."""


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths for one architecture: `layers` from the model root, `attn`/`mlp` per layer,
    and `lora`: the attention projections stage 4 adapts with LoRA (peft `target_modules`)."""

    layers: str
    attn: str
    mlp: str
    lora: tuple[str, ...] = ()


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

#: model_type → where the decoder layers and their attention / MLP submodules live.
#: Adding an architecture = one row (checked by tests/model against a tiny config of each).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "self_attn", "mlp", _QKVO),
    "qwen2": ArchSpec("model.layers", "self_attn", "mlp", _QKVO),
    "qwen3": ArchSpec("model.layers", "self_attn", "mlp", _QKVO),
    "mistral": ArchSpec("model.layers", "self_attn", "mlp", _QKVO),
    "gpt_oss": ArchSpec("model.layers", "self_attn", "mlp", _QKVO),
    "gpt2": ArchSpec("transformer.h", "attn", "mlp", ("attn.c_attn", "attn.c_proj")),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", "attention", "mlp", ("attention.query_key_value", "attention.dense")
    ),
}


def arch_spec(trunk: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(trunk, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(str(model_type))
    if spec is None:
        raise UnsupportedTrunkError(
            f"trunk model_type {model_type!r} has no instrumentation row; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (add one row to pdt/model/instrument.py ARCHITECTURES)"
        )
    return spec


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(trunk: nn.Module) -> nn.ModuleList:
    return _get(trunk, arch_spec(trunk).layers)


@dataclass
class SidecarContext:
    """What the hooks need for one trunk forward of R rows × T positions.

    `visible` is [R, T, N] in teacher forcing (each position has its own window by round) or
    [R, N] at decode time (one window for the step). `g` is the external gate: a float, or [R].
    """

    stream_ids: torch.Tensor  # [R] long, 0-based stream of each row
    notes: torch.Tensor  # [R, N, d_n]
    producer: torch.Tensor  # [R, N] long (K = snapshot 0)
    rounds: torch.Tensor  # [R, N] long
    visible: torch.Tensor  # [R, T, N] or [R, N] bool
    g: float | torch.Tensor = 1.0
    snc: bool = True
    adapters: bool = True
    # [R, T] bool: positions the sidecars act on (None: all). The prompt is excluded in teacher
    # forcing because at inference it is prefilled once, by the plain trunk, for every stream.
    positions: torch.Tensor | None = None
    # Decode only (no grad): per-layer note keys/values, filled on first use. A round's window is the
    # same for all its τ tokens, so one context per round projects the notes once, not τ times.
    kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


def _first_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states")
    return hidden if hidden is not None else args[0]


class Instrumentation:
    """Registers the SNC and adapter hooks on the top layers; inactive unless a context is set."""

    def __init__(self, trunk: nn.Module, layer_ids: list[int], snc: nn.ModuleList, adapters: nn.ModuleList):
        spec = arch_spec(trunk)
        layers = decoder_layers(trunk)
        self.layer_ids = layer_ids
        self.context: SidecarContext | None = None
        self._handles: list[Any] = []
        for slot, index in enumerate(layer_ids):
            layer = layers[index]
            attn, mlp = _get(layer, spec.attn), _get(layer, spec.mlp)
            self._handles.append(attn.register_forward_hook(self._attn_hook(snc[slot]), with_kwargs=True))
            self._handles.append(mlp.register_forward_hook(self._mlp_hook(adapters[slot])))

    @contextlib.contextmanager
    def active(self, context: SidecarContext) -> Iterator[None]:
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous

    def _attn_hook(self, module: nn.Module):  # noqa: ANN202 - returns a torch hook
        def hook(_attn: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            ctx = self.context
            if ctx is None or not ctx.snc:
                return None
            hidden = _first_hidden(args, kwargs)  # [R, T, D], what the attention read
            attn_out = output[0] if isinstance(output, tuple) else output
            visible = ctx.visible
            if ctx.positions is not None:  # off the stream's tokens the window is empty: exact zero delta
                visible = (visible if visible.dim() == 3 else visible[:, None, :]) & ctx.positions[..., None]
            kv = None
            if ctx.kv_cache is not None and not torch.is_grad_enabled():
                kv = ctx.kv_cache.get(id(module))
                if kv is None:
                    kv = ctx.kv_cache[id(module)] = module.project_notes(ctx.notes, ctx.producer, ctx.rounds)
            delta = module.delta(hidden, ctx.notes, ctx.producer, ctx.rounds, visible, ctx.g, kv)
            attn_out = attn_out + delta.to(attn_out.dtype)
            return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out

        return hook

    def _mlp_hook(self, module: nn.Module):  # noqa: ANN202 - returns a torch hook
        def hook(_mlp: nn.Module, _args: tuple, output: Any) -> Any:
            ctx = self.context
            if ctx is None or not ctx.adapters:
                return None
            mlp_out = output[0] if isinstance(output, tuple) else output  # MoE MLPs return (out, router)
            mlp_out = module(mlp_out, ctx.stream_ids, ctx.positions).to(mlp_out.dtype)
            return (mlp_out, *output[1:]) if isinstance(output, tuple) else mlp_out

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
