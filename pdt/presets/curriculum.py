"""The `curriculum` preset kind: one training stage of the PDT sidecars on a frozen trunk.

What it is: the schema of a stage (SPEC §2 "Curriculum"): which trunk and dataset, which sidecar
groups train (stage defaults below), loss weights, bus settings, bus mixing and stream dropout,
the optimiser and budget, LoRA for stage 4, the stage-3 rollouts and the calibration of γ.
Field docstrings are the help text of the TUI editor. What it is not: the training loop
(`pdt.train.curriculum`); nothing here touches a file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pdt.presets.schema import (
    BusConfig,
    CheckpointConfig,
    DistributedConfig,
    OptimConfig,
    PresetBase,
    SidecarConfig,
    StrictModel,
)

#: The sidecar groups each stage trains (SPEC §2: each stage adds to the previous one).
STAGE_GROUPS: dict[int, tuple[str, ...]] = {
    0: ("planner", "notes"),
    1: ("planner", "notes", "adapters", "snc", "stream_classifier"),
    2: ("planner", "notes", "adapters", "snc", "stream_classifier", "speculation"),
    3: ("planner", "notes", "adapters", "snc", "stream_classifier", "speculation", "coverage", "agreement"),
    4: ("planner", "notes", "adapters", "snc", "stream_classifier", "speculation", "coverage", "agreement"),
}
SIDECAR_GROUPS = STAGE_GROUPS[3]


class CurriculumTrunk(StrictModel):
    """The frozen trunk: a pretrain preset's exported folder, or any local Hugging Face folder."""

    preset: str | None = None
    """Name of a pretrain preset: its export `checkpoints/<preset>/export` is the trunk."""
    path: str | None = None
    """A local Hugging Face model folder (config, safetensors weights, tokenizer). Never downloaded."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Weights in memory: auto = bf16 on a GPU, fp32 on CPU (the frozen trunk needs no fp32 master copy)."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumTrunk:
        if (self.preset is None) == (self.path is None):
            raise ValueError('give exactly one of trunk.preset (e.g. "pretrain_tiny") and trunk.path')
        return self


class LossWeights(StrictModel):
    """Weight of each loss in the total (a loss whose head does not train this stage is skipped)."""

    plan: float = Field(1.0, ge=0)
    """Plan CE: planner slots against the dataset's plan ids."""
    notes: float = Field(1.0, ge=0)
    """Notes: squared L2 between the notes head at each block end and the teacher note's embedding."""
    speculation: float = Field(0.5, ge=0)
    """Speculation: the same target for the speculation head (SPEC: × 0.5)."""
    lm: float = Field(1.0, ge=0)
    """Shifted LM CE on the stream's own section only."""
    kd: float = Field(0.5, ge=0)
    """KD: forward KL(p_trunk ‖ p_student) to the frozen trunk with sidecars off, on section tokens."""
    coverage: float = Field(1.0, ge=0)
    """Coverage BCE per plan item (covered 1, partial 0.5, missing 0); padding masked."""
    readiness: float = Field(1.0, ge=0)
    """Readiness BCE: real blocks vs the dataset's corrupted notes (and, in stage 3, own rollouts)."""
    stream: float = Field(0.1, ge=0)
    """Stream classifier CE (auxiliary: keeps the streams' states distinguishable)."""
    sibling_ul: float = Field(0.0, ge=0)
    """Sibling-repeat unlikelihood: −log(1 − p) of the name-like tokens the stream's siblings already
    wrote in rounds its notes window covers (and it does not write itself); rewards reading the bus.
    0 (off) by default; see `pdt.train.sibling_repeats`."""
    sibling_next: float = Field(0.0, ge=0)
    """Sibling-continuation unlikelihood: −log(1 − p) of each token a sibling wrote after the same two
    tokens, in rounds the window covers (what would repeat its 3-gram). 0 (off) by default."""
    sibling_rollout: float = Field(0.0, ge=0)
    """On-policy sibling unlikelihood (stage 3, with rollouts): −log(1 − p) of each token the model's
    own rollout blocks sampled that repeats a sibling's 3-gram in rounds the window covers; trains the
    SNC only (the bus's path: adapters and LoRA also run in `independent`). 0 (off) by default."""


class CurriculumTrain(OptimConfig):
    """Batch, budget and optimiser of a stage. Rows per micro-batch = micro_batch_size × K streams."""

    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward pass per process (each example gives K rows, one per stream)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps of this stage (give this or token_budget)."""
    token_budget: int | None = Field(None, ge=1)
    """Tokens (prompt + prefix + section, all rows) to train on; steps are estimated from the dataset."""
    max_stream_tokens: int = Field(512, ge=16)
    """Longer rows (prompt + prefix + section) are cut at the end of the section to this many tokens."""
    note_tokens: int = Field(128, ge=8)
    """Teacher note texts are embedded from their first N tokens."""
    kd_top_k: int = Field(32, ge=0)
    """KD against the frozen trunk's top-k distribution, cached once per dataset × trunk (no second
    trunk pass per step); 0: exact full-vocabulary KD with a live frozen-trunk pass every step."""
    log_every: int = Field(5, ge=1)
    """Emit train metrics every N steps."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on the validation split every N steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Validation micro-batches per evaluation."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    heads_lr_scale: float = Field(1.0, gt=0)
    """The coverage and agreement (readiness) heads' learning rate as a multiple of `lr`. They read
    detached block states, so their rate leaves the LM's path as it was (its gradients change only
    through the shared clipping norm). Tiny stage 3, 120 steps (2026-12-07): 3 gives readiness AUC
    0.784 and coverage AUC 0.845 against 0.723 and 0.800 at 1, LM CE 5.274 both; 10 gives 0.767."""
    gates_lr_scale: float = Field(1.0, gt=0)
    """The SNC and adapter gate logits' learning rate as a multiple of `lr`. Adam moves a parameter
    by about lr a step at most, so from its init of −4 a gate can open only so far in a short stage."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumTrain:
        if (self.steps is None) == (self.token_budget is None):
            raise ValueError("give exactly one of train.steps and train.token_budget")
        return self


class LoraSettings(StrictModel):
    """LoRA on the trunk's attention projections through `peft` (stage 4)."""

    rank: int = Field(16, ge=1)
    """r of the low-rank update."""
    alpha: float = Field(32.0, gt=0)
    """Scale: the update is (alpha / r) · B A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt; None: the architecture's attention projections (pdt.train.lora)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate of the LoRA weights; None: train.lr."""


class RolloutConfig(StrictModel):
    """Stage 3: readiness labels from the model's own sampled blocks (ownership / duplication events)."""

    every: int = Field(0, ge=0)
    """Sample rollouts every N steps (0: never)."""
    rows: int = Field(4, ge=1)
    """Streams rolled out each time."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollout blocks."""
    copy_share: float = Field(0.0, ge=0, le=1)
    """Share of the rollout blocks (training and evaluation) that write a sibling's opening tokens
    instead of sampling: a block that really repeats a sibling (labelled by the same rules), with the
    decoder's features — the model's own blocks rarely do (`rollout_violation_rate`), so without
    these the rollout examples hold no duplicate. Scored apart: `readiness_auc_copies`."""
    eval_rows: int = Field(16, ge=0)
    """Blocks rolled out per validation batch at each evaluation and for the calibration (0: none;
    only when `every` > 0): the report's `readiness_auc_rollouts` — the head scored on the model's own
    blocks, sampled against teacher windows."""
    calibration_prompts: int = Field(10, ge=0)
    """Validation prompts the decoder itself answers at the calibration (γ = 0, the demo's sampling):
    γ is capped on the readiness of those blocks, which read the model's own notes as at decode
    (0: capped on the rollout blocks instead; only when `every` > 0)."""
    calibration_tokens: int = Field(128, ge=1)
    """Tokens each stream writes in those answers (the demo's `decode.max_new_tokens`)."""


class CurriculumPreset(PresetBase):
    """One stage of the sidecar curriculum (SPEC §2) on a frozen trunk."""

    kind: Literal["curriculum"]
    stage: int = Field(ge=0, le=4)
    """0 planner + notes; 1 + adapters, SNC, stream classifier; 2 + speculation; 3 + coverage and
    agreement (bus mixing, stream dropout); 4 LoRA on the trunk (peft) on top of stage 3."""
    trunk: CurriculumTrunk
    """The frozen trunk."""
    dataset: str
    """Name of a dataset preset; its export (data/processed/<name>/export) is read."""
    init_from: str | None = None
    """The previous stage's preset: its `current` checkpoint is where this stage starts."""
    groups: list[str] | None = None
    """Sidecar groups to train; None: the stage's defaults."""
    sidecars: SidecarConfig = Field(default_factory=SidecarConfig)
    """Sidecar sizes (must equal the previous stage's)."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """Δ, W and topology of the notes bus in teacher forcing (as at inference)."""
    stride: int | None = Field(None, ge=1)
    """B: round length in tokens; None: the dataset's (its teacher snapshots are cut at that stride)."""
    losses: LossWeights = Field(default_factory=LossWeights)
    """Loss weights."""
    bus_mix_prob: float = Field(0.0, ge=0, le=1)
    """Share of teacher notes replaced by the model's own speculation notes (stage 2 on)."""
    plan_mix_prob: float = Field(0.0, ge=0, le=1)
    """Share of examples whose snapshot 0 is the planner's own plan (each slot's argmax, as the
    decoder reads it) instead of the teacher's: the SNC then learns from the snapshot 0 it meets at
    inference (a planner that cannot yet predict a prompt's items gives one unlike the teacher's)."""
    stream_dropout_prob: float = Field(0.0, ge=0, lt=1)
    """Probability that a stream's notes are all withheld from the bus for an example."""
    train: CurriculumTrain = Field(default_factory=lambda: CurriculumTrain(steps=100))
    """Batch, budget and optimiser."""
    lora: LoraSettings | None = None
    """LoRA on the trunk (stage 4 only)."""
    rollouts: RolloutConfig = Field(default_factory=RolloutConfig)
    """Own-rollout readiness labels (stage 3 on)."""
    calibrate: bool | None = None
    """Choose γ (readiness) and the coverage threshold on the validation split at the end; None: stage ≥ 3."""
    readiness_min_tpr: float = Field(0.9, ge=0, le=1)
    """γ commits at least this share of the validation's good blocks (then max Youden J): a rollback
    re-decodes a block, so a weak head must not roll back most good ones. 0: plain Youden."""
    readiness_max_rollback: float = Field(0.01, ge=0, le=1)
    """Then γ rolls back at most this share of the model's own validation rollouts that have no
    violation event (where the stage has rollouts). 1: no cap. Such a rollback only costs: a block
    again, and the whole answer one more round when it is the last stream to finish — at K = 3 and 4
    blocks a stream, a share p of blocks rolled back delays ~12·p of the answers by a quarter."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence; `export` writes the final sidecars to checkpoints/<preset>/export."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process settings."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumPreset:
        unknown = sorted(set(self.groups or ()) - set(SIDECAR_GROUPS))
        if unknown:
            raise ValueError(f"groups: unknown {unknown}; groups are {', '.join(SIDECAR_GROUPS)}")
        if self.groups is not None and not self.groups and self.stage < 4:
            raise ValueError("groups is empty: nothing would train (stage 4 may train LoRA alone)")
        if self.stage == 4 and self.lora is None:
            raise ValueError('stage 4 trains LoRA on the trunk: add "lora": {} (or set stage to 0–3)')
        if self.lora is not None and self.stage != 4:
            raise ValueError(f"lora is for stage 4; this is stage {self.stage}")
        if self.bus_mix_prob > 0 and "speculation" not in self.trained_groups:
            raise ValueError("bus_mix_prob needs the speculation head to train (stage 2 on)")
        if self.plan_mix_prob > 0 and "snc" not in self.trained_groups:
            raise ValueError("plan_mix_prob changes what the SNC reads: it needs the SNC to train (stage 1+)")
        if self.rollouts.every and "agreement" not in self.trained_groups:
            raise ValueError("rollouts label readiness: they need the agreement head to train (stage 3 on)")
        if self.losses.sibling_rollout > 0 and not self.rollouts.every:
            raise ValueError(
                "losses.sibling_rollout scores the model's own rollout blocks: set rollouts.every > 0"
                " (stage 3)"
            )
        if self.losses.sibling_rollout > 0 and "snc" not in self.trained_groups:
            raise ValueError("losses.sibling_rollout trains the SNC only: it needs the SNC to train")
        if self.init_from == self.name:
            raise ValueError("init_from names this preset itself; name the previous stage's preset")
        return self

    @property
    def trained_groups(self) -> tuple[str, ...]:
        return tuple(self.groups) if self.groups is not None else STAGE_GROUPS[self.stage]

    @property
    def calibrates(self) -> bool:
        return self.calibrate if self.calibrate is not None else self.stage >= 3
