"""Notes cross-attention (SNC): a stream's hidden state reads its visible window of notes.

What it is: per instrumented layer, queries from the (pre-normed) hidden state, keys/values from
note vectors tagged with a producer embedding (which stream wrote it; id K = snapshot 0, the
plan) and a round embedding (when), multi-head attention over the notes the position may see,
an output projection back to `d`, and a gated delta `λ · g · out` with `λ = sigmoid(a)` learned
per layer and `g` the external gate (0 disables cross-stream influence). What it is not: the bus
that decides visibility (`pdt.bus`), nor the hook that adds the delta after the trunk's
self-attention (`pdt.model.instrument`).

Cost: the gate scales `W_o` and the residual add rides on the output GEMM (`add_delta`), so the
sidecar adds no elementwise pass over [R, T, D] beyond its pre-norm; the keys/values and gated
output weights of all layers are computed in one batched pass a forward (`project_notes_all`,
`gated_out_weights`), because the host, not the GPU, paces a small training step. A decode round
goes further (`fold_window`): the window is fixed for its τ tokens and nothing trains, so W_q, the
norm weight, the score scale and λ·g·W_o are folded into the window's keys and values once a
round; on the CPU a token then costs ~10 host ops a layer instead of ~50
(bench/sidecar_overhead.py), on CUDA two Triton launches (`pdt.kernels.snc_folded`) instead of four.
On the CPU with autograd, `add_delta` folds the same weights per forward (`_add_delta_folded`).

Identity at init (SPEC §2b.2): `W_o` starts at exactly zero and has no bias, so the delta is
exactly 0 at init and for a position with an empty window at any time (`snc_attend` returns 0
there, and `W_o · 0 = 0`). The gate logit starts at `gate_init` (≈ −4, λ ≈ 0.018) so opening the
path is gradual once `W_o` moves. Producer and round embeddings make swapping or re-dating notes
a real counterfactual (SPEC §2b.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdt.kernels import kernel_mode, snc_attend, snc_folded


@dataclass(frozen=True)
class FoldedWindow:
    """One layer's SNC for one decode round, its weights folded into the window (no grad).

    With x̂ = x · rsqrt(mean(x²) + ε), head h's score over note n is
    `x̂ · (norm ⊙ W_q,hᵀ k_h,n) / sqrt(dh)` and its output is `Σ_n p_h,n · v_h,n W_o,h`: the
    bracketed products depend on the window and the weights only, so they are computed once a round.
    What it is not: a training path (the weights are frozen into it). On CUDA `snc_folded` runs it as
    two Triton launches a token; the CUDA-graph engine folds a round into fixed buffers.
    """

    keys: torch.Tensor  # [R, D, H·N]: per head, scale · norm ⊙ (k_h W_q,h), transposed for the bmm
    values: torch.Tensor  # [R, H·N, D]: per head, v_h (λ·g·W_o,h)ᵀ; 0 for a row with an empty window
    bias: torch.Tensor  # [R, 1, H·N]: 0 where visible, −inf elsewhere; all 0 for an empty window


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

    def _visible(self, visible: torch.Tensor, rows: int, t: int, n: int) -> torch.Tensor:
        if visible.dim() == 2:  # [R, N]: one window for every position (decode time)
            visible = visible[:, None, :].expand(rows, t, n)  # [R, 1, N] → [R, T, N]
        if visible.shape != (rows, t, n):
            raise ValueError(
                f"NotesCrossAttention: visible must be [R, T, N] = {(rows, t, n)} or [R, N], "
                f"got {tuple(visible.shape)}"
            )
        return visible if visible.dtype == torch.bool else visible.bool()

    def project_notes(
        self, notes: torch.Tensor, producer: torch.Tensor, rounds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a window: notes [R, N, d_n] (+ producer, round embeddings) → 2 × [R, H, N, dh].

        A decode round reuses one window for all its τ tokens, so the decoder computes these once a
        round; a forward over several layers computes all of them at once (`project_notes_all`).
        """
        return project_notes_all([self], notes, producer, rounds)[0]

    def gated_out_weight(self, g: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(λ · g · W_o)ᵀ in `dtype`: [w, D], or [R, w, D] for a per-row g [R] (see `gated_out_weights`)."""
        return gated_out_weights([self], g, dtype)[0]

    def context(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """C, the attention over the notes before `W_o`: hidden [R, T, D], notes [R, N, d_n] → [R·T, w].

        `kv`: keys and values from `project_notes` for this window, if already computed. C is in the
        compute dtype (autocast's, else the parameters'); exactly 0 where nothing is visible.
        """
        rows, t, d = hidden.shape
        if visible.device != hidden.device:
            visible = visible.to(hidden.device)
        mask = self._visible(visible, rows, t, notes.shape[1])  # [R, T, N]
        k, v = kv if kv is not None else self.project_notes(notes, producer, rounds)
        dtype = self.w_q.weight.dtype
        x = hidden if hidden.dtype == dtype else hidden.to(dtype)
        q = self._queries(x)  # [R, T, w]
        q = q.view(rows, t, self.heads, self.width // self.heads).transpose(1, 2)  # → [R, H, T, dh]
        context = snc_attend(q, k, v, mask)  # [R, H, T, dh], exact 0 where nothing is visible
        return context.transpose(1, 2).reshape(rows * t, self.width)  # [R, H, T, dh] → [R·T, w]

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """`rms_norm(x) · W_qᵀ`: x [R, T, D] → [R, T, w].

        On CUDA, `F.rms_norm` is one fused kernel. On the CPU it is ~6 autograd ops over [R, T, D];
        there the norm weight is folded into W_q ([w, D]) and the 1/rms factor applied to the
        w-wide queries, from one `vector_norm` pass: 0.88 vs 1.71 ms forward + backward at
        [6, 128, 256] → 64 on 2 cores. The same values within fp32 rounding.
        """
        if x.is_cuda:
            return F.linear(F.rms_norm(x, (self.d_model,), self.norm.weight, self.norm.eps), self.w_q.weight)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [R, T, 1]
        inv_rms = torch.rsqrt(norm.square() * (1.0 / self.d_model) + self.norm.eps)  # [R, T, 1]
        return F.linear(x, self.w_q.weight * self.norm.weight) * inv_rms  # [w, D] ⊙ [D]

    def add_delta(
        self,
        base: torch.Tensor,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        g: float | torch.Tensor = 1.0,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        w_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`base + λ · g · C W_o`, [R, T, D] in base's dtype: what the hook puts after the attention.

        base [R, T, D] (the attention output), hidden [R, T, D] (what the attention read: the
        queries), notes [R, N, d_n], producer [R, N] (0..K), rounds [R, N], visible [R, T, N] or
        [R, N] bool, g a float or a tensor [R]; `kv` and `w_out` (`gated_out_weight`), if already
        computed. The gate scales `W_o` (D·w numbers) rather than the output (R·T·D), and the add is
        the output GEMM's accumulate (`addmm`, beta = 1): no elementwise pass in forward or backward.
        """
        if not torch.is_tensor(g) and float(g) == 0.0:
            return base  # g = 0: the `independent` baseline, skip the work
        if self._folds_on_cpu(base, hidden):
            rows, t, _ = hidden.shape
            kv = kv if kv is not None else self.project_notes(notes, producer, rounds)
            mask = self._visible(visible, rows, t, notes.shape[1])  # [R, T, N]
            w_out = w_out if w_out is not None else self.gated_out_weight(g, hidden.dtype)
            return self._add_delta_folded(base, hidden, kv, mask, w_out)
        c = self.context(hidden, notes, producer, rounds, visible, kv)  # [R·T, w]
        if w_out is None:
            w_out = self.gated_out_weight(g, c.dtype)
        rows, t, d = base.shape
        if base.dtype != c.dtype:
            # Mixed dtypes (an fp32 residual under autocast, a bf16 trunk with fp32 sidecars): add in
            # base's dtype, so the trunk's own values are never rounded to the compute dtype.
            delta = c @ w_out if w_out.dim() == 2 else torch.bmm(c.view(rows, t, -1), w_out)
            return base + delta.view(rows, t, d).to(base.dtype)
        if w_out.dim() == 3:  # one external gate per row: one weight per row
            return torch.baddbmm(base, c.view(rows, t, -1), w_out)  # [R, T, D]
        return torch.addmm(base.reshape(rows * t, d), c, w_out).view(rows, t, d)  # [R·T, D] → [R, T, D]

    def _folds_on_cpu(self, base: torch.Tensor, hidden: torch.Tensor) -> bool:
        """The CPU path of `add_delta` (`_add_delta_folded`): fp32-like, one dtype, no autocast, and no
        forced Triton (PDT_KERNELS=triton with TRITON_INTERPRET=1 runs the kernels on CPU tensors)."""
        return (
            not hidden.is_cuda
            and base.dtype == hidden.dtype == self.w_q.weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and kernel_mode() != "triton"
        )

    def _add_delta_folded(
        self,
        base: torch.Tensor,
        hidden: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        w_out: torch.Tensor,
    ) -> torch.Tensor:
        """`add_delta` on the CPU, with autograd: W_q (and the norm weight) folded into the keys and
        W_o into the values, per forward. base, hidden [R, T, D], kv 2 × [R, H, N, dh], mask [R, T, N].

        Why: on the CPU the host and the small ops pace a sidecar layer, not the FLOPs. Folded, a layer
        is two [H·N × D] GEMMs per row and a softmax, not a query projection, two batched per-head
        attention GEMMs, an output projection and the reshapes between them. Scores are laid out
        [R, H, N, T] and normalised over N = dim −2 (see `reference.snc_attend`). Same values as
        `context` + `W_o` within fp32 rounding; an empty window gives exactly base.
        """
        k, v = kv
        rows, heads, n, dh = k.shape
        t, d = hidden.shape[1], self.d_model
        w_q = (self.w_q.weight * self.norm.weight).view(heads, dh, d)  # [w, D] ⊙ [D] → [H, dh, D]
        keys = _per_head(k, w_q)  # [R, H·N, D]
        w_o = w_out.view(heads, dh, d) if w_out.dim() == 2 else w_out.view(rows, heads, dh, d)
        values = _per_head(v, w_o)  # [R, H·N, D]
        norm = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True)  # [R, T, 1]
        inv_rms = torch.rsqrt(norm.square() * (1.0 / d) + self.norm.eps) * (1.0 / math.sqrt(dh))
        scores = torch.bmm(keys, hidden.transpose(1, 2)) * inv_rms.transpose(1, 2)  # [R, H·N, T]
        visible = mask.transpose(1, 2)[:, None]  # [R, T, N] → [R, 1, N, T]
        any_visible = visible.any(dim=-2, keepdim=True)  # [R, 1, 1, T]
        # −inf off the window, except for a position that sees nothing: finite there, then × 0.
        scores = scores.view(rows, heads, n, t).masked_fill(~visible & any_visible, float("-inf"))
        probs = torch.softmax(scores, dim=-2) * any_visible  # [R, H, N, T]
        return torch.baddbmm(base, probs.view(rows, heads * n, t).transpose(1, 2), values)  # [R, T, D]

    def fold_window(
        self, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor, w_out: torch.Tensor
    ) -> FoldedWindow:
        """What `add_folded` needs for a decode round: kv from `project_notes` (2 × [R, H, N, dh]),
        visible [R, N] bool, w_out from `gated_out_weight` ([w, D] or [R, w, D]). Frozen weights only."""
        k, v = kv
        rows, heads, n, dh = k.shape
        d = self.d_model
        w_q = self.w_q.weight.to(k.dtype).view(heads, dh, d)  # [w, D] → [H, dh, D]
        scale = self.norm.weight.to(k.dtype) * (1.0 / math.sqrt(dh))  # [D]
        keys = torch.matmul(k, w_q) * scale  # [R, H, N, dh] @ [H, dh, D] → [R, H, N, D]
        w_o = w_out.view(heads, dh, d) if w_out.dim() == 2 else w_out.view(rows, heads, dh, d)
        seen = visible.any(dim=-1)  # [R]
        values = torch.matmul(v.to(w_o.dtype), w_o)  # [R, H, N, dh] @ [(R,) H, dh, D] → [R, H, N, D]
        values = values.masked_fill(~seen[:, None, None, None], 0.0)  # (no host tensor: graph-capturable)
        bias = torch.zeros(visible.shape, dtype=keys.dtype, device=keys.device)  # [R, N]
        # An empty window scores 0 everywhere (a harmless uniform softmax, times values of 0): never
        # a softmax over −inf only (SPEC §2b.2).
        bias = bias.masked_fill(~visible & seen[:, None], float("-inf"))
        bias = bias[:, None, :].expand(rows, heads, n).reshape(rows, 1, heads * n)  # → [R, 1, H·N]
        return FoldedWindow(
            keys=keys.reshape(rows, heads * n, d).transpose(1, 2).contiguous(),  # → [R, D, H·N]
            values=values.reshape(rows, heads * n, d),  # [R, H, N, D] → [R, H·N, D]
            bias=bias,
        )

    def add_folded(self, base: torch.Tensor, hidden: torch.Tensor, folded: FoldedWindow) -> torch.Tensor:
        """`base + λ · g · C W_o` from a `FoldedWindow`: base, hidden [R, T, D] → [R, T, D].

        The same values as `add_delta` within fp32 rounding (the products are associated differently);
        exactly `base` for a row whose window is empty, or while W_o is zero (identity at init).
        """
        return snc_folded(base, hidden, folded.keys, folded.values, folded.bias, self.heads, self.norm.eps)

    def forward(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        producer: torch.Tensor,
        rounds: torch.Tensor,
        visible: torch.Tensor,
        g: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """hidden [R, T, D] → hidden + λ · g · C W_o, [R, T, D] (arguments as in `add_delta`)."""
        return self.add_delta(hidden, hidden, notes, producer, rounds, visible, g)

    def gate_value(self) -> float:
        """λ = sigmoid(a) of this layer (the gate trace)."""
        return float(torch.sigmoid(self.gate.detach()))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_notes={self.d_notes}, width={self.width}, heads={self.heads}, "
            f"num_streams={self.num_streams}, max_rounds={self.max_rounds}"
        )


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, H, N, dh] times each head's weight [H, dh, D] (or [R, H, dh, D]) → [R, H·N, D].

    A shared weight goes through one bmm batched over heads ([H, R·N, dh] @ [H, dh, D]): the
    broadcasting `matmul` expands it to R copies, and its backward costs 1.6× as much on the CPU.
    """
    rows, heads, n, dh = x.shape
    if weight.dim() == 4:
        return torch.matmul(x, weight).view(rows, heads * n, -1)  # [R, H, N, D] → [R, H·N, D]
    per_head = torch.bmm(x.transpose(0, 1).reshape(heads, rows * n, dh), weight)  # [H, R·N, D]
    return per_head.view(heads, rows, n, -1).transpose(0, 1).reshape(rows, heads * n, -1)  # → [R, H·N, D]


def project_notes_all(
    layers: Sequence[NotesCrossAttention], notes: torch.Tensor, producer: torch.Tensor, rounds: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of one window for every layer: notes [R, N, d_n] → per layer 2 × [R, H, N, dh].

    The layers share their shapes, so their tag tables and projections are concatenated and the L
    layers cost ~20 host ops in all instead of ~14 each (the host nearly paces a 12 × 1024 step: see
    `pdt.model.instrument`). Per layer, `(notes + producer_emb[p] + round_emb[r]) · W_{k,v}ᵀ`, as
    `project_notes` of that layer alone.
    """
    first, count = layers[0], len(layers)
    rows, n, d_n = notes.shape
    heads, width = first.heads, first.width
    dtype = first.w_k.weight.dtype
    # One table per layer, [producer rows (K + 1) | round rows (max_rounds)], stacked: [L·V, d_n].
    vocab = first.num_streams + 1 + first.max_rounds
    tables = torch.cat([t for m in layers for t in (m.producer_emb.weight, m.round_emb.weight)])
    producer = producer if producer.dtype == torch.long else producer.long()
    # Rounds past max_rounds share the last id.
    rounds = (rounds if rounds.dtype == torch.long else rounds.long()).clamp(0, first.max_rounds - 1)
    ids = torch.stack((producer, rounds + first.num_streams + 1))  # [2, R, N]: rows of one layer's table
    offsets = torch.arange(0, count * vocab, vocab, device=ids.device).view(count, 1, 1, 1)  # [L, 1, 1, 1]
    tags = F.embedding(ids + offsets, tables)  # [L, 2, R, N, d_n]
    kv_in = tags.sum(1) + (notes if notes.dtype == dtype else notes.to(dtype))  # [L, R, N, d_n]
    weights = torch.cat([w for m in layers for w in (m.w_k.weight, m.w_v.weight)])  # [L·2w, d_n]
    kv = torch.matmul(kv_in.view(count, rows * n, d_n), weights.view(count, 2 * width, d_n).transpose(1, 2))
    kv = kv.view(count, rows, n, 2, heads, width // heads).permute(3, 0, 1, 4, 2, 5)  # → [2, L, R, H, N, dh]
    return list(zip(kv[0].unbind(0), kv[1].unbind(0), strict=True))


def gated_out_weights(
    layers: Sequence[NotesCrossAttention], g: float | torch.Tensor, dtype: torch.dtype
) -> list[torch.Tensor]:
    """(λ_l · g · W_o,l)ᵀ of every layer in `dtype`, as `addmm` takes it: [w, D] each, or [R, w, D]
    for a per-row g [R]. One batched pass (~6 host ops) instead of ~4 per layer; cast once here, so
    autocast does not cast it again in each layer's GEMM."""
    count = len(layers)
    w_o = torch.stack([m.w_o.weight for m in layers]).transpose(1, 2)  # [L, D, w] → [L, w, D]
    lam = torch.sigmoid(torch.stack([m.gate for m in layers]))  # [L]
    if torch.is_tensor(g):
        scale = torch.outer(lam, g.to(device=lam.device, dtype=lam.dtype))  # [L, R]
        w_o = w_o.unsqueeze(1) * scale.view(count, -1, 1, 1)  # [L, 1, w, D] · [L, R, 1, 1] → [L, R, w, D]
        return list(w_o.to(dtype).unbind(0))  # L × [R, w, D]
    scale = lam if float(g) == 1.0 else lam * float(g)
    return list((w_o * scale.view(count, 1, 1)).to(dtype).unbind(0))  # L × [w, D]
