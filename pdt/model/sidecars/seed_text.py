"""Text embedder: the frozen trunk's pooled last hidden states as unit note vectors of width d_n.

What it is: masked mean-pool of `[B, T, D]` hidden states, minus a centre (the mean pooled state
of the training split's note texts, plan items aside, set once at a fresh stage; zero: none),
then a FIXED projection to `d_n` (identity if D == d_n, zero-pad if D < d_n, a seeded random
orthogonal map if D > d_n), then L2 normalisation. The centre matters: a decoder's pooled states
share one large common direction (on the tiny trunk the notes of two different articles had
cosine 0.90, of one article 0.95; centred, 0.50 and 0.72), so without it a note says little
beyond "a note". Used for seed texts injected at t0 and the notes-head targets (centred), and for
the coverage keys (the plan items' texts, never centred: `centred=False`), so the targets are
real semantic embeddings of the frozen trunk (SPEC §2b.6), not hash vectors. It has no trainable
parameter: the projection and the centre are buffers (saved with the sidecars, so a checkpoint
keeps its note space even if a future LAPACK changes QR signs). What it is not: the trunk forward
that produces the hidden states (`PDTModel.embed_texts`) nor a trainable head (`heads.NotesHead`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """hidden [B, T, D], mask [B, T] (bool or 0/1; None = all valid) → [B, D] in fp32.

    Padded positions are replaced by 0 (not multiplied by 0), so NaN/inf in padding cannot leak.
    A row with no valid position pools to 0.
    """
    if mask is None:
        return hidden.float().mean(dim=1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    valid = mask.to(hidden.device).bool()[..., None]  # [B, T, 1]
    total = torch.where(valid, hidden.float(), 0.0).sum(dim=1)  # [B, D]
    count = valid.sum(dim=1).clamp_min(1)  # [B, 1]
    return total / count


def fixed_projection(d_model: int, d_notes: int, seed: int) -> torch.Tensor:
    """[D, d_n]: identity, zero-pad, or a seeded matrix with orthonormal columns (D > d_n).

    Orthonormal columns preserve inner products of the component they keep, so cosine
    similarity in note space tracks that of the trunk's pooled states. Built on the CPU with
    its own generator (deterministic, independent of the global RNG and of a `meta` device).
    """
    if d_model <= d_notes:
        return torch.eye(d_model, d_notes, device="cpu")  # identity, or identity + zero columns
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
    gauss = torch.randn(d_model, d_notes, generator=gen, device="cpu", dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)  # q [D, d_n], orthonormal columns
    q = q * torch.sign(torch.diagonal(r))[None, :]  # fix QR's sign ambiguity: a unique, Haar-random q
    return q.float()


class TextEmbedder(nn.Module):
    """[B, T, D] hidden states + mask → [B, d_n] unit vectors; no trainable parameters."""

    proj: torch.Tensor
    center: torch.Tensor

    def __init__(self, d_model: int, d_notes: int, seed: int = 0) -> None:
        super().__init__()
        self.d_model, self.d_notes, self.seed = d_model, d_notes, seed
        self.register_buffer("proj", fixed_projection(d_model, d_notes, seed))  # [D, d_n]
        self.register_buffer("center", torch.zeros(d_model))  # [D] subtracted before the projection

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, centred: bool = True
    ) -> torch.Tensor:
        """hidden [B, T, D], mask [B, T] (None = all valid) → [B, d_n], L2 norm 1 (0 for an empty row).
        `centred=False`: the centre is not subtracted (the coverage keys)."""
        pooled = masked_mean_pool(hidden, mask)  # [B, D] fp32
        keep = None if mask is None else mask.to(pooled.device).bool().any(dim=1, keepdim=True)
        return self.project(pooled, centred, keep)

    def project(
        self, pooled: torch.Tensor, centred: bool = True, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled states [B, D] (`pooled`) → [B, d_n] unit vectors, as `forward`; `keep` [B, 1] bool
        marks the non-empty rows (None: all), which alone take the centre (an empty row stays 0)."""
        pooled = pooled.float()
        if centred:
            pooled = pooled - self.center.float() * (1.0 if keep is None else keep)
        return F.normalize(pooled @ self.proj.float(), dim=-1, eps=1e-12)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The uncentred pooled states [B, D] fp32 (what the centre is the mean of)."""
        return masked_mean_pool(hidden, mask)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_notes={self.d_notes}, seed={self.seed}"
