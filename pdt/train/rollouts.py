"""Stage 3: readiness examples from the model's own sampled blocks, labelled by real events.

What it is: for a few blocks of a training batch, the model (sidecars on, the block's teacher-forced
notes window) samples the block itself from the teacher-forced context before it; the sampled block
is labelled from what it contains (SPEC §2b.6 — real events, never random flags):
- ownership violation: it names a plan item that a sibling stream owns and this stream does not;
- duplication: it repeats a sibling's section (≥ `DUP_NGRAMS` shared word 3-grams);
otherwise it is committable (label 1). Its readiness features are those the decoder has at a block
end: the state after the block, its content means, the pooled window, the coverage summary, and
the stream's own speculation note. What it is not: the decoder of `pdt.infer` (no bus, no
rounds): the rows read their teacher windows and sample through `StreamDecoder`'s cached steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdt.bus.teacher import TeacherWindow
from pdt.model.attention import cache_arg, decode_attention, output_cache
from pdt.model.decode import DecodeState, StreamDecoder
from pdt.model.instrument import SidecarContext
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
    copied: torch.Tensor | None = None  # [n] bool: the block wrote a sibling's tokens (`copy_share`)
    rows: torch.Tensor | None = None  # [n] the batch row of each block
    # what `sibling_repeats` and the on-policy term (`losses.sibling_rollout`) read back
    ids: torch.Tensor | None = None  # [n, E+1] each row's teacher context, then its sampled block
    window: TeacherWindow | None = None  # the rows' teacher windows
    start: torch.Tensor | None = None  # [n] first sampled position
    end: torch.Tensor | None = None  # [n] last sampled position
    forced: torch.Tensor | None = None  # [n, E+1] a copied token (≥ 0) or -1 (sampled)


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
    copy_share: float = 0.0,
) -> RolloutExamples | None:
    """Sample `rows` blocks (chosen with `gen`) and return their readiness features and labels; a
    `copy_share` of them write a sibling's opening tokens instead (`_sibling_tokens`)."""
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
    forced, copied = _sibling_tokens(batch, records, row, start, end, copy_share, gen)
    hidden = _sample_blocks(model, batch, sub, ids, row, start, end, temperature, gen, forced)  # [n, E+1, D]
    n = torch.arange(len(row), device=row.device)
    state = hidden[n, end]  # [n, D] the state after the sampled block
    content = content_means(hidden, written[:, : hidden.shape[1]], n, start, end)  # [n, 2, D]
    texts = [tokenizer.decode(ids[i, int(start[i]) : int(end[i]) + 1].tolist()) for i in range(len(row))]
    reasons = [_reason(texts[i], int(row[i]), batch, records, tokenizer) for i in range(len(row))]
    examples = _features(model, batch, sub, row, end, state, content, texts, reasons)
    examples.copied, examples.rows = copied.to(examples.labels.device), row
    examples.ids, examples.window, examples.start, examples.end = ids[:, : hidden.shape[1]], sub, start, end
    examples.forced = forced
    return examples


def sibling_repeats(batch: Any, ex: RolloutExamples) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The sampled tokens that repeat a sibling's word: token p of a rollout block is a repeat when
    (ids[p-2], ids[p-1], ids[p]) is a 3-gram of a sibling's section, in the rounds the notes window
    that predicts it (position p - 1's) holds that sibling's note of, and not a 3-gram of the row's own
    true section. Copied tokens (`copy_share`) are not sampled and never count.
    Returns (at [M] flat indices row·(E+1) + p - 1 of the positions whose logits predict the repeats,
    their tokens [M], the number of sampled tokens looked at). Host work: a rollout's few blocks."""
    assert ex.ids is not None and ex.window is not None and ex.start is not None and ex.end is not None
    assert ex.rows is not None
    k = int(batch.row_stream.max()) + 1
    written = written_positions(batch.labels).cpu()  # [R, T]
    inputs, rounds_of = batch.input_ids.cpu(), batch.pos_round.cpu()
    ids, width = ex.ids.cpu(), ex.ids.shape[1]
    visible, producer, note_round = ex.window.visible.cpu(), ex.window.producer.cpu(), ex.window.rounds.cpu()
    forced = None if ex.forced is None else ex.forced.cpu()
    known: dict[tuple[int, int], set[tuple[int, ...]]] = {}  # (sibling row, round) → its 3-grams so far

    def grams(tokens: list[int]) -> set[tuple[int, ...]]:
        return {tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)}

    def sibling_grams(sib_row: int, upto: int) -> set[tuple[int, ...]]:
        if (sib_row, upto) not in known:
            keep = written[sib_row] & (rounds_of[sib_row] <= upto)
            known[sib_row, upto] = grams(inputs[sib_row][keep].tolist())
        return known[sib_row, upto]

    at: list[int] = []
    tok: list[int] = []
    looked = 0
    for i, r in enumerate(ex.rows.tolist()):
        b, j = divmod(r, k)
        own = grams(inputs[r][written[r]].tolist())
        row_ids = ids[i].tolist()
        for p in range(max(int(ex.start[i]), 2), int(ex.end[i]) + 1):
            if forced is not None and p < forced.shape[1] and int(forced[i, p]) >= 0:
                continue
            looked += 1
            tri = tuple(row_ids[p - 2 : p + 1])
            if tri in own:
                continue
            newest: dict[int, int] = {}  # sibling stream → its newest note round the window holds
            for q in torch.nonzero(visible[i, p - 1]).flatten().tolist():
                sj, u = int(producer[i, q]), int(note_round[i, q])
                if sj != j and sj < k:
                    newest[sj] = max(newest.get(sj, -1), u)
            if any(tri in sibling_grams(b * k + sj, u) for sj, u in newest.items()):
                at.append(i * width + p - 1)
                tok.append(row_ids[p])
    device = ex.ids.device
    as_tensor = [torch.tensor(x, dtype=torch.long, device=device) for x in (at, tok)]
    return as_tensor[0], as_tensor[1], looked


def _sibling_tokens(
    batch: Any,
    records: list[dict[str, Any]],
    row: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    share: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the first round(share · n) picked blocks (picked at random already): a sibling's section
    from its start, written in the block's place — the duplicate a stream writes when it restates
    what another stream opened with. Returns forced [n, E+1] (−1: sample that position) and copied
    [n] bool. Only streams with a sibling can copy."""
    n, e_max = len(row), int(end.max())
    forced = torch.full((n, e_max + 1), -1, dtype=torch.long)
    copied = torch.zeros(n, dtype=torch.bool)
    k = int(batch.row_stream.max()) + 1
    if share <= 0 or k < 2:
        return forced, copied
    for i in range(round(share * n)):
        b, j = divmod(int(row[i]), k)
        s = (j + 1 + int(torch.randint(k - 1, (1,), generator=gen))) % k  # another stream
        rec = records[b]
        section = [t for t, m in zip(rec["token_ids"][s], rec["label_mask"][s], strict=True) if m]
        lo, hi = int(start[i]), int(end[i])
        take = section[: hi - lo + 1]
        if take:
            forced[i, lo : lo + len(take)] = torch.tensor(take)
            copied[i] = True
    return forced, copied


def _sample_blocks(
    model: PDTModel,
    batch: Any,
    sub: TeacherWindow,
    ids: torch.Tensor,
    row: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    temperature: float,
    gen: torch.Generator,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample tokens start..end of each row into `ids` (in place) — or take `forced`'s token where it
    is ≥ 0 ([n, E+1]) — and return the hidden states of
    positions 0..max(end) [n, E+1, D] as one teacher-forced forward over the sampled rows gives them.

    With a KV cache: one forward over every row's teacher context (up to the latest start; each
    row's slots from its own start on are masked from then on), then one batched step per sampled
    token (`StreamDecoder.step`: per-row positions, a finished row takes a placeholder slot), the
    step's window the row's teacher window at that position. Without the cache each token re-ran the
    whole prefix: on the tiny pipeline's stage 3 that was 31% of the stage's time."""
    from transformers import DynamicCache

    n = torch.arange(len(row), device=row.device)
    s_max, e_max = int(start.max()), int(end.max())
    ctx = SidecarContext(
        stream_ids=batch.row_stream[row],
        notes=sub.notes,
        producer=sub.producer,
        rounds=sub.rounds,
        visible=sub.visible[:, :s_max],
        g=1.0,
        positions=batch.sidecar_positions[row, :s_max],
    )
    with decode_attention(), model.instrumentation.active(ctx):
        out = model.trunk(
            input_ids=ids[:, :s_max],
            attention_mask=torch.ones_like(ids[:, :s_max]),
            use_cache=True,
            output_hidden_states=True,
            **{cache_arg(model.trunk): DynamicCache()},
        )
    prefix = out.hidden_states[-1]  # [n, S, D]
    hidden = prefix.new_zeros(len(row), e_max + 1, prefix.shape[-1])
    hidden[:, :s_max] = prefix  # a row's positions from its own start on are replaced below
    slots = torch.arange(s_max, device=row.device)
    state = DecodeState(
        cache=output_cache(out),
        valid=slots[None, :] < start[:, None],  # [n, S] a row sees its teacher context only
        logical=slots.expand(len(row), s_max).clone(),
        lengths=start.clone(),
        tokens=[[] for _ in range(len(row))],
    )
    decoder = StreamDecoder(model)
    logits = out.logits[n, start - 1]  # [n, V] predicts each row's first sampled token
    if forced is not None:
        forced = forced.to(ids.device)  # once, not a host→device copy a token
    for t in range(int((end - start).max()) + 1):
        pos = start + t  # [n] the position each row writes
        live = pos <= end
        nxt = _sample(logits, temperature, gen).to(ids.device)
        if forced is not None:  # a copied block's tokens (the draw is still made: same generator use)
            take = forced[n, pos.clamp(max=forced.shape[1] - 1)]
            nxt = torch.where(take >= 0, take, nxt)
        fed = torch.where(live, nxt, torch.zeros_like(nxt))  # a finished row: a placeholder slot
        ids[n[live], pos[live]] = fed[live]
        at = pos.clamp(max=sub.visible.shape[1] - 1)  # (a finished row's placeholder: any window)
        step_ctx = SidecarContext(
            stream_ids=batch.row_stream[row],
            notes=sub.notes,
            producer=sub.producer,
            rounds=sub.rounds,
            visible=sub.visible[n, at][:, None],  # [n, 1, N] each row's teacher window there, as in training
            g=1.0,
        )
        logits, step_hidden = decoder.step(state, fed.cpu(), live.cpu(), step_ctx)
        hidden[n[live], pos[live]] = step_hidden[live].to(hidden.dtype)
    return hidden


def rollout_fn(
    records: list[dict[str, Any]],
    tokenizer: Any,
    rows: int,
    temperature: float,
    gen: torch.Generator,
    copy_share: float = 0.0,
) -> Callable[[PDTModel, Any, TeacherWindow], RolloutExamples | None]:
    """`step_losses`' `rollout_fn` for a batch of `records`: `rollout_examples` of `rows` blocks."""

    def fn(model: PDTModel, batch: Any, window: TeacherWindow) -> RolloutExamples | None:
        return rollout_examples(model, batch, window, records, tokenizer, rows, temperature, gen, copy_share)

    return fn


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
