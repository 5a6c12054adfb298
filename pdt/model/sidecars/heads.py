"""Small trainable heads on the trunk's hidden states: notes, speculation, coverage, readiness, stream.

What it is: `NotesHead` (hidden → d_n, trained against teacher-note embeddings), `SpeculationHead`
(same shape, separate weights: hidden at a block end → the stream's provisional note),
`CoverageHead` (stream state vs plan-item embeddings → one logit per item, padding masked),
`AgreementHead` (stream state and content, pooled window, coverage summary, note → readiness
logit; score = sigmoid in [0, 1]; `content_means` makes its content input) and `StreamClassifier`
(which stream a hidden state belongs to; auxiliary).
What it is not: the losses (`pdt.train`), the commit/rollback rule that thresholds readiness at γ
(`pdt.infer`), nor the text embedder that makes the targets (`seed_text.TextEmbedder`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Logit given to padded plan items. Finite (−inf would turn BCE and sums into NaN/inf) and
#: far enough that sigmoid is exactly 0 in fp32/bf16 and representable in fp16 (max 65504).
PAD_LOGIT = -1.0e4

#: Width of `coverage_summary`: (mean, max) of the coverage probabilities over real items.
COVERAGE_SUMMARY_DIM = 2


class _NoteMLP(nn.Module):
    """hidden [..., D] → [..., d_n] via D → d_n → d_n (GELU). Parameters: D·d_n + d_n² + 2·d_n."""

    def __init__(self, d_model: int, d_notes: int) -> None:
        super().__init__()
        self.d_model, self.d_notes = d_model, d_notes
        self.inp = nn.Linear(d_model, d_notes)
        self.out = nn.Linear(d_notes, d_notes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] → [..., d_n] (not normalised: trained by MSE against unit-norm targets)."""
        return self.out(F.gelu(self.inp(hidden.to(self.inp.weight.dtype))))


class NotesHead(_NoteMLP):
    """Teacher-forced notes: hidden [..., D] → note [..., d_n]."""


class SpeculationHead(_NoteMLP):
    """Speculative notes: hidden at a block end [..., D] → provisional note [..., d_n] (own weights)."""


class CoverageHead(nn.Module):
    """Bilinear score of a stream state against each plan item. Parameters: D·d_n + d_n + 1."""

    def __init__(self, d_model: int, d_notes: int) -> None:
        super().__init__()
        self.d_model, self.d_notes = d_model, d_notes
        self.query = nn.Linear(d_model, d_notes)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, state: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """state [B, D], items [B, P, d_n], mask [B, P] bool (True = real item) → logits [B, P].

        Padded items are zeroed BEFORE scoring (so NaN/inf padding cannot reach a gradient) and
        their logits are `PAD_LOGIT`; each real item's logit depends only on the state and itself.
        """
        if items.shape[:2] != mask.shape or state.shape[0] != items.shape[0]:
            raise ValueError(
                f"CoverageHead: state [B, D], items [B, P, d_n], mask [B, P]; got "
                f"{tuple(state.shape)}, {tuple(items.shape)}, {tuple(mask.shape)}"
            )
        real = mask.bool()
        query = self.query(state.to(self.query.weight.dtype))  # [B, d_n]
        items = torch.where(real[..., None], items.to(query.dtype), 0.0)  # [B, P, d_n], padding → 0
        logits = (items * query[:, None, :]).sum(dim=-1) + self.bias  # [B, P]
        return logits.masked_fill(~real, PAD_LOGIT)


def coverage_summary(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Coverage logits [B, P] + mask [B, P] → [B, 2]: (mean, max) probability over real items (0 if none)."""
    real = mask.bool()
    probs = torch.where(real, torch.sigmoid(logits), 0.0)  # [B, P]
    mean = probs.sum(dim=-1) / real.sum(dim=-1).clamp_min(1)
    return torch.stack([mean, probs.max(dim=-1).values if probs.shape[-1] else mean], dim=-1)


class AgreementHead(nn.Module):
    """Readiness: may this stream's block be committed? Logit [B]; `score` = sigmoid in [0, 1].

    Features: s = proj(state) [d_n], pooled window [d_n], note [d_n], window ⊙ note [d_n] (does the
    note agree with what the siblings said?), s ⊙ note [d_n] (is the note about this stream's own
    block?), coverage summary [c] → MLP (5·d_n + c → d_n → 1). The stream's content — the mean
    hidden state over the block and over its section so far (`content_means`, [B, 2, D]), through
    the same projection: c_b, c_s [d_n] — adds c_b, c_b ⊙ note, c_s ⊙ note (what the block and the
    section wrote against the note) to the hidden layer through `content` (3·d_n → d_n, no bias). A
    single token's state carries little of what a block named; the means carry it. `content`
    starts at zero, so a head saved before it existed loads with it and scores exactly as it did
    (`pdt_model.ADDED_KEYS`). Parameters: D·d_n + d_n + (5·d_n + c)·d_n + d_n + d_n + 1 + 3·d_n²
    (the content path is kept small: the sidecars' budget is 5% of the trunk, SPEC §2b.5).
    """

    def __init__(self, d_model: int, d_notes: int, coverage_dim: int = COVERAGE_SUMMARY_DIM) -> None:
        super().__init__()
        self.d_model, self.d_notes, self.coverage_dim = d_model, d_notes, coverage_dim
        self.state_proj = nn.Linear(d_model, d_notes)
        self.hidden = nn.Linear(5 * d_notes + coverage_dim, d_notes)
        self.out = nn.Linear(d_notes, 1)
        self.content = nn.Linear(3 * d_notes, d_notes, bias=False)
        nn.init.zeros_(self.content.weight)

    def forward(
        self,
        state: torch.Tensor,
        window: torch.Tensor,
        coverage: torch.Tensor,
        note: torch.Tensor,
        content: torch.Tensor,
    ) -> torch.Tensor:
        """state [B, D], window [B, d_n], coverage [B, c], note [B, d_n], content [B, 2, D] (block
        mean, section mean) → readiness logit [B]."""
        dtype = self.out.weight.dtype
        window, note, coverage = window.to(dtype), note.to(dtype), coverage.to(dtype)
        own = self.state_proj(state.to(dtype))  # [B, d_n]
        features = torch.cat(
            [own, window, note, window * note, own * note, coverage], dim=-1
        )  # [B, 5·d_n + c]
        block, section = self.state_proj(content.to(dtype)).unbind(dim=1)  # [B, d_n] each
        wrote = torch.cat([block, block * note, section * note], dim=-1)  # [B, 3·d_n]
        pre = self.hidden(features) + self.content(wrote)  # [B, d_n]
        return self.out(F.gelu(pre)).squeeze(-1)  # [B, 1] → [B]

    def score(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Readiness in [0, 1], [B] (commit when ≥ γ): the sigmoid of `forward` on the same inputs."""
        return torch.sigmoid(self.forward(*inputs))


def content_means(
    hidden: torch.Tensor, written: torch.Tensor, row: torch.Tensor, start: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """The readiness head's content input for M blocks: [M, 2, D] fp32, the mean of `hidden`
    [R, T, D] over the stream's own written positions (`written` [R, T] bool) of row `row` [M] in
    [start, end] (the block) and in [0, end] (its section so far); zeros where a span has none.
    Cumulative sums: no host sync, one pass over the rows."""
    w = written.to(torch.float32)  # [R, T]
    sums = torch.cumsum(hidden.float() * w[..., None], dim=1)  # [R, T, D]
    counts = torch.cumsum(w, dim=1)  # [R, T]
    before = (start - 1).clamp_min(0)
    has_before = (start > 0).to(torch.float32)  # [M]
    sec_sum, sec_n = sums[row, end], counts[row, end]  # [M, D], [M]
    blk_sum = sec_sum - sums[row, before] * has_before[:, None]
    blk_n = sec_n - counts[row, before] * has_before
    return torch.stack([blk_sum / blk_n.clamp_min(1)[:, None], sec_sum / sec_n.clamp_min(1)[:, None]], dim=1)


class StreamClassifier(nn.Module):
    """Which stream a hidden state belongs to: [..., D] → logits [..., K]. Parameters: D·K + K."""

    def __init__(self, d_model: int, num_streams: int) -> None:
        super().__init__()
        self.d_model, self.num_streams = d_model, num_streams
        self.linear = nn.Linear(d_model, num_streams)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype))
