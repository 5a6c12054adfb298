"""Stage 3: readiness examples from the model's own sampled blocks, labelled by real events.

What it is: for a few blocks of a training batch, the model (sidecars on, the block's teacher-forced
notes window) samples the block itself from the teacher-forced context before it; the sampled block
is labelled from what it contains (SPEC §2b.6 — real events, never random flags):
- ownership violation: it names a plan item that a sibling stream owns and this stream does not;
- duplication: it repeats a sibling's section (≥ `DUP_NGRAMS` shared word 3-grams);
otherwise it is committable (label 1). Its readiness features are those the decoder has at a block
end: the state after the block, its content means, the pooled window, the coverage summary, and
the stream's own speculation note. What it is not: the decoder of `pdt.infer`; this is plain
sampling with full recomputation, enough for a few rows every few steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdt.bus.teacher import TeacherWindow
from pdt.model.attention import decode_attention
from pdt.model.pdt_model import PDTModel
from pdt.model.sidecars.heads import content_means, coverage_summary
from pdt.train.curriculum_step import block_starts, written_positions

DUP_NGRAMS = 2  # shared word 3-grams with a sibling's section that count as duplication


@dataclass
class RolloutExamples:
    state: torch.Tensor  # [n, D]
    pooled: torch.Tensor  # [n, d_n]
    summary: torch.Tensor  # [n, 2]
    note: torch.Tensor  # [n, d_n]
    content: torch.Tensor  # [n, 2, D] block and section-so-far means (`heads.content_means`)
    labels: torch.Tensor  # [n]
    texts: list[str]
    reasons: list[str]  # "ok", "ownership", "duplication"


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def label_block(
    text: str, own_items: list[str], sibling_items: list[str], sibling_sections: list[str]
) -> str:
    """'ownership', 'duplication' or 'ok' for a sampled block (rules in the module docstring)."""
    low = text.lower()
    own = {x.lower() for x in own_items}
    if any(x.lower() in low and x.lower() not in own for x in sibling_items if len(x) >= 3):
        return "ownership"
    grams = _trigrams(text)
    if any(len(grams & _trigrams(s)) >= DUP_NGRAMS for s in sibling_sections):
        return "duplication"
    return "ok"


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def rollout_examples(
    model: PDTModel,
    batch: Any,
    window: TeacherWindow,
    records: list[dict[str, Any]],
    tokenizer: Any,
    rows: int,
    temperature: float,
    gen: torch.Generator,
) -> RolloutExamples | None:
    """Sample `rows` blocks (chosen with `gen`) and return their readiness features and labels."""
    m = batch.block_row.shape[0]
    if m == 0:
        return None
    pick = torch.randperm(m, generator=gen)[:rows].to(batch.block_row.device)  # [n] blocks
    row, end = batch.block_row[pick], batch.block_pos[pick]  # [n]
    written = written_positions(batch.labels[row])  # [n, T] the stream's own section positions
    start = block_starts(written, batch.pos_round[row], torch.arange(len(row), device=row.device), end)  # [n]
    ids = batch.input_ids[row].clone()  # [n, T]; positions ≥ start are overwritten by samples
    sub = TeacherWindow(
        notes=window.notes[row],
        producer=window.producer[row],
        rounds=window.rounds[row],
        visible=window.visible[row],
        row_stream=window.row_stream[row],
        row_example=window.row_example[row],
    )
    for t in range(int((end - start).max()) + 1):
        pos = (start + t).clamp(max=end)  # [n] position being written (rows that finished repeat)
        length = int(pos.max())  # predict token `pos` from positions < pos
        logits = _forward(model, batch, ids[:, :length], row, sub, length).logits  # [n, L, V]
        nxt = _sample(logits[torch.arange(len(row)), pos - 1], temperature, gen).to(ids.device)
        ids[torch.arange(len(row)), pos] = torch.where(
            start + t <= end, nxt, ids[torch.arange(len(row)), pos]
        )
    out = _forward(model, batch, ids[:, : int(end.max()) + 1], row, sub, int(end.max()) + 1)
    n = torch.arange(len(row), device=row.device)
    state = out.hidden[n, end]  # [n, D] the state after the sampled block
    content = content_means(out.hidden, written[:, : out.hidden.shape[1]], n, start, end)  # [n, 2, D]
    texts = [tokenizer.decode(ids[i, int(start[i]) : int(end[i]) + 1].tolist()) for i in range(len(row))]
    reasons = [_reason(texts[i], int(row[i]), batch, records, tokenizer) for i in range(len(row))]
    return _features(model, batch, sub, row, end, state, content, texts, reasons)


def rollout_fn(
    records: list[dict[str, Any]], tokenizer: Any, rows: int, temperature: float, gen: torch.Generator
) -> Callable[[PDTModel, Any, TeacherWindow], RolloutExamples | None]:
    """`step_losses`' `rollout_fn` for a batch of `records`: `rollout_examples` of `rows` blocks."""

    def fn(model: PDTModel, batch: Any, window: TeacherWindow) -> RolloutExamples | None:
        return rollout_examples(model, batch, window, records, tokenizer, rows, temperature, gen)

    return fn


def _forward(
    model: PDTModel, batch: Any, ids: torch.Tensor, row: torch.Tensor, sub: TeacherWindow, length: int
):
    window = TeacherWindow(
        notes=sub.notes,
        producer=sub.producer,
        rounds=sub.rounds,
        visible=sub.visible[:, :length],
        row_stream=sub.row_stream,
        row_example=sub.row_example,
    )
    # a new length each token, as in decoding: off cuDNN attention, which plans per shape
    with decode_attention():
        return model.forward_teacher(
            ids,
            torch.ones_like(ids),
            batch.row_stream[row],
            window,
            g=1.0,
            sidecar_positions=batch.sidecar_positions[row, :length],
        )


def _reason(text: str, row: int, batch: Any, records: list[dict[str, Any]], tokenizer: Any) -> str:
    k = int(batch.row_stream.max()) + 1
    b, j = divmod(row, k)
    rec = records[b]
    siblings = [s for s in range(k) if s != j]
    sections = [
        tokenizer.decode([t for t, m in zip(rec["token_ids"][s], rec["label_mask"][s], strict=True) if m])
        for s in siblings
    ]
    sibling_items = [x for s in siblings for x in rec["plan_item_texts"][s]]
    return label_block(text, rec["plan_item_texts"][j], sibling_items, sections)


def _features(
    model: PDTModel,
    batch: Any,
    sub: TeacherWindow,
    row: torch.Tensor,
    end: torch.Tensor,
    state: torch.Tensor,
    content: torch.Tensor,
    texts: list[str],
    reasons: list[str],
) -> RolloutExamples:
    n = len(row)
    visible = sub.visible[torch.arange(n), end]  # [n, N]
    pooled = (sub.notes * visible[..., None]).sum(1) / visible.sum(1, keepdim=True).clamp_min(1)  # [n, d_n]
    items = model.coverage_keys(batch.item_ids[row], batch.item_text[row])  # [n, P, d_n]
    cov = model.coverage_head(state, items, batch.item_mask[row])  # [n, P]
    return RolloutExamples(
        state=state,
        pooled=pooled,
        summary=coverage_summary(cov, batch.item_mask[row]),
        note=model.speculation_head(state),
        content=content,
        labels=torch.tensor([1.0 if r == "ok" else 0.0 for r in reasons], device=state.device),
        texts=texts,
        reasons=reasons,
    )
