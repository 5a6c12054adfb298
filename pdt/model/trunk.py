"""The trunk: a Hugging Face causal LM built from a preset config or loaded from a local folder.

What it is: construction (`AutoModelForCausalLM.from_config` / `from_pretrained` with
`local_files_only=True`, `trust_remote_code=False`), HF-folder export, parameter counts and the
FLOPs-per-token estimate used for MFU. What it is not: the training loop, nor the PDT sidecars
(those attach to a frozen trunk in later stages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdt.presets.schema import TrunkConfig


class TrunkError(Exception):
    """The trunk cannot be built or loaded; the message says why and what to do."""


# Keys some model types name differently for the context length.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def build_config(cfg: TrunkConfig, vocab_size: int, seq_len: int, eot_id: int) -> Any:
    """The HF config for a fresh trunk: the preset's keys + vocab and context from the data side."""
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.for_model(cfg.model_type, **cfg.config)
    except ValueError as exc:
        raise TrunkError(
            f"trunk.model_type {cfg.model_type!r} is not a transformers model type: {exc}"
        ) from None
    except TypeError as exc:
        raise TrunkError(f"trunk.config: {exc}") from None
    hf_cfg.vocab_size = vocab_size
    for key in _CONTEXT_KEYS:
        if hasattr(hf_cfg, key) and (getattr(hf_cfg, key) or 0) < seq_len:
            setattr(hf_cfg, key, seq_len)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(hf_cfg, key):
            setattr(hf_cfg, key, eot_id)
    return hf_cfg


def build_trunk(cfg: TrunkConfig, vocab_size: int, seq_len: int, eot_id: int, seed: int) -> nn.Module:
    """A freshly initialised trunk (seeded) in fp32 — autocast handles bf16 compute."""
    from transformers import AutoModelForCausalLM

    hf_cfg = build_config(cfg, vocab_size, seq_len, eot_id)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", trust_remote_code=False)
    except (ValueError, TypeError) as exc:
        raise TrunkError(f"cannot build a {cfg.model_type} trunk from trunk.config: {exc}") from None
    return model.float()


def load_trunk(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A trunk from a local HF folder. Never downloads; never runs remote code."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise TrunkError(
            f"trunk folder {folder} has no config.json: point trunk.path at a Hugging Face model folder "
            "(e.g. the export of a finished pretrain preset: checkpoints/<preset>/export)"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise TrunkError(f"cannot load the trunk from {folder}: {exc}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def export_trunk(model: nn.Module, tokenizer: Any, folder: Path, meta: dict[str, Any]) -> Path:
    """Write a standard HF folder (`save_pretrained`, safetensors) plus the tokenizer description.

    The export is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written folder where a curriculum preset expects a trunk.
    """
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unwrap(model).save_pretrained(str(tmp))
    tokenizer.save(tmp)
    (tmp / "pdt_export.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    total = embed = 0
    base = unwrap(model)
    emb_ids = {id(m.weight) for m in base.modules() if isinstance(m, nn.Embedding)}
    for p in base.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in emb_ids:
            embed += p.numel()
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (weights, fwd+bwd) + 12·L·d·T (attention scores and values).

    The 6N + 12LdT form is the PaLM paper's (Chowdhery et al. 2022, appendix B). N counts every
    weight used in a matmul, the LM head included (the input embedding is a lookup, not a matmul).
    """
    base = unwrap(model)
    cfg = base.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    counts = count_parameters(base)
    n_matmul = counts["non_embedding"]
    head = base.get_output_embeddings()
    if head is not None and any(
        head.weight is m.weight for m in base.modules() if isinstance(m, nn.Embedding)
    ):
        n_matmul += head.weight.numel()  # tied head: counted as embedding above, but it is a matmul
    return 6.0 * n_matmul + 12.0 * n_layers * d_model * seq_len
