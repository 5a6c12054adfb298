"""Notes cross-attention (SNC): a stream's hidden state reads its visible window of notes.

What it is: per instrumented layer, queries from the (pre-normed) hidden state, keys/values from
note vectors tagged with a producer embedding (which stream wrote it; id K = snapshot 0, the
plan) and a round embedding (when), multi-head attention over the notes the position may see,
an output projection back to `d`, and a gated delta `λ · g · out` with `λ = sigmoid(a)` learned
per layer and `g` the external gate (0 disables cross-stream influence). What it is not: the bus
that decides visibility (`pdt.bus`), nor the hook that adds the delta after the trunk's
self-attention (`pdt.model.instrument`).

Identity at init (SPEC §2b.2): `W_o` starts at exactly zero and has no bias, so the delta is
exactly 0 at init and for a position with an empty window at any time (`snc_attend` returns 0
there, and `W_o · 0 = 0`). The gate logit starts at `gate_init` (≈ −4, λ ≈ 0.018) so opening the
path is gradual once `W_o` moves. Producer and round embeddings make swapping or re-dating notes
a real counterfactual (SPEC §2b.4).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdt.kernels import snc_attend


class NotesCrossAttention(nn.Module):
    """Gated cross-attention from hidden states over notes.

    Parameters: norm D, W_q D·w, W_k and W_v d_n·w each, W_o w·D (zero), producer embedding
    (K+1)·d_n, round embedding max_rounds·d_n, gate 1 —
    D + 2·D·w + 2·d_n·w + (K + 1 + max_rounds)·d_n + 1 in all (w = width).
    """

    def __init__(
        self,
        d_model: int,
        d_notes: int,
        width: int,
        heads: int,
        num_streams: int,
        max_rounds: int,
        gate_init: float = -4.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"NotesCrossAttention: width {width} is not divisible by heads {heads}")
        self.d_model, self.d_notes, self.width, self.heads = d_model, d_notes, width, heads
        self.num_streams, self.max_rounds = num_streams, max_rounds
        # Pre-norm: trunk hidden states grow large in deep layers (outlier features); the queries
        # must not inherit that scale, or the softmax saturates as soon as W_q trains.
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.w_q = nn.Linear(d_model, width, bias=False)
        self.w_k = nn.Linear(d_notes, width, bias=False)
        self.w_v = nn.Linear(d_notes, width, bias=False)
        self.w_o = nn.Linear(width, d_model, bias=False)  # no bias: an empty window must give 0
        nn.init.zeros_(self.w_o.weight)  # zero: exact identity at init
        # Notes are unit vectors (components ~ 1/sqrt(d_n)); tags of norm ~0.5 label a note
        # without drowning its content.
        self.producer_emb = nn.Embedding(num_streams + 1, d_notes)  # row K = snapshot 0 (the plan)
        self.round_emb = nn.Embedding(max_rounds, d_notes)
        for table in (self.producer_emb, self.round_emb):
            nn.init.normal_(table.weight, std=0.5 / math.sqrt(d_notes))
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))  # a: λ = sigmoid(a)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[R, L, width] → [R, H, L, dh]."""
        rows, length, _ = x.shape
        return x.reshape(rows, length, self.heads, self.width // self.heads).transpose(1, 2)

    def _visible(self, visible: torch.Tensor, rows: int, t: int, n: int) -> torch.Tensor:
        if visible.dim() == 2:  # [R, N]: one window for every position (decode time)
            visible = visible[:, None, :].expand(rows, t, n)  # [R, 1, N] → [R, T, N]
        if visible.shape != (rows, t, n):
            raise ValueError(
                f"NotesCrossAttention: visible must be [R, T, N] = {(rows, t, n)} or [R, N], "
                f"got {tuple(visible.shape)}"
            )
        return visible.bool()

    def project_notes(
        self, notes: torch.Tensor, producer: torch.Tensor, rounds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a window: notes [R, N, d_n] (+ producer, round embeddings) → 2 × [R, H, N, dh].

        A decode round reuses one window for all its τ tokens, so the decoder computes these once a round.
        """
        dtype = self.w_q.weight.dtype
        rounds = rounds.long().clamp(0, self.max_rounds - 1)  # older rounds share the last id
        kv_in = notes.to(dtype) + self.producer_emb(producer.long()) + self.round_emb(rounds)  # [R, N, d_n]
        return self._heads(self.w_k(kv_in)), self._heads(self.w_v(kv_in))  # [R, H, N, dh] each

    def attend(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The ungated output `C · W_o`: hidden [R, T, D], notes [R, N, d_n] → [R, T, D] (param dtype).

        `kv`: keys and values from `project_notes` for this window, if already computed.
        """
        rows, t, _ = hidden.shape
        n = notes.shape[1]
        dtype = self.w_q.weight.dtype
        mask = self._visible(visible.to(hidden.device), rows, t, n)  # [R, T, N]
        k, v = kv if kv is not None else self.project_notes(notes, producer, rounds)
        q = self._heads(self.w_q(self.norm(hidden.to(dtype))))  # [R, H, T, dh]
        context = snc_attend(q, k, v, mask)  # [R, H, T, dh], exact 0 where nothing is visible
        context = context.transpose(1, 2).reshape(rows, t, self.width)  # [R, H, T, dh] → [R, T, w]
        return self.w_o(context)  # [R, T, D]

    def delta(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        g: float | torch.Tensor = 1.0,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`λ · g · C W_o`: what the hook adds to the attention output; [R, T, D] in hidden's dtype.

        notes [R, N, d_n], producer [R, N] (0..K), rounds [R, N], visible [R, T, N] or [R, N]
        bool, g a float or a tensor [R].
        """
        if not torch.is_tensor(g) and float(g) == 0.0:
            return torch.zeros_like(hidden)  # g = 0: the `independent` baseline, skip the work
        out = self.attend(hidden, notes, producer, rounds, visible, kv)  # [R, T, D]
        scale = torch.sigmoid(self.gate) * torch.as_tensor(g, dtype=out.dtype, device=out.device)
        if scale.dim() == 1:
            scale = scale.reshape(-1, 1, 1)  # [R] → [R, 1, 1]: one external gate per row
        return (scale * out).to(hidden.dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        g: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """hidden [R, T, D] → hidden + λ · g · C W_o, [R, T, D] (arguments as in `delta`)."""
        return hidden + self.delta(hidden, notes, producer, rounds, visible, g)

    def gate_value(self) -> float:
        """λ = sigmoid(a) of this layer (the gate trace)."""
        return float(torch.sigmoid(self.gate.detach()))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_notes={self.d_notes}, width={self.width}, heads={self.heads}, "
            f"num_streams={self.num_streams}, max_rounds={self.max_rounds}"
        )
