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

Decode rounds on the CPU (`fold_rows`, `add_folded`): the rows' streams and the weights are fixed
for a round, so each row's weights are gathered once a round with the gate and GELU's 1/√2 folded
in, and a token costs 6 host ops a layer instead of ~17 (the exact-erf `F.gelu` alone costs ~8 µs
on a [3, 1, 16] input on CPU, `torch.erf` ~1 µs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pdt.kernels import row_adapter


@dataclass(frozen=True)
class FoldedRows:
    """Each row's adapter weights for one decode round (no grad), constants folded in.

    With u' = (h · w_down + b_down) / √2, gelu(u) = u' · (1 + erf(u')) / √2 exactly, so the 1/√2
    moves into `down` and `up`, and the gate σ(gate[s]) into `up` and `bias_up`.
    """

    down: torch.Tensor  # [R, D, r]: w_down[s] / √2
    bias_down: torch.Tensor  # [R, 1, r]: b_down[s] / √2
    up: torch.Tensor  # [R, r, D]: σ(gate[s]) · w_up[s] / √2
    bias_up: torch.Tensor  # [R, 1, D]: σ(gate[s]) · b_up[s]


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

    def fold_rows(self, stream_ids: torch.Tensor) -> FoldedRows:
        """The rows' weights for a decode round, stream_ids [R]: frozen weights only (no grad)."""
        ids = stream_ids.long()
        root = 1.0 / math.sqrt(2.0)
        gate = torch.sigmoid(self.gate).index_select(0, ids)[:, None, None]  # [R, 1, 1]
        return FoldedRows(
            down=self.w_down.index_select(0, ids) * root,  # [R, D, r]
            bias_down=self.b_down.index_select(0, ids)[:, None, :] * root,  # [R, 1, r]
            up=self.w_up.index_select(0, ids) * (gate * root),  # [R, r, D]
            bias_up=self.b_up.index_select(0, ids)[:, None, :] * gate,  # [R, 1, D]
        )

    def add_folded(self, hidden: torch.Tensor, folded: FoldedRows) -> torch.Tensor:
        """`h + σ(gate[s]) · adapter_s(h)` from `fold_rows`: hidden [R, T, D] → [R, T, D], in the
        parameters' dtype. The same values as `forward` within fp32 rounding; exactly `hidden` while
        w_up and b_up are zero (identity at init)."""
        u = torch.baddbmm(folded.bias_down, hidden, folded.down)  # [R, T, r], already / √2
        z = torch.erf(u).add_(1.0).mul_(u)  # √2 · gelu(u · √2)
        return torch.baddbmm(hidden + folded.bias_up, z, folded.up)  # [R, T, D]

    def gate_value(self) -> torch.Tensor:
        """sigmoid(gate) per stream, detached: [K]."""
        return torch.sigmoid(self.gate.detach())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, rank={self.rank}, num_streams={self.num_streams}"
