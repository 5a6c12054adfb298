"""Kernels of the PDT sidecars, behind stable dispatch functions.

What it is: the entry points the sidecars call — `grouped_adapter` (per-row, per-stream bottleneck
MLP) and `snc_attend` (attention over the visible notes window, exact zero for an empty window).
Today both dispatch to the plain PyTorch references in `pdt.kernels.reference`; a Triton kernel
(one op per file, Liger-Kernel style: kernel + launcher + autograd Function) drops in behind the
same signature later, chosen here by device and dtype, and is tested forward and backward against
the reference. What it is not: the sidecar modules (`pdt.model.sidecars`) nor their parameters.
"""

from __future__ import annotations

import torch

from pdt.kernels import reference

__all__ = ["grouped_adapter", "row_adapter", "snc_attend", "reference"]


def grouped_adapter(
    x: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """x [N, D], stream_ids [N] → [N, D]: `gelu(x @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s]` per row.

    Weights: w_down [K, D, r], b_down [K, r], w_up [K, r, D], b_up [K, D]. See
    `pdt.kernels.reference.grouped_adapter`.
    """
    return reference.grouped_adapter(x, stream_ids, w_down, b_down, w_up, b_up)


def row_adapter(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """h [R, T, D], stream_ids [R] → [R, T, D]: the adapter when each row is one stream (no sync)."""
    return reference.row_adapter(h, stream_ids, w_down, b_down, w_up, b_up)


def snc_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [R, H, T, dh], k/v [R, H, N, dh], mask [R, T, N] bool → [R, H, T, dh]; no visible note → 0.

    See `pdt.kernels.reference.snc_attend`.
    """
    return reference.snc_attend(q, k, v, mask)
