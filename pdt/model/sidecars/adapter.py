"""Stream adapters: a per-stream bottleneck MLP with a gated residual, applied after a trunk MLP.

What it is: K small adapters `d → r → d` (GELU), one per stream; each row of a batch uses the
weights of its own stream (rows of one batch belong to different streams, SPEC §2), computed by
`pdt.kernels.row_adapter`. Output: `h + sigmoid(gate[s]) · adapter_s(h)`; the gate, the positions
mask and the residual add are the kernel's epilogue (one call, no other op).
What it is not: the hook that puts it into the trunk (`pdt.model.instrument`) nor LoRA on the
trunk's own weights (curriculum stage 4).

Identity at init (SPEC §2b.2): the up-projection and its bias start at exactly zero, so the
adapter's output is exactly 0 and the trunk is unchanged bit for bit; the down-projection is
random so the up-projection receives a useful gradient from the first step (the LoRA recipe).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdt.kernels import row_adapter


class StreamAdapters(nn.Module):
    """K per-stream bottleneck adapters with per-stream gates.

    Parameters: w_down [K, D, r], b_down [K, r], w_up [K, r, D] (zero), b_up [K, D] (zero),
    gate [K] (logits, init `gate_init`) — K·(2·D·r + r + D + 1) in all.
    """

    def __init__(self, d_model: int, rank: int, num_streams: int, gate_init: float = -4.0) -> None:
        super().__init__()
        self.d_model, self.rank, self.num_streams = d_model, rank, num_streams
        # Same scale as nn.Linear's default (uniform ±1/sqrt(fan_in)): GELU inputs start O(1).
        bound = 1.0 / math.sqrt(d_model)
        self.w_down = nn.Parameter(torch.empty(num_streams, d_model, rank).uniform_(-bound, bound))
        self.b_down = nn.Parameter(torch.zeros(num_streams, rank))
        self.w_up = nn.Parameter(torch.zeros(num_streams, rank, d_model))  # zero: exact identity at init
        self.b_up = nn.Parameter(torch.zeros(num_streams, d_model))  # zero: exact identity at init
        # sigmoid(-4) ≈ 0.018: even once w_up moves, the first steps barely perturb the trunk.
        self.gate = nn.Parameter(torch.full((num_streams,), float(gate_init)))

    def forward(
        self, hidden: torch.Tensor, stream_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [R, T, D] (or [R, D]), stream_ids [R] → same shape and dtype as hidden.

        `positions` [R, T] (or [R]) bool, optional: tokens the adapter acts on; elsewhere it is an
        exact identity.
        """
        if stream_ids.shape != (hidden.shape[0],):
            raise ValueError(
                f"StreamAdapters: stream_ids must be [R] = [{hidden.shape[0]}], got {tuple(stream_ids.shape)}"
            )
        squeeze = hidden.dim() == 2
        h = hidden[:, None] if squeeze else hidden  # [R, D] → [R, 1, D]
        if squeeze and positions is not None:
            positions = positions[:, None]  # [R] → [R, 1]
        # One call and no other op: the gate sigmoid(a_s), the positions mask and the residual add are
        # the kernel's epilogue. The host nearly paces a 12 × 1024 forward on the H100 machine (~15 µs
        # a host op; bench/profile_sidecars.py), and passes over [R, T, D] would cost GPU time too.
        ids = stream_ids if stream_ids.device == h.device else stream_ids.to(h.device)
        weights = (self.w_down, self.b_down, self.w_up, self.b_up)
        out = row_adapter(h, ids, *weights, gate=self.gate, positions=positions, residual=True)
        return out[:, 0] if squeeze else out

    def gate_value(self) -> torch.Tensor:
        """sigmoid(gate) per stream, detached: [K]."""
        return torch.sigmoid(self.gate.detach())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, rank={self.rank}, num_streams={self.num_streams}"
