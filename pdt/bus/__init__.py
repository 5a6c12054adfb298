"""Dynamic Notes Bus (DNB): who reads which notes, and when.

What it is: the single source of truth for note visibility, shared by decoding and training —
`NotesBus` (decode time: a versioned per-prompt store, fixed-shape `WindowBatch` per forward),
`teacher_windows` (teacher forcing: per-position visibility `[R, T, N]`, the same rule
vectorised) and `Counterfactual` (ablate / freeze / swap / stale / shuffle on top of either).
The rule: stream k at round v reads snapshot 0 plus the latest version of each committed note
(j, r) with r <= v - Δ and r < v from the producers its topology allows, its own latest note
(newest r < v) always, the W newest per producer. See `pdt.bus.notes_bus` for the table.
What it is not: the notes cross-attention (`pdt.model`), nor the decode loop (`pdt.infer`).
"""

from pdt.bus.counterfactual import Counterfactual, CounterfactualError, derangement
from pdt.bus.notes_bus import NoteRecord, NotesBus, WindowBatch
from pdt.bus.teacher import TeacherWindow, default_layout, section_pos_round, teacher_windows

__all__ = [
    "Counterfactual",
    "CounterfactualError",
    "NoteRecord",
    "NotesBus",
    "TeacherWindow",
    "WindowBatch",
    "default_layout",
    "derangement",
    "section_pos_round",
    "teacher_windows",
]
