"""The `inference` and `pipeline` preset kinds.

What it is: the schema of the live demo (SPEC §2 "Decode protocol"): which trunk and trained
sidecars, the prompt (plan items and seed texts optional), every decode knob (K, τ, Δ, W, γ, g, α,
sampling, budget, retries, topology, stream prefixes), the counterfactual controls and the
baselines run beside PDT; and the `pipeline` kind, a list of presets run in order (the
quickstart). Field docstrings are the help text of the TUI editor. What it is not: the decoder
(`pdt.infer`); nothing here touches a file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pdt.presets.curriculum import CurriculumTrunk
from pdt.presets.schema import PresetBase, StrictModel


class SidecarSource(StrictModel):
    """Trained sidecars: a curriculum preset's export, or a folder holding sidecars.safetensors."""

    preset: str | None = None
    """Name of a curriculum preset: its export `checkpoints/<preset>/export` is read."""
    path: str | None = None
    """A folder with sidecars.safetensors + sidecars.json (and calibration.json if calibrated)."""

    @model_validator(mode="after")
    def _check(self) -> SidecarSource:
        if (self.preset is None) == (self.path is None):
            raise ValueError('give exactly one of sidecars.preset (e.g. "stage3") and sidecars.path')
        return self


class CounterfactualConfig(StrictModel):
    """Research controls on the notes bus (SPEC §2): each alters what streams read, nothing else."""

    ablate: list[int] = Field(default_factory=list)
    """Streams whose window is empty (snapshot 0 included)."""
    freeze: list[int] = Field(default_factory=list)
    """Streams whose notes stop updating from `freeze_round` on."""
    freeze_round: int = Field(0, ge=0)
    """First round whose notes from a frozen stream are ignored."""
    swap: list[int] | None = Field(None, min_length=2, max_length=2)
    """Two streams whose note vectors are exchanged (their tags stay)."""
    stale: dict[str, int] = Field(default_factory=dict)
    """Stream → extra rounds of lag it reads with, e.g. {"1": 2}."""
    shuffle: int | None = None
    """Seed of a derangement of all streams' note vectors."""


class DecodeConfig(StrictModel):
    """The decode knobs. None means: the value the sidecars were trained or calibrated with."""

    tau: int | None = Field(None, ge=1)
    """τ: tokens per round (block); None: the training stride."""
    lag: int | None = Field(None, ge=0)
    """Δ: rounds before a committed note is visible to the other streams; None: as trained."""
    window: int | None = Field(None, ge=1)
    """W: notes kept per producer in a window; None: as trained."""
    topology: Literal["all_to_all", "triangular"] | None = None
    """Who reads whom; None: as trained."""
    gamma: float | None = Field(None, ge=0, le=1)
    """γ: commit a block when readiness ≥ γ; None: the calibrated γ (0.5 if not calibrated)."""
    coverage_threshold: float | None = Field(None, ge=0, le=1)
    """A plan item counts as covered at this probability; None: the calibrated one (else 0.5)."""
    max_retries: int = Field(2, ge=0)
    """Rollbacks of one block before it is committed anyway (recorded as forced)."""
    g: float = Field(1.0, ge=0)
    """External gate on notes cross-attention: 0 disables cross-stream influence."""
    alpha: float = Field(1.0, ge=0, le=1)
    """Blend of attended and base logits: 1 = attended only; < 1 runs the plain trunk beside (2× cost)."""
    temperature: float = Field(0.7, ge=0)
    """0: greedy."""
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0: off)."""
    no_repeat_ngram: int = Field(3, ge=0)
    """Ban tokens that would repeat an n-gram of the stream's own text (0: off)."""
    seed: int = 0
    """Sampling seed (each stream draws from its own generator seeded from it)."""
    max_new_tokens: int = Field(96, ge=1)
    """Token budget per stream (the sequential baseline gets K × this)."""
    stream_prefixes: list[str] | None = None
    """What each stream reads after the prompt before it writes; None: " Part n of K:" as trained."""
    own_snapshot0: bool = False
    """Each stream reads a snapshot 0 of its own plan — its given plan items, or the planner's slots
    j with j mod K = k (the order its targets are trained in) — instead of the whole plan's, which
    every stream reads as trained. A research option: it changes what the SNC was trained on."""
    fast_path: Literal["auto", "eager", "static", "cuda_graph"] = "auto"
    """Decode-step engine: eager runs the HF forward per token on its growing cache; static runs the
    same forward on K/V buffers allocated once (no per-token concatenation); cuda_graph captures the
    static step once and replays it (CUDA). static and cuda_graph: not with α < 1 or sliding-window
    trunks. auto (default): cuda_graph on CUDA, static on the CPU, eager where neither can run."""


class InferencePreset(PresetBase):
    """The live demo: K streams decode one prompt in parallel through the notes bus."""

    kind: Literal["inference"]
    sidecars: SidecarSource
    """The trained sidecars (normally the stage-3 preset)."""
    trunk: CurriculumTrunk | None = None
    """The frozen trunk; None: the one the sidecars' curriculum preset names."""
    prompt: str = Field(min_length=1)
    """The question; the TUI's prompt box asks further ones without reloading the model."""
    plan_items: list[list[str]] | None = None
    """Optional plan items per stream (what each must cover): the coverage items and snapshot 0's
    plan; None: the planner's own prediction."""
    seed_texts: list[str] | None = None
    """Optional texts embedded by the frozen trunk and mixed into snapshot 0 (SPEC §2 "Seeds")."""
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    """Decode knobs."""
    counterfactual: CounterfactualConfig = Field(default_factory=CounterfactualConfig)
    """Research controls on the bus (defaults change nothing)."""
    baselines: list[Literal["sequential", "independent"]] = Field(default_factory=lambda: ["sequential"])
    """Run beside PDT on the same trunk and sampling, for the speedup and redundancy figures."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available."""


class PipelinePreset(PresetBase):
    """Runs other presets in order, each resuming or skipping what is already done."""

    kind: Literal["pipeline"]
    presets: list[str] = Field(min_length=1)
    """Preset names, run in this order; a failure stops the pipeline with that preset's message."""
    featured: bool = False
    """Highlighted on the home screen (the quickstart)."""

    @model_validator(mode="after")
    def _check(self) -> PipelinePreset:
        if self.name in self.presets:
            raise ValueError(f"presets: a pipeline cannot run itself ({self.name!r})")
        return self
