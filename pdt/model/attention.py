"""Attention backend choice for token-by-token decoding.

What it is: one context manager. cuDNN attention rebuilds its execution plan for every new key
length — which a decode step has at each token. Measured on an H100 (bench/profile_sidecars.py):
4.8 ms of CPU per attention call for 0.007 ms of GPU work. Decoding therefore keeps SDPA on the
flash, memory-efficient and math backends — for the whole answer (`ParallelDecoder.decode`): the
prompt's prefill and the plan items' embeddings also take a new shape with each prompt (H100, 124M:
prefill + plan 257 ms → 26 ms an answer, e2e 1.62× → 2.09×, 2026-12-07). What it is not: a choice
for training, whose shapes are fixed (there cuDNN is fine).
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from typing import Any

from torch.nn.attention import SDPBackend, sdpa_kernel

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention() -> AbstractContextManager:
    return sdpa_kernel(_DECODE_BACKENDS)


def cache_arg(model: Any) -> str:
    """The keyword a trunk's forward takes its KV cache by: `cache` (transformers ≥ 5.2x, where
    `past_key_values` is a deprecated alias that warns) or `past_key_values` (earlier 5.x)."""
    cls = type(model)
    name = _CACHE_ARGS.get(cls)
    if name is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps
        params = inspect.signature(type(base).forward).parameters
        name = _CACHE_ARGS[cls] = "cache" if "cache" in params else "past_key_values"
    return name


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


_CACHE_ARGS: dict[type, str] = {}
