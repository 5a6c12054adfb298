"""One teacher-forced curriculum forward and its losses (SPEC §2 "Curriculum", §2b.6–8).

What it is: for a `CurriculumBatch` — the planner on the prompt, snapshot 0 from the plan ids,
the frozen-trunk pass (KD teacher, and the source of the speculation notes for bus mixing), bus
mixing and stream dropout, the per-position notes windows (`pdt.bus.teacher_windows`, the
decode-time rule), the student pass with sidecars, and every loss of the stage with its weight.
Returns the weighted total and detached parts and scores for metrics. What it is not: the loop,
the optimiser or checkpoints (`pdt.train.curriculum`).

The frozen trunk's side of a step (KD teacher, trunk CE, the states bus mixing reads, the pooled
prompt) comes from `pdt.train.trunk_cache` when the batch carries it; otherwise it is computed
live with one extra trunk pass (`train.kd_top_k = 0`: exact full-vocabulary KD).

Gradients: the heads (notes, speculation, coverage, readiness) read detached block states — they
learn to read the stream, while LM + KD (and the auxiliary stream classifier) shape the adapters
and SNC. Bus-mixed speculation notes are not detached: the LM loss teaches the speculation head to
write notes its siblings can use. Those speculation notes come from the frozen-trunk pass that KD
needs anyway (its block-end states), so mixing costs no extra forward; at inference the head reads
sidecar-on states, which differ from these only by the gated sidecar deltas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pdt import kernels
from pdt.bus import TeacherWindow, teacher_windows
from pdt.model.pdt_model import PDTModel, PDTOutput
from pdt.model.sidecars.heads import content_means, coverage_summary
from pdt.presets.curriculum import CurriculumPreset, LossWeights
from pdt.presets.schema import BusConfig
from pdt.train import losses as L
from pdt.train.curriculum_data import CurriculumBatch, to_device
from pdt.train.trunk_cache import kd_topk_picked

#: Which trained group (or LoRA) a loss needs; a loss none of whose groups trains is skipped.
LOSS_GROUPS: dict[str, tuple[str, ...]] = {
    "plan": ("planner",),
    "notes": ("notes",),
    "speculation": ("speculation",),
    "lm": ("adapters", "snc", "lora"),
    "kd": ("adapters", "snc", "lora"),
    "coverage": ("coverage",),
    "readiness": ("agreement",),
    "stream": ("stream_classifier",),
    "sibling_ul": ("adapters", "snc", "lora"),
    "sibling_next": ("adapters", "snc", "lora"),
    # the bus's path only (`_rollout_repeats` passes its gradient to the SNC alone): the term must be
    # lowered by reading what siblings wrote, and an adapter or LoRA (on in `independent` too) would
    # learn to avoid the phrases whoever wrote them
    "sibling_rollout": ("snc",),
}


@dataclass(frozen=True)
class StepPlan:
    groups: frozenset[str]  # trained sidecar groups, plus "lora" in stage 4
    weights: LossWeights
    bus: BusConfig
    max_rounds: int
    bus_mix_prob: float = 0.0
    stream_dropout_prob: float = 0.0
    plan_mix_prob: float = 0.0

    @classmethod
    def from_preset(cls, preset: CurriculumPreset) -> StepPlan:
        groups = set(preset.trained_groups) | ({"lora"} if preset.lora is not None else set())
        return cls(
            frozenset(groups),
            preset.losses,
            preset.bus,
            preset.sidecars.max_rounds,
            preset.bus_mix_prob,
            preset.stream_dropout_prob,
            preset.plan_mix_prob,
        )

    def wants(self, loss: str) -> bool:
        return getattr(self.weights, loss) > 0 and bool(self.groups & set(LOSS_GROUPS[loss]))

    @property
    def trunk_grad(self) -> bool:
        """Does any gradient have to flow through the trunk's layers (adapters, SNC, LoRA)?"""
        return bool(self.groups & {"adapters", "snc", "lora"})


@dataclass
class StepResult:
    loss: torch.Tensor  # weighted total (with grad when training)
    parts: dict[str, torch.Tensor]  # detached scalar per computed loss
    row_ce: torch.Tensor  # [R] student LM CE sum per row
    row_tokens: torch.Tensor  # [R] labelled tokens per row
    base_row_ce: torch.Tensor | None = None  # [R] the frozen trunk's CE sum per row (sidecars off)
    # evaluation only, per-row CE sums [R] when each example reads another example's "notes" (its
    # own snapshot 0 kept) or its whole "bus" (snapshot 0 and notes): `_foreign_ce`
    foreign_row_ce: dict[str, torch.Tensor] = field(default_factory=dict)
    # the same, the sibling terms: which bus -> term -> value
    foreign_sibling: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # coverage / readiness scores + labels


def _lora_off(model: PDTModel, plan: StepPlan) -> contextlib.AbstractContextManager:
    if "lora" not in plan.groups:
        return contextlib.nullcontext()
    from pdt.train.lora import lora_disabled

    return lora_disabled(model.trunk)


def step_losses(
    model: PDTModel,
    batch: CurriculumBatch,
    plan: StepPlan,
    gen: torch.Generator,
    evaluate: bool = False,
    rollout_fn: Callable[[PDTModel, CurriculumBatch, Any], Any] | None = None,
) -> StepResult:
    """The stage's weighted loss on one batch. `gen` (CPU) drives bus mixing and stream dropout, so
    a step's randomness is a function of its seed (exact resume). `evaluate`: every loss, no grad.
    `rollout_fn(model, batch, window)`: extra readiness examples from the model's own blocks."""
    want = {name: evaluate or plan.wants(name) for name in LOSS_GROUPS}
    parts: dict[str, torch.Tensor] = {}
    labelled = batch.labels != L.IGNORE  # [R, T]
    if batch.prompt_pool is not None and "lora" not in plan.groups:  # LoRA changes the prompt states
        plan_logits = model.planner.logits_pooled(batch.prompt_pool)  # [B, S, V_p]
    else:
        with torch.no_grad():
            prompt_hidden = model.forward_base(batch.prompt_ids, batch.prompt_mask).hidden  # [B, Tp, D]
        plan_logits = model.planner.logits(prompt_hidden, batch.prompt_mask)
    active = batch.plan_targets != L.IGNORE
    snapshot0 = model.planner.snapshot0(batch.plan_targets, active)  # [B, d_n] teacher-forced plan
    if want["plan"]:
        parts["plan"] = L.plan_ce(plan_logits, batch.plan_targets)
    own = None  # the planner's own plan as the decoder builds snapshot 0 (no gradient into its choice)
    if evaluate or plan.plan_mix_prob > 0:
        own = model.planner.snapshot0(*model.planner.own_plan(plan_logits.detach()))  # [B, d_n]
    if own is not None and plan.plan_mix_prob > 0 and not evaluate:
        # drawn only here: a preset without plan mixing keeps its step's randomness
        mix = (torch.rand(own.shape[0], generator=gen) < plan.plan_mix_prob).to(own.device)  # [B]
        snapshot0 = torch.where(mix[:, None], own, snapshot0)  # [B, d_n]

    cached = batch.kd_ids is not None
    base = None if cached else _base_pass(model, batch, plan, want["kd"] or evaluate)
    notes, notes_mask = _bus_notes(model, batch, plan, gen, base, evaluate)
    with torch.set_grad_enabled(plan.trunk_grad and not evaluate and torch.is_grad_enabled()):
        window, out = _read_bus(model, batch, plan, snapshot0, notes, notes_mask)
    base_row_ce = None if base is None else base["row_ce"]
    if cached:
        lm, row_ce, row_tokens, q_top = _ce_and_top(out.logits, batch)
        if want["kd"]:
            parts["kd"] = kd_topk_picked(q_top, batch.kd_logp)
        trunk_nll = -batch.trunk_target_logp.to(row_ce.dtype)  # [N]
        base_row_ce = torch.zeros_like(row_ce).index_add_(0, batch.label_rows, trunk_nll)
    else:
        lm, row_ce, row_tokens = L.lm_ce_at(out.logits, *_label_index(batch))  # logits [N, V]
        if want["kd"] and base is not None:
            parts["kd"] = L.kd_kl(out.logits, base["logits"])
    if want["lm"]:
        parts["lm"] = lm
    for name, value in _sibling_terms(out.logits, batch, want).items():  # what siblings wrote, pushed down
        parts[name] = value
    foreign_row_ce, foreign_ul = {}, {}
    if evaluate and notes.shape[0] > 1:
        assert own is not None  # made for every evaluation
        for which in FOREIGN:
            foreign_row_ce[which], terms = _foreign_ce(
                model, batch, plan, snapshot0, own, notes, notes_mask, which
            )
            if terms:
                foreign_ul[which] = terms
    rollouts = rollout_fn is not None and (want["readiness"] or want["sibling_rollout"])
    extra = rollout_fn(model, batch, window) if rollouts else None
    scores = _head_losses(model, batch, plan, want, out.hidden, window, parts, extra, evaluate)
    if extra is not None and extra.ids is not None and want["sibling_rollout"]:
        with torch.set_grad_enabled(plan.trunk_grad and not evaluate and torch.is_grad_enabled()):
            parts["sibling_rollout"], scores["rollout_repeats"] = _rollout_repeats(model, batch, extra)
    if want["stream"]:
        parts["stream"] = L.stream_ce(
            model.stream_classifier(_row_mean(out.hidden, labelled)), batch.row_stream
        )
    total = sum(
        (getattr(plan.weights, k) * v for k, v in parts.items() if plan.wants(k)), out.logits.sum() * 0.0
    )
    return StepResult(
        loss=total,
        parts={k: v.detach() for k, v in parts.items()},
        row_ce=row_ce,
        row_tokens=row_tokens,
        base_row_ce=base_row_ce,
        scores=scores,
        foreign_row_ce=foreign_row_ce,
        foreign_sibling=foreign_ul,
    )


#: The evaluation's counterfactual buses: another example's notes, or its snapshot 0 and notes; or
#: the example's own notes with the planner's own plan as snapshot 0 (what the decoder reads).
FOREIGN = ("notes", "bus", "planner")


def _foreign_ce(
    model: PDTModel,
    batch: CurriculumBatch,
    plan: StepPlan,
    snapshot0: torch.Tensor,
    own: torch.Tensor,
    notes: torch.Tensor,
    notes_mask: torch.Tensor,
    which: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row LM CE sums [R] with every example reading the previous example's notes ("notes": its
    own snapshot 0 kept) or its snapshot 0 and notes ("bus"), under the same visibility rules: a bus
    of the same kind and shape about the wrong text. The gap to the real bus's CE is how much the
    decoder uses what the bus says. "planner": its own notes, and snapshot 0 from the planner's own
    plan (`own`) — the gap is what reading the planner's snapshot 0 rather than the teacher's costs
    (the decoder always reads the planner's). Also the sibling terms under that bus whose negatives
    the batch has: above the real bus's, the decoder avoids what its siblings wrote by reading their
    notes."""
    if which == "planner":
        _, out = _read_bus(model, batch, plan, own, notes, notes_mask)
    else:
        foreign = torch.roll(torch.arange(notes.shape[0], device=notes.device), 1)  # b reads b - 1's
        snap = snapshot0[foreign] if which == "bus" else snapshot0
        _, out = _read_bus(model, batch, plan, snap, notes[foreign], notes_mask[foreign])
    terms = _sibling_terms(out.logits, batch, {"sibling_ul": True, "sibling_next": True})
    return L.lm_ce_at(out.logits, *_label_index(batch))[1], terms


def _sibling_terms(
    logits: torch.Tensor, batch: CurriculumBatch, want: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """The sibling unlikelihood terms (`pdt.train.sibling_repeats`) that are wanted and whose negatives
    the batch carries, from logits [N, V] at the labelled positions."""
    out = {}
    for name, ids in (("sibling_ul", batch.sibling_ids), ("sibling_next", batch.sibling_next_ids)):
        if want[name] and ids is not None:
            out[name] = L.sibling_unlikelihood(kernels.picked_logprobs(logits, ids.clamp_min(0)), ids)
    return out


def _rollout_repeats(
    model: PDTModel, batch: CurriculumBatch, extra: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy sibling unlikelihood (`losses.sibling_rollout`): the rollout blocks' sampled tokens
    that repeat a sibling's 3-gram the window covers (`rollouts.sibling_repeats`), pushed down by
    −log(1 − p) through a teacher-forced forward over the sampled rows, their windows as sampled.
    Only the SNC learns from it (the adapters and LoRA run in `independent` too).
    The teacher-forced sibling terms score the true sections, where a sibling's continuation is
    rare (~1e-3 of the mass a position) and its gradient as small; a sampled repeat is a token the
    model itself chose, so its p, and the gradient, is large. Returns (the term, [repeats, sampled
    tokens looked at])."""
    from pdt.train.rollouts import sibling_repeats

    at, tokens, looked = sibling_repeats(batch, extra)
    counts = torch.tensor([float(len(at)), float(looked)])
    if len(at) == 0:
        return torch.zeros((), device=batch.input_ids.device), counts
    width = extra.ids.shape[1]
    out = model.forward_teacher(
        extra.ids,
        torch.ones_like(extra.ids),
        batch.row_stream[extra.rows],
        replace(extra.window, visible=extra.window.visible[:, :width]),
        g=1.0,
        sidecar_positions=batch.sidecar_positions[extra.rows, :width],
        logits_at=at,
    )
    ids = tokens[:, None]  # [M, 1]
    term = L.sibling_unlikelihood(kernels.picked_logprobs(out.logits, ids), ids)
    params = [p for p in model.snc.parameters() if p.requires_grad]
    if term.requires_grad and params:
        # the same value, and the same gradient for the SNC's weights, but none for the adapters or
        # LoRA the forward also ran through: the surrogate Σ ⟨w, ∂term/∂w⟩ over the SNC alone
        grads = torch.autograd.grad(term, params, allow_unused=True)
        surrogate = sum((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None)
        if isinstance(surrogate, torch.Tensor):
            term = surrogate - surrogate.detach() + term.detach()
    return term, counts


def _read_bus(
    model: PDTModel,
    batch: CurriculumBatch,
    plan: StepPlan,
    snapshot0: torch.Tensor,
    notes: torch.Tensor,
    notes_mask: torch.Tensor,
) -> tuple[TeacherWindow, PDTOutput]:
    """The per-position windows of this bus (`teacher_windows`, the decode-time visibility rules)
    and the teacher-forced forward that reads them, logits at the labelled positions only."""
    window = teacher_windows(
        snapshot0,
        notes,
        notes_mask,
        batch.pos_round,
        plan.bus,
        plan.max_rounds,
        row_example=batch.row_example,
        row_stream=batch.row_stream,
    )
    out = model.forward_teacher(
        batch.input_ids,
        batch.attention_mask,
        batch.row_stream,
        window,
        g=1.0,
        sidecar_positions=batch.sidecar_positions,
        logits_at=batch.label_flat,
    )
    return window, out


def _ce_and_top(
    logits: torch.Tensor, batch: CurriculumBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM CE and the student's log-probabilities at the cached teacher's top-k ids, read from one
    log-softmax over logits [N, V] at 1 + k ids per row (`pdt.kernels.picked_logprobs`: on CUDA a
    Triton kernel reads the logits once forward and once backward, with no fp32 [N, V] copy).
    Returns (mean CE, per-row CE sum [R], tokens per row [R], q_top [N, k])."""
    ids = torch.cat([batch.label_targets[:, None], batch.kd_ids], dim=1)  # [N, 1 + k]
    picked = kernels.picked_logprobs(logits, ids)  # [N, 1 + k] fp32 log-probabilities
    nll = -picked[:, 0]  # [N]
    counts = batch.label_counts
    sums = torch.zeros(counts.shape[0], device=nll.device).index_add_(0, batch.label_rows, nll.detach())
    return nll.sum() / counts.sum().clamp_min(1), sums, counts, picked[:, 1:]


def _label_index(batch: CurriculumBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.label_targets, batch.label_rows, batch.label_counts


def _row_mean(hidden: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """[R, T, D] → [R, D]: mean over each row's labelled (section) positions."""
    w = labelled.to(hidden.dtype)[..., None]  # [R, T, 1]
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


@torch.no_grad()
def _base_pass(
    model: PDTModel, batch: CurriculumBatch, plan: StepPlan, needed: bool
) -> dict[str, torch.Tensor] | None:
    """The frozen trunk, sidecars (and LoRA) off: KD teacher logits at labelled positions, its CE per
    row, and its block-end states (the speculation notes' input for bus mixing)."""
    if not (needed or plan.bus_mix_prob > 0):
        return None
    with _lora_off(model, plan):
        out = model.forward_base(batch.input_ids, batch.attention_mask, logits_at=batch.label_flat)
    _, row_ce, _ = L.lm_ce_at(out.logits, *_label_index(batch))
    return {
        "logits": out.logits,  # [N, V] at labelled positions
        "row_ce": row_ce,
        "block_hidden": out.hidden[batch.block_row, batch.block_pos],  # [M, D]
    }


def _bus_notes(
    model: PDTModel,
    batch: CurriculumBatch,
    plan: StepPlan,
    gen: torch.Generator,
    base: dict[str, torch.Tensor] | None,
    evaluate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher notes, with a `bus_mix_prob` share replaced by speculation notes and whole streams
    withheld with `stream_dropout_prob` (training only)."""
    notes, mask = batch.notes, batch.notes_mask
    if evaluate:
        return notes, mask
    b, k, rn, d = notes.shape
    block_hidden = batch.base_block_hidden if base is None else base["block_hidden"]
    if plan.bus_mix_prob > 0 and block_hidden is not None and batch.block_note.numel():
        # Drawn on the host (from `gen`), moved as indices: nothing is read back from the GPU.
        mix = (torch.rand(batch.block_note.shape[0], generator=gen) < plan.bus_mix_prob).nonzero().squeeze(1)
        if mix.numel():
            mix = to_device(mix, notes.device)  # [m]
            spec = model.speculation_head(block_hidden.index_select(0, mix))  # [m, d_n], with grad
            slots = batch.block_note.index_select(0, mix)
            flat = notes.reshape(b * k * rn, d).index_copy(0, slots, spec.to(notes.dtype))
            notes = flat.reshape(b, k, rn, d)  # [B·K·Rn, d_n] → [B, K, Rn, d_n]
    if plan.stream_dropout_prob > 0:
        drop = torch.rand(b, k, generator=gen) < plan.stream_dropout_prob  # [B, K]
        mask = mask & ~to_device(drop, mask.device)[..., None]
    return notes, mask


def _head_losses(
    model: PDTModel,
    batch: CurriculumBatch,
    plan: StepPlan,
    want: dict[str, bool],
    hidden: torch.Tensor,
    window: object,
    parts: dict[str, torch.Tensor],
    extra: Any = None,
    evaluate: bool = False,
) -> dict[str, torch.Tensor]:
    """Notes, speculation, coverage and readiness at block ends; returns detached scores."""
    scores: dict[str, torch.Tensor] = {}
    state = hidden[batch.block_row, batch.block_pos].detach()  # [M, D]
    d = batch.notes.shape[-1]
    target = batch.notes.reshape(-1, d)[batch.block_note]  # [M, d_n] teacher notes
    if want["notes"]:
        parts["notes"] = L.note_mse(model.notes_head(state), target)
    if want["speculation"]:
        parts["speculation"] = L.note_mse(model.speculation_head(state), target)
    if not (want["coverage"] or want["readiness"]):
        return scores
    item_mask = batch.item_mask[batch.block_row]  # [M, P]
    items = model.coverage_keys(
        batch.item_ids[batch.block_row], batch.item_text[batch.block_row]
    )  # [M, P, d_n]
    cov_logits = model.coverage_head(state, items, item_mask)  # [M, P]
    if want["coverage"]:
        parts["coverage"] = L.coverage_bce(cov_logits, batch.block_cov, item_mask)
    if evaluate:  # boolean-mask reads: metrics only, never in a training step
        scores["coverage_scores"] = torch.sigmoid(cov_logits.detach().float())[item_mask]
        scores["coverage_labels"] = (batch.block_cov[item_mask] >= 1.0).float()
    if want["readiness"]:
        written = written_positions(batch.labels)  # [R, T]
        start = block_starts(written, batch.pos_round, batch.block_row, batch.block_pos)  # [M]
        content = content_means(
            hidden.detach(), written, batch.block_row, start, batch.block_pos
        )  # [M, 2, D]
        logits, labels, kinds = _readiness(
            model, batch, state, content, window, cov_logits.detach(), item_mask, target
        )
        reported = kinds
        if extra is not None:  # kind 2: the model's own sampled blocks, labelled by their events
            own = model.agreement_head(extra.state, extra.pooled, extra.summary, extra.note, extra.content)
            logits, labels = torch.cat([logits, own]), torch.cat([labels, extra.labels])
            kinds = torch.cat([kinds, torch.full_like(extra.labels, 2.0)])
            copied = (
                extra.copied if extra.copied is not None else torch.zeros_like(extra.labels, dtype=torch.bool)
            )
            # copied blocks train with the rollouts (one loss group) and are reported apart (kind 3)
            reported = torch.cat([reported, torch.where(copied, 3.0, 2.0).to(kinds)])
            own_blocks = (~copied).float()  # the violation rate of the model's own blocks (no readback)
            violations = ((1.0 - extra.labels) * own_blocks).sum() / own_blocks.sum().clamp_min(1.0)
            scores["rollout_violations"] = violations.reshape(1)
        parts["readiness"] = L.readiness_bce(logits, labels, kinds)
        if evaluate:
            scores["readiness_scores"] = torch.sigmoid(logits.detach().float())
            scores["readiness_labels"] = labels
            scores["readiness_kinds"] = reported
            # each corrupted note's kind (CORRUPTIONS index) in _readiness's layout, -1 elsewhere
            corruption = torch.full(labels.shape, -1.0, device=labels.device)
            start = len(batch.last_blocks)
            corruption[start : start + len(batch.var_kind)] = batch.var_kind.to(corruption)
            scores["readiness_corruptions"] = corruption
    return scores


def _readiness(
    model: PDTModel,
    batch: CurriculumBatch,
    state: torch.Tensor,
    content: torch.Tensor,
    window: object,
    cov_logits: torch.Tensor,
    item_mask: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Readiness examples with real labels; returns (logits, labels, kinds).

    Kind 0 — the dataset's events: the last block of every stream with its real teacher note
    (label 1) and the same blocks with the dataset's corrupted notes (label 0: entity swap, dropped
    fact, wrong owner: `batch.var_kind`), laid out as the last blocks, then `batch.var_block`.
    Only last blocks: the corrupted variants are of the final notes, so positives from earlier
    blocks would let the head tell the classes apart by position.
    Kind 1 — the decoder's view: at every block, the stream's own speculation note (label 1) and a
    sibling block's speculation note in its place (label 0: the note claims another stream's
    content). At inference the head scores exactly such notes, which kind 0 never shows it; both
    labels occur at every block and with the same kind of note, so only the agreement of note and
    state separates them. (Tried on 2026-12-06 instead: a sibling block's state and note against
    this stream's window and plan items, the ownership violation the decoder could meet; on the
    124M pipeline that kind reached AUC 0.57 at 1000 steps against 0.70 for this one at 600.)"""
    visible = window.visible[batch.block_row, batch.block_pos]  # [M, N]
    wnotes = window.notes[batch.block_row].detach()  # [M, N, d_n]
    pooled = (wnotes * visible[..., None]).sum(dim=1) / visible.sum(dim=1, keepdim=True).clamp_min(1)
    summary = coverage_summary(cov_logits, item_mask)  # [M, 2]
    pos = batch.last_blocks  # [M_last]
    spec = model.speculation_head(state).detach()  # [M, d_n] the notes the decoder would commit
    own, sib = batch.spec_own, batch.spec_sib  # [Ms]
    idx = torch.cat([pos, batch.var_block, own, own])
    note_all = torch.cat(
        [target[pos], batch.var_note.to(target.dtype), spec[own].to(target.dtype), spec[sib].to(target.dtype)]
    )
    n_pos, n_var, n_spec = len(pos), len(batch.var_block), len(own)
    labels = torch.cat([torch.ones(n_pos), torch.zeros(n_var), torch.ones(n_spec), torch.zeros(n_spec)]).to(
        state.device
    )
    kinds = torch.cat([torch.zeros(n_pos + n_var), torch.ones(2 * n_spec)]).to(state.device)
    logits = model.agreement_head(state[idx], pooled[idx], summary[idx], note_all, content[idx])
    return logits, labels, kinds


def written_positions(labels: torch.Tensor) -> torch.Tensor:
    """[R, T] bool: the positions of the stream's own section tokens (the label at t − 1 predicts
    token t) — what the readiness head's content means average."""
    out = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    out[:, 1:] = labels[:, :-1] != L.IGNORE
    return out


def block_starts(
    written: torch.Tensor, pos_round: torch.Tensor, row: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """First position of each block ending at `end` [M] in row `row` [M]: the earliest written
    position (`written_positions`) of the same round, at most `end`. No host sync."""
    rounds = pos_round[row]  # [M, T]
    same = (rounds == rounds.gather(1, end[:, None])) & written[row]  # [M, T]
    t = torch.arange(rounds.shape[1], device=row.device)[None, :]
    first = torch.where(same, t, torch.full_like(t, rounds.shape[1])).amin(dim=1)
    return torch.minimum(first, end)
