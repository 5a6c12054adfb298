"""Attention backend choice for token-by-token decoding.

What it is: one context manager. cuDNN attention rebuilds its execution plan for every new key
length — which a decode step has at each token. Measured on an H100 (bench/profile_sidecars.py):
4.8 ms of CPU per attention call for 0.007 ms of GPU work. Decoding therefore keeps SDPA on the
flash, memory-efficient and math backends. What it is not: a choice for training, whose shapes
are fixed (there cuDNN is fine).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention() -> AbstractContextManager:
    return sdpa_kernel(_DECODE_BACKENDS)
