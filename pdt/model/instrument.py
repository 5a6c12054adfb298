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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pdt.model.sidecars.snc import FoldedWindow, gated_out_weights, project_notes_all


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
    # The SNC mask (`visible` with the positions folded in), built on first use: the same for every
    # instrumented layer, so one forward builds it once rather than once a layer.
    _snc_mask: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    # Decode only: per sidecar module, its weights folded for this round (`folds`, `folds_snc`,
    # `Instrumentation.use_folded`).
    _folded: dict[int, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def folds(self, hidden: torch.Tensor) -> bool:
        """Whether the adapters may fold their rows' weights into this context once and reuse them: a
        decode round (a `kv_cache`, no grad, no positions) on the CPU, where the host paces a token
        (~1.5 µs an op). On CUDA the adapter's Triton kernel runs as before."""
        return self.folds_snc(hidden) and not hidden.is_cuda

    def folds_snc(self, hidden: torch.Tensor) -> bool:
        """Whether the SNC layers fold the round's window into their weights once and reuse it for the
        round's tokens (`NotesCrossAttention.fold_window`): a decode round (a `kv_cache`, no grad, no
        positions) on any device. On the CPU it saves host ops (~10 a layer instead of ~50); on CUDA
        a token's SNC layer is then two Triton launches (`pdt.kernels.snc_folded`) instead of four."""
        return self.kv_cache is not None and self.positions is None and not torch.is_grad_enabled()

    def snc_mask(self) -> torch.Tensor:
        """`visible` [R, T, N] or [R, N], and False off `positions` (there the SNC delta is exactly 0)."""
        if self._snc_mask is None:
            mask = self.visible
            if self.positions is not None:
                mask = mask if mask.dim() == 3 else mask[:, None, :]  # [R, N] → [R, 1, N]
                mask = mask & self.positions[..., None]  # [R, T, N]
            self._snc_mask = mask
        return self._snc_mask


@dataclass(frozen=True)
class _SNCState:
    """What the SNC hooks of one forward share (`Instrumentation._window_state`)."""

    mask: torch.Tensor  # [R, T, N] bool: `visible` with the positions folded in
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [R, H, N, dh]
    w_out: list[torch.Tensor]  # per layer: (λ · g · W_o)ᵀ [w, D] (or [R, w, D]) in the compute dtype
    folded: list[FoldedWindow] | None = None  # per layer, when the context folds (CPU decode)

    def layer(self, slot: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.kv[slot], self.w_out[slot]


def _first_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states")
    return hidden if hidden is not None else args[0]


class Instrumentation:
    """Registers the SNC and adapter hooks on the top layers; inactive unless a context is set.

    Per forward (one `active` block), the first SNC hook computes what every layer's SNC needs from
    the window alone — keys/values and gated output weights — in one batched pass
    (`snc.project_notes_all`, `snc.gated_out_weights`): at 12 rows × 1024 tokens on the H100 machine
    the host nearly paces the forward (~15 µs a host op, ~0.35 ms a Triton launch with its wrappers;
    bench/profile_sidecars.py), so every op saved in a hook is wall time saved.
    """

    def __init__(self, trunk: nn.Module, layer_ids: list[int], snc: nn.ModuleList, adapters: nn.ModuleList):
        spec = arch_spec(trunk)
        layers = decoder_layers(trunk)
        self.layer_ids = layer_ids
        self.snc = list(snc)
        self.context: SidecarContext | None = None
        self._snc_state: _SNCState | None = None
        self._handles: list[Any] = []
        for slot, index in enumerate(layer_ids):
            layer = layers[index]
            attn, mlp = _get(layer, spec.attn), _get(layer, spec.mlp)
            self._handles.append(attn.register_forward_hook(self._attn_hook(slot), with_kwargs=True))
            self._handles.append(mlp.register_forward_hook(self._mlp_hook(adapters[slot])))

    @contextlib.contextmanager
    def active(self, context: SidecarContext) -> Iterator[None]:
        """Set the context for one trunk forward; what the SNC hooks share lives exactly as long."""
        previous = self.context, self._snc_state
        self.context, self._snc_state = context, None
        try:
            yield
        finally:
            self.context, self._snc_state = previous

    def use_folded(self, ctx: SidecarContext, folded: list[FoldedWindow]) -> None:
        """Give `ctx` its SNC layers' folded windows, computed elsewhere (the CUDA-graph engine folds a
        round into fixed buffers before its replays): the forwards under `ctx` use them as they are."""
        if len(folded) != len(self.snc):
            raise ValueError(f"use_folded: {len(folded)} folded windows for {len(self.snc)} SNC layers")
        ctx._folded[id(self)] = _SNCState(ctx.snc_mask(), [], [], list(folded))

    def folded_of(self, ctx: SidecarContext) -> Any:
        """What `use_folded` gave `ctx` (None if nothing)."""
        return ctx._folded.get(id(self))

    def _window_state(self, ctx: SidecarContext, hidden: torch.Tensor, dtype: torch.dtype) -> _SNCState:
        """What every SNC layer of this forward shares: the mask [R, T, N], and per layer (k, v) — from
        the decode round's `kv_cache` when it has them (no grad), else projected for every layer at
        once — and the gated W_oᵀ in `dtype`."""
        folds = ctx.folds_snc(hidden) and ctx.visible.dim() == 2 and hidden.dtype == dtype
        state = ctx._folded.get(id(self)) if folds else None
        if state is not None and state.folded[0].keys.dtype == dtype:
            return state  # a decode round: folded by its first token, or by the graph engine
        cache = ctx.kv_cache if ctx.kv_cache is not None and not torch.is_grad_enabled() else None
        kv = [cache.get(id(m)) for m in self.snc] if cache is not None else [None]
        if any(pair is None for pair in kv):
            kv = project_notes_all(self.snc, ctx.notes, ctx.producer, ctx.rounds)
            if cache is not None:
                cache.update({id(m): pair for m, pair in zip(self.snc, kv, strict=True)})
        mask = ctx.snc_mask()
        w_out = gated_out_weights(self.snc, ctx.g, dtype)
        if folds:
            folded = [m.fold_window(pair, mask, w) for m, pair, w in zip(self.snc, kv, w_out, strict=True)]
            state = ctx._folded[id(self)] = _SNCState(mask, kv, w_out, folded)
            return state
        if mask.dim() == 2:  # decode: one window for the step's T positions
            mask = mask.unsqueeze(1).expand(mask.shape[0], hidden.shape[1], mask.shape[1])  # [R, T, N]
        return _SNCState(mask, kv, w_out)

    def _attn_hook(self, slot: int):  # noqa: ANN202 - returns a torch hook
        module = self.snc[slot]

        def hook(_attn: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            ctx = self.context
            if ctx is None or not ctx.snc or (not torch.is_tensor(ctx.g) and float(ctx.g) == 0.0):
                return None  # no context, SNC off, or g = 0 (the `independent` baseline): the trunk alone
            hidden = _first_hidden(args, kwargs)  # [R, T, D], what the attention read
            attn_out = output[0] if isinstance(output, tuple) else output
            state = self._snc_state
            if state is None:
                dtype = module.w_q.weight.dtype
                if torch.is_autocast_enabled(hidden.device.type):
                    dtype = torch.get_autocast_dtype(hidden.device.type)
                state = self._snc_state = self._window_state(ctx, hidden, dtype)
            if state.folded is not None and attn_out.dtype == hidden.dtype:
                attn_out = module.add_folded(attn_out, hidden, state.folded[slot])  # a decode round
            else:
                window = (ctx.notes, ctx.producer, ctx.rounds, state.mask, ctx.g)
                # attn_out + λ·g·C W_o in attn_out's dtype, the add fused into the output GEMM
                attn_out = module.add_delta(attn_out, hidden, *window, *state.layer(slot))
            return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out

        return hook

    def _mlp_hook(self, module: nn.Module):  # noqa: ANN202 - returns a torch hook
        def hook(_mlp: nn.Module, _args: tuple, output: Any) -> Any:
            ctx = self.context
            if ctx is None or not ctx.adapters:
                return None
            mlp_out = output[0] if isinstance(output, tuple) else output  # MoE MLPs return (out, router)
            if mlp_out.dim() == 3 and mlp_out.dtype == module.w_down.dtype and ctx.folds(mlp_out):
                folded = ctx._folded.get(id(module))
                if folded is None:  # the round's first token: gather the rows' weights once
                    folded = ctx._folded[id(module)] = module.fold_rows(ctx.stream_ids.to(mlp_out.device))
                mlp_out = module.add_folded(mlp_out, folded)
            else:
                mlp_out = module(mlp_out, ctx.stream_ids, ctx.positions)  # same dtype: residual fused
            return (mlp_out, *output[1:]) if isinstance(output, tuple) else mlp_out

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
