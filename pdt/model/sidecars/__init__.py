"""PDT sidecars: the small trainable modules that sit beside a frozen trunk (SPEC §2).

What it is: one module per file — `snc.NotesCrossAttention` (after self-attention),
`adapter.StreamAdapters` (after the MLP), `planner.Planner` (snapshot 0), `seed_text.TextEmbedder`
(frozen-trunk text embeddings for seeds and note targets) and the heads in `heads`. Every
injection point is an exact identity at init. What it is not: the hooks that attach them
(`pdt.model.instrument`), their composition (`pdt.model.pdt_model`), or the kernels they call
(`pdt.kernels`).
"""

from __future__ import annotations

from pdt.model.sidecars.adapter import StreamAdapters
from pdt.model.sidecars.heads import (
    COVERAGE_SUMMARY_DIM,
    PAD_LOGIT,
    AgreementHead,
    CoverageHead,
    NotesHead,
    SpeculationHead,
    StreamClassifier,
    content_means,
    coverage_summary,
)
from pdt.model.sidecars.planner import Planner, plan_item_id
from pdt.model.sidecars.seed_text import TextEmbedder, masked_mean_pool
from pdt.model.sidecars.snc import NotesCrossAttention

__all__ = [
    "COVERAGE_SUMMARY_DIM",
    "PAD_LOGIT",
    "AgreementHead",
    "CoverageHead",
    "NotesCrossAttention",
    "NotesHead",
    "Planner",
    "SpeculationHead",
    "StreamAdapters",
    "StreamClassifier",
    "TextEmbedder",
    "content_means",
    "coverage_summary",
    "masked_mean_pool",
    "plan_item_id",
]
