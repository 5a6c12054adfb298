"""Planner: from the prompt's hidden states to S latent plan ids and snapshot 0.

What it is: masked mean-pool of the prompt's last hidden states → S slot queries in a small plan
space (`d_plan`) → logits over the plan vocabulary by scoring each query against the plan
codebook `E_plan [V_p, d_plan]`; and `snapshot0`, the note every stream sees before its first
token: L2-normalised mean over active slots of `proj(E_plan[id])`. Also re-exports
`plan_item_id` (text → plan id, `pdt.data.plan_ids`). What it is not: the dataset stage that
writes plan items, nor the bus that publishes snapshot 0 (`pdt.bus`).

Why a codebook: a dense `D × S·V_p` head is 2880 × 16 × 65536 ≈ 3.0B parameters (SPEC §2b.5).
Slot queries against a shared codebook cost `D·S·d_plan + V_p·d_plan` — ≈ 4M at the same sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdt.data.plan_ids import plan_item_id
from pdt.model.sidecars.seed_text import masked_mean_pool

__all__ = ["Planner", "plan_item_id"]


class Planner(nn.Module):
    """Slot queries scored against a plan codebook; snapshot 0 from the chosen plan ids.

    Parameters: pool norm 2·D, slot head D·S·d_plan + S·d_plan, slot embeddings S·d_plan,
    E_plan V_p·d_plan, proj d_plan·d_n — 2·D + (D + 2)·S·d_plan + V_p·d_plan + d_plan·d_n in all.
    """

    def __init__(self, d_model: int, d_notes: int, plan_vocab: int, plan_slots: int, d_plan: int) -> None:
        super().__init__()
        self.d_model, self.d_notes = d_model, d_notes
        self.plan_vocab, self.plan_slots, self.d_plan = plan_vocab, plan_slots, d_plan
        # A mean of final-norm states is shorter than each state; re-normalising keeps the slot
        # queries O(1) whatever the prompt length.
        self.pool_norm = nn.LayerNorm(d_model)
        self.slot_head = nn.Linear(d_model, plan_slots * d_plan)
        # Slot embeddings make slots differ even for the same prompt (slot s ≠ slot s').
        self.slot_emb = nn.Parameter(torch.randn(plan_slots, d_plan) / math.sqrt(d_plan))
        self.plan_emb = nn.Embedding(plan_vocab, d_plan)  # E_plan, N(0, 1) rows
        self.proj = nn.Linear(d_plan, d_notes, bias=False)  # bias-free: snapshot is normalised anyway

    def slot_queries(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, D], mask [B, T] → [B, S, d_plan]."""
        return self.slot_queries_pooled(masked_mean_pool(hidden, mask))

    def slot_queries_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The masked mean of the prompt's hidden states [B, D] → [B, S, d_plan]."""
        pooled = self.pool_norm(pooled.to(self.slot_head.weight.dtype))  # [B, D]
        queries = self.slot_head(pooled).reshape(-1, self.plan_slots, self.d_plan)  # [B, S·d_p] → [B, S, d_p]
        return queries + self.slot_emb

    def logits(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, D], mask [B, T] → plan logits [B, S, V_p]."""
        return self.logits_pooled(masked_mean_pool(hidden, mask))

    def logits_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled prompt states [B, D] → plan logits [B, S, V_p]."""
        queries = self.slot_queries_pooled(pooled)  # [B, S, d_plan]
        # 1/sqrt(d_plan): logits start O(1), so plan CE starts near log V_p rather than saturated.
        return queries @ self.plan_emb.weight.t() / math.sqrt(self.d_plan)

    @staticmethod
    def own_plan(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan logits [B, S, V_p] → the plan the planner itself chooses, as the decoder reads it:
        each slot's argmax id [B, S] and which slots are active [B, S] (an id a slot repeats from an
        earlier slot is inactive, so each id counts once in `snapshot0`)."""
        ids = logits.argmax(dim=-1)  # [B, S]
        s = ids.shape[-1]
        earlier = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril(-1)  # [S, S]: j < i
        repeat = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(dim=-1)  # [B, S]
        return ids, ~repeat

    def snapshot0(self, plan_ids: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """plan_ids [B, S] long, active [B, S] bool (None = all) → [B, d_n], unit norm (0 if none active).

        Inactive slots may hold any id (e.g. −100 padding): they are looked up as id 0 and
        excluded from the mean, so they change nothing.
        """
        if active is None:
            active = torch.ones_like(plan_ids, dtype=torch.bool)
        active = active.bool()
        ids = plan_ids.long().masked_fill(~active, 0)  # [B, S], padding → a valid row, masked below
        items = self.proj(self.plan_emb(ids))  # [B, S, d_n]
        summed = torch.where(active[..., None], items, 0.0).sum(dim=1)  # [B, d_n]
        mean = summed / active.sum(dim=1, keepdim=True).clamp_min(1)
        return F.normalize(mean, dim=-1, eps=1e-12)

    def item_embeddings(self, plan_ids: torch.Tensor) -> torch.Tensor:
        """plan_ids [...] long → [..., d_n] unit vectors: a plan item in note space (the coverage keys)."""
        return F.normalize(self.proj(self.plan_emb(plan_ids.long())), dim=-1, eps=1e-12)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D], mask [B, T] → (logits [B, S, V_p], snapshot 0 [B, d_n] from the argmax ids).

        The snapshot is differentiable w.r.t. E_plan and proj (not w.r.t. the logits: argmax).
        """
        logits = self.logits(hidden, mask)  # [B, S, V_p]
        return logits, self.snapshot0(logits.argmax(dim=-1), active)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_notes={self.d_notes}, plan_vocab={self.plan_vocab}, "
            f"plan_slots={self.plan_slots}, d_plan={self.d_plan}"
        )
