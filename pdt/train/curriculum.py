"""The `curriculum` job: train one stage of the PDT sidecars on a frozen trunk, resumably.

What it is: setup (trunk, tokenizer, dataset checks, teacher-note cache, sidecars from the previous
stage's `current` checkpoint, LoRA for stage 4), the loop (accumulation, clipping, bf16 autocast,
gradient averaging across torchrun ranks, periodic eval / checkpoints / gate trace / memory), and
the end of a stage (final evaluation, calibration of γ and the coverage threshold, the sidecar
export and the report). What it is not: the losses (`pdt.train.curriculum_step`), the data
(`pdt.train.curriculum_data`) or checkpoint storage (`pdt.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import pdt
from pdt.data import check_identity
from pdt.data.tokenizer import TokenizerError, load_tokenizer
from pdt.jobs import JobContext
from pdt.model.pdt_model import COVERAGE_KEYS, PLAN_NAMES, PLAN_VECTORS, PDTModel, SidecarLoadError
from pdt.model.trunk import load_trunk
from pdt.presets.curriculum import CurriculumPreset
from pdt.presets.loader import preset_hash
from pdt.runs import checkpoints_root
from pdt.telemetry.events import Checkpoint, Metric, Progress
from pdt.telemetry.memory import sample_memory
from pdt.train import curriculum_data as CD
from pdt.train import distributed as D
from pdt.train import runtime as R
from pdt.train.checkpoint import CheckpointManager, LoadedCheckpoint
from pdt.train.curriculum_eval import calibrate, evaluate, write_report
from pdt.train.curriculum_step import StepPlan, step_losses
from pdt.train.decode_calibration import item_vectors
from pdt.train.lora import LoraError
from pdt.train.optim import adamw, lr_at, param_groups
from pdt.train.sibling_repeats import ContentVocab, content_vocab


class CurriculumError(Exception):
    """The stage cannot start or resume; the message says what to run or change."""


@dataclass
class Stage:
    """Everything the loop mutates, in one place."""

    ctx: JobContext
    preset: CurriculumPreset
    dist: D.DistContext
    model: PDTModel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    ckpt: CheckpointManager
    ds: CD.ExportedDataset
    vectors: dict[str, list[torch.Tensor]]
    trunk_cache: dict[str, list[Any]] | None
    order: CD.ExampleOrder
    plan: StepPlan
    autocast_dtype: torch.dtype | None
    total_steps: int
    step: int = 0
    tokens: int = 0
    last_saved_step: int = -1
    last_save_time: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    started_from: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    item_vectors: tuple[list[str], torch.Tensor] | None = None  # plan-item text keys, once (export)
    content: ContentVocab | None = None  # the name-like tokens, when the LM path trains (sibling repeats)


def run_curriculum(ctx: JobContext) -> str:
    preset = ctx.preset
    assert isinstance(preset, CurriculumPreset)
    st = _setup(ctx, preset)
    if st.step >= st.total_steps and (st.ckpt.current_state() or {}).get("finished"):
        ctx.log(
            f"{preset.name} already finished at step {st.step}; nothing to do. To train again, move "
            f"{ctx.checkpoints_dir} aside or raise the budget."
        )
        return "finished"
    return _train(st)


# --------------------------------------------------------------------------- setup


def trunk_folder(preset: CurriculumPreset) -> Path:
    if preset.trunk.path is not None:
        return Path(preset.trunk.path).expanduser()
    return checkpoints_root() / str(preset.trunk.preset) / "export"


def _load_trunk(preset: CurriculumPreset, device: torch.device) -> tuple[torch.nn.Module, Any]:
    folder = trunk_folder(preset)
    if not (folder / "config.json").exists():
        if preset.trunk.preset is not None:
            raise CurriculumError(
                f"the trunk of {preset.name!r} is pretrain preset {preset.trunk.preset!r}'s export, and "
                f"{folder} does not exist yet: run the preset {preset.trunk.preset!r} to the end first"
            )
        raise CurriculumError(f"trunk.path {folder} is not a Hugging Face model folder (no config.json)")
    want_bf16 = preset.trunk.dtype == "bf16" or (preset.trunk.dtype == "auto" and device.type == "cuda")
    trunk = load_trunk(folder, torch.bfloat16 if want_bf16 else torch.float32)
    return trunk.to(device), load_tokenizer(folder)


def _setup(ctx: JobContext, preset: CurriculumPreset) -> Stage:
    dist = D.setup(preset.distributed.backend)
    cfg = preset.train
    if dist.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.seed)
    trunk, tokenizer = _load_trunk(preset, dist.device)
    ds = CD.open_dataset(preset.dataset)
    CD.check_compatible(ds, preset, tokenizer)
    model = PDTModel(trunk, preset.sidecars)
    params = model.set_trainable(list(preset.trained_groups))
    lora_params: list[torch.nn.Parameter] = []
    if preset.lora is not None:
        from pdt.train.lora import attach_lora

        lora_params = attach_lora(model.trunk, preset.lora)
    model.to(dist.device)
    trunk_cache = _trunk_cache(ctx, preset, ds, model, tokenizer, dist) if cfg.kd_top_k > 0 else None
    optimizer = _optimizer(preset, model, lora_params, dist.device)
    order = CD.ExampleOrder(
        len(ds.splits["train"]), cfg.micro_batch_size, cfg.seed, dist.rank, dist.world_size
    )
    st = Stage(
        ctx,
        preset,
        dist,
        model,
        params + lora_params,
        optimizer,
        tokenizer,
        CheckpointManager(ctx.checkpoints_dir, warn=lambda m: ctx.log(m, "warning")),
        ds,
        {},
        trunk_cache,
        order,
        StepPlan.from_preset(preset),
        R.autocast_dtype(preset.train.precision, dist.device),
        _total_steps(preset, ds, dist.world_size),
    )
    if st.plan.trunk_grad:  # the sibling-repeat term: trained when weighed, evaluated in any case
        st.content = content_vocab(tokenizer, tokenizer.vocab_size)
    loaded = _load_own(st)
    pooled_train_notes = None
    if loaded is None:
        _init_from_previous(st)
        if preset.init_from is None and preset.sidecars.center_text_embeddings:
            pooled_train_notes = _set_text_center(st)
    # the notes' targets are embedded with the centre the sidecars carry (set above or loaded)
    st.vectors = _note_vectors(ctx, preset, ds, model, tokenizer, dist, pooled_train_notes)
    _announce(st, loaded)
    return st


def _optimizer(
    preset: CurriculumPreset, model: PDTModel, lora_params: list, device: torch.device
) -> torch.optim.Optimizer:
    cfg = preset.train
    lora_ids = {id(p) for p in lora_params}
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in lora_ids]
    groups = [g for g in groups if g["params"]]
    heads = (model.coverage_head, model.agreement_head)
    owned = (
        (cfg.heads_lr_scale, {id(p) for m in heads for p in m.parameters()}),
        (cfg.gates_lr_scale, {id(m.gate) for m in (*model.snc, *model.adapters)}),
    )
    for scale, ids in owned:  # the coverage and readiness heads, the gates: groups of their own
        if scale == 1.0:
            continue
        split = []
        for g in groups:
            own = [p for p in g["params"] if id(p) in ids]
            if own:
                split.append({**g, "params": own, "lr_scale": scale})
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups = [g for g in groups if g["params"]] + split
    if lora_params:
        lr = preset.lora.lr if preset.lora and preset.lora.lr else cfg.lr
        groups.append({"params": lora_params, "weight_decay": 0.0, "lr_scale": lr / cfg.lr})
    return adamw(groups, cfg, device)


def _total_steps(preset: CurriculumPreset, ds: CD.ExportedDataset, world: int) -> int:
    cfg = preset.train
    if cfg.steps is not None:
        return cfg.steps
    cap = cfg.max_stream_tokens
    per_example = sum(
        sum(min(len(ids), cap) for ids in rec["token_ids"]) for rec in ds.splits["train"]
    ) / len(ds.splits["train"])
    per_step = per_example * cfg.micro_batch_size * cfg.grad_accum * world
    return max(1, math.ceil(int(cfg.token_budget or 0) / per_step))


def _set_text_center(st: Stage) -> torch.Tensor | None:
    """A fresh start's text-embedding centre: the mean pooled frozen-trunk state of the training
    split's note texts, plan items aside (`TextEmbedder`); rank 0's, so every rank holds the same
    bits (the note cache's key includes them). Returns rank 0's pooled states of those texts, in
    order, [n, D] fp32 (None elsewhere): the train split's note vectors are their projection, so a
    missing note cache costs no second trunk pass over them (`_note_vectors`)."""
    preset, records = st.preset, st.ds.splits["train"]
    texts = [
        t
        for r in records
        for t, item in zip(CD.note_texts(r), CD.note_text_is_item(r), strict=True)
        if not item
    ]
    if not texts:
        return None
    center = pooled = None
    if st.dist.is_main:
        st.ctx.log(f"centring the text embeddings on {len(texts):,} note texts of the train split (once)")
        with _autocast(preset, st.dist.device), _trunk_only(preset, st.model):
            pooled = CD.embed_note_texts(
                texts, st.tokenizer, st.model.pooled_texts, preset.train.note_tokens, st.dist.device
            )
        center = pooled.mean(dim=0)
    center = D.broadcast_object(center, st.dist)
    st.model.text_embedder.center.copy_(center.to(st.model.text_embedder.center))
    return pooled


def _note_vectors(
    ctx: JobContext,
    preset: CurriculumPreset,
    ds: CD.ExportedDataset,
    model: PDTModel,
    tokenizer: Any,
    dist: D.DistContext,
    pooled_train_notes: torch.Tensor | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Teacher-note embeddings for train and validation, from the cache or computed once (rank 0).
    `pooled_train_notes`: the train split's note texts (plan items aside) already pooled by the
    trunk, in order (`_set_text_center`), projected instead of run through the trunk again."""
    from pdt.model.pdt_model import trunk_identity

    key = {
        "trunk": trunk_identity(model.trunk),
        "d_notes": preset.sidecars.d_notes,
        "note_tokens": preset.train.note_tokens,
        "salt": preset.sidecars.plan_salt,
        "center": hashlib.sha256(model.text_embedder.center.float().cpu().numpy().tobytes()).hexdigest()[:16],
        "items": "uncentred",  # the coverage keys never take the centre
    }
    out = {}
    for split, records in ds.splits.items():
        path = CD.cache_path(ds, split, key)

        def build(texts: list[str], is_item: list[bool], split: str = split) -> torch.Tensor:
            ctx.log(
                f"embedding {len(texts):,} teacher notes of the {split} split with the frozen trunk (once)"
            )
            ctx.emit(Progress(step=0, total=1, stage=f"notes-{split}"))
            vec = torch.zeros(len(texts), preset.sidecars.d_notes)
            for item in (False, True):  # notes centred, the plan items' texts (coverage keys) not
                rows = [i for i, x in enumerate(is_item) if x == item]
                if not rows:
                    continue

                def embed(ids: torch.Tensor, mask: torch.Tensor, item: bool = item) -> torch.Tensor:
                    return model.embed_texts(ids, mask, centred=not item)

                pooled = pooled_train_notes if split == "train" and not item else None
                with _autocast(preset, dist.device), _trunk_only(preset, model):
                    if pooled is not None and len(pooled) == len(rows):  # the same texts, in order
                        part = model.text_embedder.project(pooled.to(dist.device)).float().cpu()
                    else:
                        part = CD.embed_note_texts(
                            [texts[i] for i in rows], tokenizer, embed, preset.train.note_tokens, dist.device
                        )
                vec[torch.tensor(rows)] = part
            ctx.emit(Progress(step=1, total=1, stage=f"notes-{split}"))
            return vec

        out[split] = CD.load_or_build_notes(path, records, build, dist.is_main, lambda: D.barrier(dist))
    return out


def _trunk_cache(
    ctx: JobContext,
    preset: CurriculumPreset,
    ds: CD.ExportedDataset,
    model: PDTModel,
    tokenizer: Any,
    dist: D.DistContext,
) -> dict[str, list[Any]]:
    """The frozen trunk's per-example outputs (KD targets, block states, pooled prompts), once."""
    from pdt.model.pdt_model import trunk_identity
    from pdt.train import trunk_cache as TC

    cfg = preset.train
    key = {
        "kind": "trunk",
        "trunk": trunk_identity(model.trunk),
        "top_k": cfg.kd_top_k,
        "cap": cfg.max_stream_tokens,
        "stride": ds.stride,
        "v": 1,
    }
    out = {}
    for split, records in ds.splits.items():
        path = CD.cache_path(ds, split, key)
        path = path.with_name("trunk-" + path.name)

        def build(records: list = records, split: str = split) -> list[dict[str, torch.Tensor]]:
            ctx.log(
                f"caching the frozen trunk's outputs on the {split} split ({len(records):,} examples, once)"
            )
            entries: list[dict[str, torch.Tensor]] = []
            size = 16
            for start in range(0, len(records), size):
                chunk = records[start : start + size]
                zeros = [torch.zeros(len(CD.note_texts(r)), 1) for r in chunk]
                batch = CD.collate(chunk, zeros, preset, tokenizer.eot_id, ds.stride).to(dist.device)
                with _autocast(preset, dist.device), _trunk_only(preset, model):
                    entries += TC.compute_batch(model, batch, cfg.kd_top_k)
                ctx.emit(Progress(step=start + len(chunk), total=len(records), stage=f"trunk-{split}"))
            return entries

        out[split] = TC.load_or_build(path, len(records), build, key, dist.is_main, lambda: D.barrier(dist))
    return out


def _trunk_only(preset: CurriculumPreset, model: PDTModel) -> contextlib.AbstractContextManager:
    """The trunk as pretrained (LoRA off): note targets and KD targets describe the frozen trunk,
    even when a resumed stage 4 builds a missing cache after its LoRA has moved."""
    if preset.lora is None:
        return contextlib.nullcontext()
    from pdt.train.lora import lora_disabled

    return lora_disabled(model.trunk)


def _autocast(preset: CurriculumPreset, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the setup passes (caches), before the Stage (and its `autocast_dtype`) exists."""
    return R.autocast(R.autocast_dtype(preset.train.precision, device), device)


def _load_own(st: Stage) -> LoadedCheckpoint | None:
    """Resume this stage from its own `current` (rank 0 verifies first)."""
    loaded = R.load_latest(st.ckpt, st.dist)
    if loaded is None:
        return None
    state = loaded.state
    try:
        check_identity(state.get("tokenizer", {}), st.tokenizer)
        st.model.load_sidecar_state(loaded.tensors["sidecars"], state["sidecar_meta"], str(loaded.path))
        if st.preset.lora is not None:
            from pdt.train.lora import load_lora_state

            load_lora_state(st.model.trunk, loaded.tensors.get("lora", {}), str(loaded.path))
        st.optimizer.load_state_dict(loaded.objects["optimizer"])
    except (SidecarLoadError, KeyError, ValueError, RuntimeError, TokenizerError, LoraError) as exc:
        raise CurriculumError(
            f"{loaded.path} cannot continue preset {st.preset.name!r} ({str(exc).splitlines()[0]}); "
            f"move {st.ctx.checkpoints_dir} aside to start this stage over, or restore the preset"
        ) from None
    if state.get("preset_hash") != preset_hash(st.preset):
        st.ctx.log(
            "the preset changed since this checkpoint was written; continuing with the new settings",
            "warning",
        )
    cursors = state.get("data") or []
    if len(cursors) == st.dist.world_size:
        st.order.load_state_dict(cursors[st.dist.rank])
    else:
        st.ctx.log(
            f"the checkpoint was written by {len(cursors)} process(es): the data order restarts", "warning"
        )
    st.step = st.last_saved_step = int(state["step"])
    st.tokens = int(state.get("tokens_seen", 0))
    st.elapsed_s = float(state.get("elapsed_s", 0.0))
    st.started_from = dict(state.get("started_from") or {})
    st.history = list(state.get("history") or [])
    st.calibration = state.get("calibration")
    return loaded


def _init_from_previous(st: Stage) -> None:
    """A fresh stage starts from the previous stage's `current` sidecars (and says so)."""
    prev = st.preset.init_from
    if prev is None:
        st.started_from = {"preset": None}
        return
    folder = checkpoints_root() / prev
    loaded = CheckpointManager(folder, warn=lambda m: st.ctx.log(m, "warning")).load()
    if loaded is None or "sidecars" not in loaded.tensors:
        raise CurriculumError(
            f"stage {st.preset.stage} ({st.preset.name!r}) starts from {prev!r}'s checkpoint, and "
            f"{folder / 'current'} does not exist: run the preset {prev!r} first"
        )
    try:
        st.model.load_sidecar_state(
            loaded.tensors["sidecars"], loaded.state["sidecar_meta"], str(loaded.path)
        )
    except SidecarLoadError as exc:
        raise CurriculumError(
            f"{exc}. Stage {st.preset.stage} must use the sidecars and trunk of {prev!r}."
        ) from None
    if not loaded.state.get("finished"):
        st.ctx.log(
            f"{prev!r} did not finish (its checkpoint is at step {loaded.state.get('step')}); "
            "starting from it anyway",
            "warning",
        )
    st.started_from = {"preset": prev, "step": int(loaded.state.get("step", 0)), "path": str(loaded.path)}


def _announce(st: Stage, loaded: LoadedCheckpoint | None) -> None:
    report = st.model.parameter_report()
    trainable = sum(p.numel() for p in st.params)
    if loaded is not None:
        where = f"resuming from step {st.step} ({loaded.slot})"
    elif st.started_from.get("preset"):
        where = f"starting from {st.started_from['preset']!r} step {st.started_from['step']}"
    else:
        where = "starting from freshly initialised sidecars"
    precision = "bf16 autocast" if st.autocast_dtype == torch.bfloat16 else "fp32"
    st.ctx.log(
        f"{st.preset.name}: stage {st.preset.stage}, training {', '.join(sorted(st.plan.groups))} "
        f"({trainable / 1e6:.2f}M parameters; all sidecars {report['percent_of_trunk']:.2f}% of the "
        f"{report['trunk'] / 1e6:.1f}M trunk), {st.total_steps} steps on {st.dist.world_size} x "
        f"{st.dist.device.type} ({precision}), dataset {st.ds.name!r} "
        f"({len(st.ds.splits['train'])} train examples), {where}"
    )


# --------------------------------------------------------------------------- the loop


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The randomness of one micro-step (bus mixing, dropout, rollouts): a pure function of its indices."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 257 + micro) * 131 + rank)


def _batch(st: Stage, split: str, indices: list[int]) -> CD.CurriculumBatch:
    records = [st.ds.splits[split][i] for i in indices]
    vectors = [st.vectors[split][i] for i in indices]
    evaluating = split != "train"  # the sibling terms: trained when weighed, evaluated in any case
    content = st.content if evaluating or st.plan.wants("sibling_ul") else None
    nexts = st.content is not None and (evaluating or st.plan.wants("sibling_next"))
    batch = CD.collate(records, vectors, st.preset, st.tokenizer.eot_id, st.ds.stride, content, nexts)
    batch = batch.to(st.dist.device)
    if st.trunk_cache is not None:
        from pdt.train.trunk_cache import attach

        batch = attach(batch, [st.trunk_cache[split][i] for i in indices], st.dist.device)
    return batch


def _train_step(st: Stage) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One optimizer step; returns (mean loss parts, grad norm, tokens). The numbers stay on the
    device (read back only when logged): a read-back per step would stall the GPU's queue."""
    cfg = st.preset.train
    lr = lr_at(st.step, st.total_steps, cfg)
    for group in st.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for micro in range(cfg.grad_accum):
        indices = st.order.next()
        batch = _batch(st, "train", indices)
        gen = step_generator(cfg.seed, st.step, micro, st.dist.rank)
        with R.autocast(st.autocast_dtype, st.dist.device):
            result = step_losses(st.model, batch, st.plan, gen, rollout_fn=_rollout_fn(st, indices, gen))
        (result.loss / cfg.grad_accum).backward()
        tokens += batch.tokens
        if "rollout_violations" in result.scores:
            result.parts["rollout_violations"] = result.scores["rollout_violations"][0]
        if "rollout_repeats" in result.scores:  # [repeats, sampled tokens]
            repeats = result.scores["rollout_repeats"]
            result.parts["rollout_repeat_rate"] = repeats[0] / repeats[1].clamp_min(1.0)
        for name, value in {"loss": result.loss.detach(), **result.parts}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / cfg.grad_accum
    _average_grads(st)
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(st.params, cfg.grad_clip)
    else:
        norm = torch.zeros((), device=st.dist.device)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    return sums, norm, tokens


def _rollout_fn(st: Stage, indices: list[int], gen: torch.Generator) -> Any:
    """Stage-3 rollouts on this step's batch, every `rollouts.every` steps (None otherwise)."""
    cfg = st.preset.rollouts
    if not cfg.every or st.step % cfg.every:
        return None
    from pdt.train.rollouts import rollout_fn

    records = [st.ds.splits["train"][i] for i in indices]
    return rollout_fn(records, st.tokenizer, cfg.rows, cfg.temperature, gen, cfg.copy_share)


def _average_grads(st: Stage) -> None:
    """DDP by hand for a small trainable set: one all-reduce of the flattened gradients."""
    if not st.dist.enabled:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in st.params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= st.dist.world_size
    offset = 0
    for p, g in zip(st.params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def _train(st: Stage) -> str:
    cfg = st.preset.train
    st.model.train()
    window_tokens, window_start, last_progress, last_memory = 0, time.monotonic(), 0.0, 0.0
    run_start = time.monotonic() - st.elapsed_s
    while st.step < st.total_steps:
        stop, save_due = D.agree_flags(
            st.dist,
            st.ctx.stop_requested(),
            R.save_due(st.step, st.last_saved_step, st.last_save_time, st.preset.checkpoint),
        )
        if stop:
            _save(st, finished=False)
            st.ctx.log(f"stopped at step {st.step}; run the preset again to resume")
            return "stopped"
        if save_due:
            _save(st, finished=False)
        cursor_before = st.order.state_dict()
        try:
            parts, norm, tokens = _train_step(st)
        except torch.OutOfMemoryError:
            st.order.load_state_dict(cursor_before)
            save = lambda: _save(st, finished=False)  # noqa: E731
            R.save_after_oom(st.dist, st.step, st.last_saved_step, st.optimizer, save, st.ctx.log)
            raise
        st.step += 1
        st.tokens += tokens * st.dist.world_size
        window_tokens += tokens * st.dist.world_size
        st.elapsed_s = time.monotonic() - run_start
        now = time.monotonic()
        if st.step % cfg.log_every == 0 or st.step == st.total_steps:
            _log_metrics(st, parts, norm, window_tokens / max(1e-9, now - window_start))
            window_tokens, window_start = 0, time.monotonic()
        if st.dist.is_main and (now - last_progress > 0.1 or st.step == st.total_steps):
            st.ctx.emit(
                Progress(
                    step=st.step, total=st.total_steps, tokens=st.tokens, stage=f"stage{st.preset.stage}"
                )
            )
            last_progress = now
        if st.dist.is_main and now - last_memory > 10.0:
            st.ctx.emit(sample_memory())
            last_memory = now
        if st.step % cfg.eval_every == 0 and st.step < st.total_steps:
            _evaluate(st)
    return _finish(st)


def _fmt(x: float) -> str:
    """A metric that may be NaN (one class only) for a log line."""
    return "n/a" if x != x else f"{x:.3f}"


def _gamma_capped_note(ready: dict[str, Any], cap: float) -> str | None:
    """What the own-rollout cap did to γ, when it lowered it (None otherwise): γ near 0 means the
    decoder will hardly ever roll back."""
    gamma, youden = ready["gamma"], ready["gamma_youden"]
    if gamma >= youden:
        return None
    lab = ready.get("labelled_good_quantiles") or {}
    if ready.get("decoded_blocks"):  # capped on the decoder's own answers
        own = ready.get("decoded_quantiles") or {}
        blocks = (
            f"the {ready['decoded_blocks']} blocks the decoder wrote on {ready['decoded_prompts']} "
            "validation prompts"
        )
    else:
        own = ready.get("own_good_quantiles") or {}
        good = ready["own_blocks"] - ready["own_violations"]
        blocks = f"the model's own {good} rollout blocks with no violation"
    scores = ""
    if own and lab:
        scores = (
            f" (their readiness: min {own['min']:.3g}, median {own['p50']:.3f}; the labelled good blocks': "
            f"min {lab['min']:.3g}, median {lab['p50']:.3f})"
        )
    out = (
        f"readiness γ lowered from {youden:.3f} (the ROC rule) to {gamma:.3g} so that at most {cap:g} of "
        f"{blocks} roll back{scores}"
    )
    if gamma < 0.01:
        out += (
            "; at this γ the decoder will hardly ever roll back (as `independent`, but with the bus). "
            "More rollout rows (`rollouts.rows`, `rollouts.eval_rows`) or stage-3 steps give the head more "
            "of the model's own text to learn from; a looser `readiness_max_rollback` keeps more of "
            "the ROC's γ"
        )
        looser = {s: g for s, g in (ready.get("gamma_by_max_rollback") or {}).items() if float(s) > cap}
        if looser:
            out += " (" + ", ".join(f"{s}: γ {g:.3g}" for s, g in looser.items()) + ")"
        out += "; or set the demo's `decode.gamma` (calibration.json lists every own block's score)"
    return out


def _finish(st: Stage) -> str:
    _evaluate(st)
    if st.preset.calibrates and st.calibration is None:
        st.calibration = calibrate(st, _batch, step_losses)
        if st.dist.is_main:
            cal = st.calibration
            st.ctx.log(
                f"calibrated on {cal['readiness']['n']} validation blocks: readiness γ = "
                f"{cal['readiness']['gamma']:.3f} (AUC {cal['readiness']['auc']:.3f}), coverage threshold "
                f"{cal['coverage']['threshold']:.3f} (F1 {cal['coverage']['f1']:.3f}, macro F1 "
                f"{cal['coverage']['macro_f1']:.3f}, AUC {_fmt(cal['coverage']['auc'])}; every item "
                f"covered would score F1 {cal['coverage']['f1_all_covered']:.3f})"
            )
            if (note := _gamma_capped_note(cal["readiness"], st.preset.readiness_max_rollback)) is not None:
                st.ctx.log(note, level="warning")
    _save(st, finished=True)
    if st.dist.is_main:
        _export(st)
    return "finished"


def _log_metrics(st: Stage, parts: dict[str, torch.Tensor], norm: torch.Tensor, tokens_per_s: float) -> None:
    reduced = {k: float(D.all_reduce_mean(v.reshape(()), st.dist)) for k, v in parts.items()}
    if not st.dist.is_main:
        return
    emit = st.ctx.emit
    for name, value in reduced.items():
        emit(Metric(name="train/loss" if name == "loss" else f"train/{name}", value=value, step=st.step))
    emit(Metric(name="grad_norm", value=float(norm), step=st.step))
    emit(Metric(name="lr", value=st.optimizer.param_groups[0]["lr"], step=st.step))
    emit(Metric(name="throughput/tokens_per_s", value=tokens_per_s, step=st.step))
    for layer, value in zip(st.model.layer_ids, st.model.gate_values(), strict=True):
        emit(Metric(name=f"gate/layer{layer}", value=value, step=st.step))
    st.history.append({"step": st.step, **reduced, "tokens_per_s": tokens_per_s})


def _evaluate(st: Stage) -> None:
    metrics = evaluate(st, _batch, step_losses)
    st.last_eval = metrics
    if st.dist.is_main:
        for name, value in metrics.items():
            if math.isfinite(value):
                st.ctx.emit(Metric(name=f"eval/{name}", value=value, step=st.step))
        st.history.append({"step": st.step, **{f"eval/{k}": v for k, v in metrics.items()}})


# --------------------------------------------------------------------------- save / export


def _state(st: Stage, finished: bool, cursors: list) -> dict[str, Any]:
    return {
        "step": st.step,
        "total_steps": st.total_steps,
        "tokens_seen": st.tokens,
        "stage": st.preset.stage,
        "finished": finished,
        "preset_name": st.preset.name,
        "preset_hash": preset_hash(st.preset),
        "preset": st.preset.model_dump(mode="json"),
        "tokenizer": st.tokenizer.identity(),
        "sidecar_meta": st.model.sidecar_meta(),
        "trained_groups": sorted(st.plan.groups),
        "started_from": st.started_from,
        "dataset": {"name": st.ds.name, "files": st.ds.manifest.get("files", {})},
        "calibration": st.calibration,
        "history": st.history[-2000:],
        "code_version": pdt.code_version(),
        "torch_version": torch.__version__,
        "world_size": st.dist.world_size,
        "data": cursors,
        "elapsed_s": st.elapsed_s,
    }


def _save(st: Stage, finished: bool) -> None:
    """Collective: each rank gives its data cursor; rank 0 writes sidecars (+ LoRA) and the optimiser."""
    cursors = D.gather_objects(st.order.state_dict(), st.dist)
    if st.dist.is_main and (st.step != st.last_saved_step or finished):
        tensors = {"sidecars": st.model.sidecar_state_dict()}
        if st.preset.lora is not None:
            from pdt.train.lora import lora_state_dict

            tensors["lora"] = lora_state_dict(st.model.trunk)
        path = st.ckpt.save(
            step=st.step,
            tensors=tensors,
            objects={"optimizer": st.optimizer.state_dict()},
            state=json.loads(json.dumps(_state(st, finished, cursors), default=str)),
        )
        st.ctx.emit(Checkpoint(step=st.step, slot="current", path=str(path)))
    st.last_saved_step = st.step
    st.last_save_time = time.monotonic()
    D.barrier(st.dist)


def _export(st: Stage) -> None:
    """checkpoints/<preset>/export: sidecars (+ LoRA) with their meta, the calibration, the report."""
    from pdt.infer.orchestrator import NOTE_TOKENS  # the demo's token budget for the item texts

    folder = st.ctx.checkpoints_dir / "export"
    if st.preset.checkpoint.export:
        st.model.save_sidecars(folder)
        if st.preset.lora is not None:
            from safetensors.torch import save_file

            from pdt.train.lora import lora_state_dict

            save_file(lora_state_dict(st.model.trunk), str(folder / "lora.safetensors"))
        (folder / "calibration.json").write_text(
            json.dumps(st.calibration, indent=2) + "\n", encoding="utf-8"
        )
        bus = st.preset.bus.model_dump(mode="json")
        training = {
            "stride": st.ds.stride,
            "bus": bus,
            "stage": st.preset.stage,
            "coverage_keys": COVERAGE_KEYS,
        }
        if st.preset.lora is not None:  # what the demo needs to rebuild the adapted trunk
            training["lora"] = st.preset.lora.model_dump(mode="json")
        (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n", encoding="utf-8")
        names = CD.plan_names(st.ds.splits["train"])
        (folder / PLAN_NAMES).write_text(json.dumps(names, indent=0, sort_keys=True) + "\n", encoding="utf-8")
        # and their embeddings as the calibration's answers used them, so the demo reads them rather
        # than running the trunk over a prompt's plan items before its first token (the CPU tiny
        # demo: ~8 ms of each answer's ~15 ms plan phase, 2026-12-07)
        texts, vectors = item_vectors(st, names)
        CD.write_item_vectors(folder / PLAN_VECTORS, texts, vectors, NOTE_TOKENS)
        st.ctx.log(f"exported the stage-{st.preset.stage} sidecars: {folder}")
    write_report(st, [st.ctx.run_dir / "report.json"] + ([folder / "report.json"] if folder.exists() else []))
