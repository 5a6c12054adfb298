"""The `pretrain` job: train a trunk from scratch on real text, always resuming, never losing work.

What it is: the training loop (AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast +
TF32 on GPU, optional torch.compile, DDP), periodic eval/samples/checkpoints as events, exact
resume from `checkpoints/<preset>/current` (weights, optimiser, RNG, per-rank data cursor), and
the final HF-folder export. What it is not: data reading (`pdt.data`), checkpoint storage
(`pdt.train.checkpoint`) or any view.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pdt
from pdt.data import build_tokenizer, check_identity, make_eval_batches, make_train_batches
from pdt.infer.sampling import generate
from pdt.jobs import JobContext
from pdt.model.trunk import build_trunk, count_parameters, export_trunk, flops_per_token, load_trunk, unwrap
from pdt.presets.loader import preset_hash
from pdt.presets.schema import PretrainPreset
from pdt.telemetry.events import Checkpoint, Metric, Progress, Sample
from pdt.telemetry.flops import matmul_peak_flops
from pdt.telemetry.memory import sample_memory
from pdt.train import distributed as D
from pdt.train import runtime as R
from pdt.train.checkpoint import CheckpointManager, LoadedCheckpoint
from pdt.train.optim import build_optimizer, lr_at, set_lr


class ResumeError(Exception):
    """The checkpoint on disk cannot continue this preset; the message says what to do."""


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE. inputs/targets [B, T]; the logits are upcast to fp32 for the softmax."""
    logits = model(input_ids=inputs, use_cache=False).logits  # [B, T, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))  # [B*T, V]


@dataclass
class Trainer:
    """Everything the loop mutates, in one place (so save/restore are easy to audit)."""

    ctx: JobContext
    preset: PretrainPreset
    dist: D.DistContext
    model: nn.Module  # possibly DDP/compiled; `raw` is the HF model
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    ckpt: CheckpointManager
    train_iter: Any
    eval_batches: list[torch.Tensor]
    autocast_dtype: torch.dtype | None
    total_steps: int
    tokens_per_step: int
    step: int = 0
    tokens: int = 0
    last_saved_step: int = -1
    last_save_time: float = field(default_factory=time.monotonic)
    flops_per_token: float = 0.0
    peak_flops: float = 0.0
    elapsed_s: float = 0.0
    # The forward + loss, compiled as one graph on GPU so the fp32 upcast and the softmax fuse.
    loss_fn: Any = next_token_loss


def run_pretrain(ctx: JobContext) -> str:
    """Train to the token budget (or until a stop is requested). Returns `finished` or `stopped`."""
    preset = ctx.preset
    assert isinstance(preset, PretrainPreset)
    trainer = _setup(ctx, preset)
    if trainer.step >= trainer.total_steps and (trainer.ckpt.current_state() or {}).get("finished"):
        ctx.log(
            f"{preset.name} already finished at step {trainer.step}; nothing to do. To train again, "
            f"move {ctx.checkpoints_dir} aside or raise train.token_budget."
        )
        return "finished"
    return _train(trainer)


# --------------------------------------------------------------------------- setup


def _setup(ctx: JobContext, preset: PretrainPreset) -> Trainer:
    dist = D.setup(preset.distributed.backend)
    cfg = preset.train
    if dist.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    trunk_path = preset.trunk.path if preset.trunk.source == "folder" else None
    tokenizer = build_tokenizer(preset.tokenizer, trunk_path)
    ckpt = CheckpointManager(ctx.checkpoints_dir, warn=lambda m: ctx.log(m, "warning"))
    loaded = R.load_latest(ckpt, dist)
    model = _make_model(preset, tokenizer, cfg.seq_len).to(dist.device)
    tokens_per_step = cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum * dist.world_size
    optimizer = build_optimizer(model, cfg, dist.device)
    data_state = _restore(ctx, loaded, model, optimizer, tokenizer, dist)
    train_iter, eval_batches = _make_data(ctx, preset, tokenizer, dist, data_state)
    trainer = Trainer(
        ctx,
        preset,
        dist,
        _wrap(model, dist),
        model,
        optimizer,
        tokenizer,
        ckpt,
        train_iter,
        eval_batches,
        R.autocast_dtype(preset.train.precision, dist.device),
        max(1, math.ceil(cfg.token_budget / tokens_per_step)),
        tokens_per_step,
    )
    if loaded is not None:
        trainer.step = int(loaded.state["step"])
        trainer.tokens = int(loaded.state.get("tokens_seen", 0))
        trainer.last_saved_step = trainer.step
        trainer.elapsed_s = float(loaded.state.get("elapsed_s", 0.0))
    if cfg.compile and dist.device.type == "cuda":
        trainer.loss_fn = torch.compile(next_token_loss)
    trainer.flops_per_token = flops_per_token(model, cfg.seq_len)
    if dist.device.type == "cuda":
        trainer.peak_flops = matmul_peak_flops(str(dist.device))
    _announce(trainer, loaded)
    return trainer


def _make_data(
    ctx: JobContext, preset: PretrainPreset, tokenizer: Any, dist: D.DistContext, data_state: dict | None
) -> tuple[Any, list[torch.Tensor]]:
    """This rank's training stream (resumed from its cursor) and its fixed validation batches."""
    cfg = preset.train
    warn = (lambda m: ctx.log(m, "warning")) if dist.is_main else None
    train_iter = make_train_batches(
        preset.data,
        tokenizer,
        cfg.seq_len,
        cfg.micro_batch_size,
        cfg.seed,
        dist.rank,
        dist.world_size,
        state=data_state,
        warn=warn,
    )
    eval_batches = list(
        make_eval_batches(
            preset.data,
            tokenizer,
            cfg.seq_len,
            cfg.micro_batch_size,
            cfg.eval_batches,
            dist.rank,
            dist.world_size,
        )
    )
    return train_iter, eval_batches


def _make_model(preset: PretrainPreset, tokenizer: Any, seq_len: int) -> nn.Module:
    if preset.trunk.source == "folder":
        return load_trunk(preset.trunk.path or "").float()
    return build_trunk(preset.trunk, tokenizer.vocab_size, seq_len, tokenizer.eot_id, preset.train.seed)


def _wrap(model: nn.Module, dist: D.DistContext) -> nn.Module:
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _restore(
    ctx: JobContext,
    loaded: LoadedCheckpoint | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    dist: D.DistContext,
) -> dict | None:
    """Load weights/optimizer/RNG; return this rank's data cursor (None: start of the stream)."""
    if loaded is None:
        return None
    state = loaded.state
    try:
        check_identity(state.get("tokenizer", {}), tokenizer)
    except Exception as exc:  # noqa: BLE001 - any identity mismatch is a resume refusal
        raise ResumeError(
            f"{loaded.path}: {exc}. The checkpoint was trained with another tokenizer; "
            f"move {ctx.checkpoints_dir} aside to start over, or restore the preset."
        ) from None
    try:
        model.load_state_dict(loaded.tensors["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ResumeError(
            f"{loaded.path} does not fit this preset's trunk ({str(exc).splitlines()[0]}); "
            f"move {ctx.checkpoints_dir} aside to start over, or restore trunk.config."
        ) from None
    optimizer.load_state_dict(loaded.objects["optimizer"])
    _set_rng(loaded.objects.get("rng", {}))
    if state.get("preset_hash") != preset_hash(ctx.preset):
        ctx.log(
            "the preset changed since this checkpoint was written; continuing with the new settings",
            "warning",
        )
    data_states = state.get("data") or []
    if len(data_states) != dist.world_size:
        ctx.log(
            f"the checkpoint was written by {len(data_states)} process(es), this run has "
            f"{dist.world_size}: the data order restarts from a fresh cursor",
            "warning",
        )
        return None
    return data_states[dist.rank]


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng(rng: dict[str, Any]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate((3, tuple(int(x) for x in rng["python"]), None))
    if "cuda" in rng and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(rng["cuda"])


def _announce(t: Trainer, loaded: LoadedCheckpoint | None) -> None:
    counts = count_parameters(t.raw)
    where = f"resuming from step {t.step} ({loaded.slot})" if loaded else "starting from scratch"
    t.ctx.log(
        f"{t.preset.name}: {counts['total'] / 1e6:.2f}M parameters "
        f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), tokenizer {t.tokenizer.name} "
        f"(V={t.tokenizer.vocab_size}), {t.total_steps} steps of {t.tokens_per_step:,} tokens on "
        f"{t.dist.world_size} x {t.dist.device.type}, "
        f"{'bf16 autocast' if t.autocast_dtype == torch.bfloat16 else 'fp32'}, {where}"
    )


# --------------------------------------------------------------------------- the loop


def _autocast(t: Trainer) -> contextlib.AbstractContextManager:
    return R.autocast(t.autocast_dtype, t.dist.device)


def _lm_loss(t: Trainer, block: torch.Tensor, train: bool = True) -> torch.Tensor:
    """Next-token CE over a [B, T+1] block: inputs block[:, :-1], targets block[:, 1:].

    Training goes through the (possibly DDP-wrapped, compiled) loss; evaluation uses the plain model.
    """
    block = block.to(t.dist.device, non_blocking=True)
    loss_fn, model = (t.loss_fn, t.model) if train else (next_token_loss, t.raw)
    with _autocast(t):
        return loss_fn(model, block[:, :-1], block[:, 1:])


def _train_step(t: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm) as tensors."""
    cfg = t.preset.train
    set_lr(t.optimizer, lr_at(t.step, t.total_steps, cfg))
    total = torch.zeros((), device=t.dist.device)
    for micro in range(cfg.grad_accum):
        block = next(t.train_iter)
        sync = micro == cfg.grad_accum - 1 or not t.dist.enabled
        ctx = contextlib.nullcontext() if sync else t.model.no_sync()  # type: ignore[operator]
        with ctx:
            loss = _lm_loss(t, block) / cfg.grad_accum
            loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(t.raw.parameters(), cfg.grad_clip)
    else:
        norm = torch.zeros((), device=t.dist.device)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return total, norm


def _train(t: Trainer) -> str:
    cfg = t.preset.train
    t.model.train()
    window_tokens, window_start, last_progress, last_memory = 0, time.monotonic(), 0.0, 0.0
    run_start = time.monotonic() - t.elapsed_s
    while t.step < t.total_steps:
        stop, save_due = D.agree_flags(
            t.dist,
            t.ctx.stop_requested(),
            R.save_due(t.step, t.last_saved_step, t.last_save_time, t.preset.checkpoint),
        )
        if stop:
            _save(t, finished=False)
            t.ctx.log(f"stopped at step {t.step}; run the preset again to resume")
            return "stopped"
        if save_due:
            _save(t, finished=False)
        data_before = t.train_iter.state_dict()
        try:
            loss, norm = _train_step(t)
        except torch.OutOfMemoryError:
            R.save_after_oom(
                t.dist,
                t.step,
                t.last_saved_step,
                t.optimizer,
                lambda before=data_before: _save(t, finished=False, data_state=before),
                t.ctx.log,
            )
            raise
        t.step += 1
        t.tokens += t.tokens_per_step
        window_tokens += t.tokens_per_step
        t.elapsed_s = time.monotonic() - run_start
        now = time.monotonic()
        if t.step % cfg.log_every == 0 or t.step == t.total_steps:
            _log_metrics(t, loss, norm, window_tokens / max(1e-9, now - window_start))
            window_tokens, window_start = 0, time.monotonic()
        if t.dist.is_main and (now - last_progress > 0.1 or t.step == t.total_steps):
            t.ctx.emit(Progress(step=t.step, total=t.total_steps, tokens=t.tokens, stage="pretrain"))
            last_progress = now
        if t.dist.is_main and now - last_memory > 10.0:
            t.ctx.emit(sample_memory())
            last_memory = now
        if t.step % cfg.eval_every == 0 and t.step < t.total_steps:
            _evaluate(t)
        if t.step % cfg.sample_every == 0 and t.step < t.total_steps:
            _samples(t)
    _evaluate(t)
    _samples(t)
    _save(t, finished=True)
    _export(t)
    return "finished"


def _log_metrics(t: Trainer, loss: torch.Tensor, norm: torch.Tensor, tokens_per_s: float) -> None:
    loss_v = float(D.all_reduce_mean(loss, t.dist))
    if not t.dist.is_main:
        return
    emit = t.ctx.emit
    emit(Metric(name="train/loss", value=loss_v, step=t.step))
    emit(Metric(name="grad_norm", value=float(norm), step=t.step))
    emit(Metric(name="lr", value=t.optimizer.param_groups[0]["lr"], step=t.step))
    emit(Metric(name="throughput/tokens_per_s", value=tokens_per_s, step=t.step))
    if t.peak_flops > 0:
        mfu = tokens_per_s * t.flops_per_token / (t.peak_flops * t.dist.world_size)
        emit(Metric(name="throughput/mfu", value=mfu, step=t.step))


@torch.no_grad()
def _evaluate(t: Trainer) -> None:
    if not t.eval_batches:
        return
    t.raw.eval()
    losses = [_lm_loss(t, b, train=False) for b in t.eval_batches]
    t.raw.train()
    mean = D.all_reduce_mean(torch.stack(losses).mean(), t.dist)
    if t.dist.is_main:
        value = float(mean)
        t.ctx.emit(Metric(name="eval/loss", value=value, step=t.step))
        t.ctx.emit(Metric(name="eval/ppl", value=math.exp(min(value, 50.0)), step=t.step))


def _samples(t: Trainer) -> None:
    if not t.dist.is_main:
        return
    cfg = t.preset.train
    for i, prompt in enumerate(cfg.sample_prompts):
        ids = t.tokenizer.encode(prompt)
        with _autocast(t):
            out = generate(
                t.raw,
                ids,
                cfg.sample_tokens,
                eot_id=t.tokenizer.eot_id,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                no_repeat_ngram=cfg.no_repeat_ngram,
                seed=cfg.seed + t.step * 1000 + i,
                device=t.dist.device,
            )
        t.ctx.emit(Sample(text=prompt + t.tokenizer.decode(out), step=t.step, prompt=prompt))


# --------------------------------------------------------------------------- save / export


def _save(t: Trainer, finished: bool, data_state: dict | None = None) -> None:
    """Collective: every rank contributes its data cursor; rank 0 writes; all wait for it."""
    own = data_state if data_state is not None else t.train_iter.state_dict()
    data_states = D.gather_objects(own, t.dist)
    if t.dist.is_main and (t.step != t.last_saved_step or finished):
        state = {
            "step": t.step,
            "total_steps": t.total_steps,
            "tokens_seen": t.tokens,
            "stage": "pretrain",
            "finished": finished,
            "preset_name": t.preset.name,
            "preset_hash": preset_hash(t.preset),
            "preset": t.preset.model_dump(mode="json"),
            "tokenizer": t.tokenizer.identity(),
            "trunk_config": unwrap(t.raw).config.to_dict(),
            "code_version": pdt.code_version(),
            "torch_version": torch.__version__,
            "world_size": t.dist.world_size,
            "data": data_states,
            "elapsed_s": t.elapsed_s,
        }
        raw_state = {k: v.detach() for k, v in unwrap(t.raw).state_dict().items()}
        objects = {"optimizer": t.optimizer.state_dict(), "rng": _rng_state()}
        path = t.ckpt.save(
            step=t.step,
            tensors={"model": raw_state},
            objects=objects,
            state=json.loads(json.dumps(state, default=str)),
        )
        t.ctx.emit(Checkpoint(step=t.step, slot="current", path=str(path)))
    t.last_saved_step = t.step
    t.last_save_time = time.monotonic()
    D.barrier(t.dist)


def _export(t: Trainer) -> None:
    if not (t.dist.is_main and t.preset.checkpoint.export):
        return
    folder = t.ctx.checkpoints_dir / "export"
    meta = {
        "preset": t.preset.name,
        "step": t.step,
        "tokens_seen": t.tokens,
        "tokenizer": t.tokenizer.identity(),
        "code_version": pdt.code_version(),
    }
    export_trunk(t.raw, t.tokenizer, folder, meta)
    t.ctx.log(f"exported the trunk as a Hugging Face folder: {folder}")
