"""The `inference` job: load the trunk and trained sidecars once, answer prompts, write manifests.

What it is: setup (the sidecars' export folder — a missing one names the curriculum preset to run
first —, the trunk they were trained on, the tokenizer, the calibrated γ and coverage threshold,
the training stride and bus settings as decode defaults), then per prompt: `decode_started`, the
PDT answer with its live events, the baselines (sequential / independent) on the same trunk and
sampler, `timing` per mode with the speedup against sequential, `memory` with the KV cache's
bytes, quality figures, the manifest `<run>/manifest-<n>.json` and `answer`. With
`PDT_INFER_SERVE=1` (set by the TUI) it then answers every prompt appended to the run's inbox
(`pdt.infer.inbox`) until stopped, with the model kept loaded.
What it is not: the decode protocol (`pdt.infer.orchestrator`) or the view (`pdt.tui`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import pdt
from pdt.bus import Counterfactual, CounterfactualError
from pdt.data.tokenizer import load_tokenizer
from pdt.infer import inbox
from pdt.infer.manifest import build_manifest, write_manifest
from pdt.infer.orchestrator import DecodeResult, DecodeSettings, ParallelDecoder, plain_trunk
from pdt.infer.quality import answer_nll, redundancy
from pdt.jobs import JobContext
from pdt.model.pdt_model import (
    COVERAGE_KEYS,
    PLAN_NAMES,
    PLAN_VECTORS,
    SIDECAR_META,
    PDTModel,
    trunk_identity,
)
from pdt.model.trunk import load_trunk
from pdt.presets.curriculum import CurriculumPreset, CurriculumTrunk
from pdt.presets.inference import InferencePreset
from pdt.presets.schema import BusConfig, SidecarConfig
from pdt.runs import checkpoints_root, data_root
from pdt.telemetry.events import Answer, DecodeStarted, Event, Log, Timing
from pdt.telemetry.memory import sample_memory

#: Written beside the exported sidecars by the curriculum: the stride and bus they were trained with
#: (and the LoRA settings of a stage-4 export).
TRAINING_FILE = "training.json"
LORA_FILE = "lora.safetensors"


class InferenceError(Exception):
    """The demo cannot start; the message says what to run or change."""


class Session:
    """A loaded model and its resolved settings; `answer(prompt)` runs one answer."""

    def __init__(self, ctx: JobContext, preset: InferencePreset) -> None:
        self.ctx, self.preset = ctx, preset
        self.device = _device(preset.device)
        self.folder = _sidecar_folder(preset)
        meta = json.loads((self.folder / SIDECAR_META).read_text(encoding="utf-8"))
        cfg = SidecarConfig(**meta["sidecar_config"])
        trunk_cfg, stage = _trunk_config(preset)
        trunk_dir = _trunk_folder(trunk_cfg)
        dtype = torch.bfloat16 if _wants_bf16(trunk_cfg, self.device) else torch.float32
        trunk = load_trunk(trunk_dir, dtype).to(self.device)
        self.tokenizer = load_tokenizer(trunk_dir)
        self.model = PDTModel(trunk, cfg)
        self.model.load_sidecars(self.folder)  # strict: another trunk / salt / vocab is refused
        self.model.to(device=self.device, dtype=dtype).eval()
        self.calibration = _read_json(self.folder / "calibration.json")
        names = _read_json(self.folder / PLAN_NAMES) or {}
        self.plan_names = {int(i): str(t) for i, t in names.items() if str(i).isdigit()}
        self.item_vectors = _item_vectors(ctx, self.folder, cfg.d_notes)
        self.training = _training_defaults(self.folder, stage)
        # Sidecars exported by stage 3 before the coverage head read plan items by their text
        # embedding say nothing of it: their head scores the plan-id embeddings it was trained on.
        # (Before stage 3 the head is untrained: the text keys cost nothing there.)
        stage_trained = int(self.training.get("stage", 3))
        self.coverage_text = self.training.get("coverage_keys") == COVERAGE_KEYS or stage_trained < 3
        if not self.coverage_text:
            ctx.log(
                f"{self.folder}: these sidecars were exported before the coverage head read plan "
                "items by their text, so coverage scores the plan-id embeddings they were trained "
                "on; run stage 3 again for the text keys (validation AUC 0.52 -> 0.84 on the tiny "
                "pipeline)"
            )
        self.lora = self._load_lora(stage)
        self.settings = self._settings(cfg)
        self.trunk_info = {**trunk_identity(trunk), "folder": str(trunk_dir), "dtype": str(dtype)}
        self.answers = 0
        self._parallel: ParallelDecoder | None = None
        ctx.log(
            f"loaded {trunk_dir} ({self.trunk_info['model_type']}, {dtype}) on {self.device} with the "
            f"sidecars of {self.folder}; K = {cfg.num_streams}, τ = {self.settings.tau}, "
            f"Δ = {self.settings.bus.lag}, γ = {self.settings.gamma:.3f}"
        )

    def _load_lora(self, stage: CurriculumPreset | None) -> bool:
        """A stage-4 export holds LoRA weights for the trunk: the streams decode with them, while the
        baselines and the NLL yardstick use the trunk as pretrained (LoRA off), as in training."""
        path = self.folder / LORA_FILE
        if not path.exists():
            return False
        from safetensors.torch import load_file

        from pdt.presets.curriculum import LoraSettings
        from pdt.train.lora import attach_lora, load_lora_state

        raw = self.training.get("lora") or (stage.lora.model_dump() if stage and stage.lora else None)
        if raw is None:
            raise InferenceError(
                f"{path} holds LoRA weights but neither {self.folder / TRAINING_FILE} nor a curriculum "
                "preset says their rank and targets: run the stage-4 preset again to rewrite its export"
            )
        for p in attach_lora(self.model.trunk, LoraSettings(**raw)):
            p.requires_grad_(False)
        load_lora_state(self.model.trunk, load_file(str(path)), str(path))
        self.model.to(device=self.device, dtype=next(self.model.trunk.parameters()).dtype)
        return True

    def _settings(self, cfg: SidecarConfig) -> DecodeSettings:
        d, p = self.preset.decode, self.preset
        trained_bus = BusConfig(**self.training.get("bus", {}))
        bus = BusConfig(
            lag=d.lag if d.lag is not None else trained_bus.lag,
            window=d.window if d.window is not None else trained_bus.window,
            topology=d.topology or trained_bus.topology,
        )
        readiness = (self.calibration or {}).get("readiness", {})
        coverage = (self.calibration or {}).get("coverage", {})
        cf = p.counterfactual
        try:
            counterfactual = Counterfactual(
                ablate=cf.ablate,
                freeze=cf.freeze,
                freeze_round=cf.freeze_round,
                swap=tuple(cf.swap) if cf.swap else None,
                stale={int(k): v for k, v in cf.stale.items()},
                shuffle=cf.shuffle,
            )
            counterfactual.validate(cfg.num_streams)
        except (CounterfactualError, ValueError) as exc:
            raise InferenceError(f"{p.name}: counterfactual: {exc}") from None
        if d.stream_prefixes is not None and len(d.stream_prefixes) != cfg.num_streams:
            raise InferenceError(
                f"{p.name}: decode.stream_prefixes has {len(d.stream_prefixes)} entries; the sidecars "
                f"write K = {cfg.num_streams} streams"
            )
        if p.plan_items is not None and len(p.plan_items) != cfg.num_streams:
            raise InferenceError(
                f"{p.name}: plan_items has {len(p.plan_items)} lists; "
                f"the sidecars write K = {cfg.num_streams} streams"
            )
        return DecodeSettings(
            num_streams=cfg.num_streams,
            tau=d.tau or int(self.training.get("stride", 32)),
            bus=bus,
            gamma=d.gamma if d.gamma is not None else float(readiness.get("gamma", 0.5)),
            coverage_threshold=(
                d.coverage_threshold
                if d.coverage_threshold is not None
                else float(coverage.get("threshold", 0.5))
            ),
            max_retries=d.max_retries,
            g=d.g,
            alpha=d.alpha,
            temperature=d.temperature,
            top_p=d.top_p,
            top_k=d.top_k,
            no_repeat_ngram=d.no_repeat_ngram,
            seed=d.seed,
            max_new_tokens=d.max_new_tokens,
            prefixes=tuple(d.stream_prefixes or ()),
            counterfactual=counterfactual,
            fast_path=d.fast_path,
            own_snapshot0=d.own_snapshot0,
        )

    def _decoder(self) -> ParallelDecoder:
        """One decoder for the session: a CUDA-graph engine keeps its buffers and captured graphs
        from answer to answer (the baselines share them; they run after the PDT answer)."""
        if self._parallel is None:
            self._parallel = ParallelDecoder(
                self.model,
                self.tokenizer,
                self.settings,
                plan_names=self.plan_names,
                coverage_text=self.coverage_text,
                item_vectors=self.item_vectors,
            )
        return self._parallel

    def answer(self, prompt: str) -> dict[str, Any]:
        """One answer: PDT live, then the baselines; returns the manifest as a dict."""
        index, s, model = self.answers, self.settings, self.model
        self.answers += 1
        events: list[dict[str, Any]] = []

        def emit(event: Event) -> None:
            self.ctx.emit(event)
            events.append(event.to_dict())

        plan_labels = self.preset.plan_items or [[] for _ in range(s.num_streams)]
        emit(
            DecodeStarted(
                answer=index,
                prompt=prompt,
                mode="pdt",
                k=s.num_streams,
                tau=s.tau,
                lag=s.bus.lag,
                gamma=s.gamma,
                g=s.g,
                alpha=s.alpha,
                max_new_tokens=s.max_new_tokens,
                layers=list(model.layer_ids),
                plan_items=plan_labels,
                stream_prefixes=[s.prefix(k) for k in range(s.num_streams)],
            )
        )
        decoder = self._decoder()
        if index == 0:
            emit(Log(level="info", message=f"decode-step engine: {decoder.engine_note}"))
        decoder.emit = emit
        _reset_peak(self.device)
        result = decoder.decode(prompt, "pdt", self.preset.plan_items, self.preset.seed_texts)
        mem = dataclasses.replace(sample_memory(), kv_cache_bytes=result.kv_cache_bytes)
        emit(mem)
        baselines: dict[str, DecodeResult] = {}
        decoder.emit = lambda _e: None  # baselines emit only their timing (below)
        for mode in self.preset.baselines:
            if self.ctx.stop_requested():
                break
            baselines[mode] = decoder.decode(  # sequential: the same number of tokens as PDT committed
                prompt,
                mode,
                self.preset.plan_items,
                self.preset.seed_texts,
                emit_tokens=False,
                total_tokens=max(1, result.new_tokens),
            )
        seq = baselines.get("sequential")
        for mode, res in [("pdt", result), *baselines.items()]:
            emit(
                Timing(
                    mode=mode,
                    tokens=res.new_tokens,
                    seconds=res.seconds,
                    tokens_per_s=res.new_tokens / res.seconds if res.seconds > 0 else 0.0,
                    steps=res.steps,
                    step_ms=1000.0 * sum(res.step_seconds) / max(1, res.steps),
                    speedup=seq.seconds / res.seconds if seq is not None and res.seconds > 0 else 0.0,
                    engine=res.engine,
                )
            )
        quality = self._quality(result, baselines)
        manifest = build_manifest(
            preset=self.preset.name,
            answer=index,
            result=result,
            baselines=baselines,
            config=s.as_dict(),
            trunk=self.trunk_info,
            sidecars={
                "folder": str(self.folder),
                "config": model.cfg.model_dump(mode="json"),
                "calibration": self.calibration or {},
            },
            tokenizer=self.tokenizer.identity(),
            memory={
                "kv_cache_bytes": result.kv_cache_bytes,
                "rss_bytes": mem.rss_bytes,
                "gpu_allocated_bytes": mem.gpu_allocated_bytes,
                "gpu_peak_bytes": mem.gpu_peak_bytes,
            },
            quality=quality,
            events=events,
            coverage_threshold=s.coverage_threshold,
            gate_layers=list(model.layer_ids),
            code_version=pdt.code_version(),
        )
        path = self.ctx.run_dir / f"manifest-{index}.json"
        done = Answer(answer=index, text=result.merged, sections=result.sections, manifest=str(path))
        events.append(done.to_dict())
        manifest.events = events  # the answer event too, so a replay ends like the live run
        write_manifest(manifest, path)  # before the event: whoever sees the answer can open it
        self.ctx.emit(done)
        return manifest.model_dump()

    def _quality(self, result: DecodeResult, baselines: dict[str, DecodeResult]) -> dict[str, float | None]:
        with plain_trunk(self.model.trunk):
            return self._quality_plain(result, baselines)

    def _quality_plain(
        self, result: DecodeResult, baselines: dict[str, DecodeResult]
    ) -> dict[str, float | None]:
        trunk = self.model.trunk
        out = {
            "redundancy_pdt": redundancy(result.sections),
            "nll_pdt": answer_nll(trunk, result.prompt_ids, result.merged_ids(self.tokenizer)),
        }
        for mode, res in baselines.items():
            if mode == "independent":
                out["redundancy_independent"] = redundancy(res.sections)
            out[f"nll_{mode}"] = answer_nll(trunk, res.prompt_ids, res.merged_ids(self.tokenizer))
        return {k: (None if math.isnan(v) else float(v)) for k, v in out.items()}


def run_inference(ctx: JobContext) -> str:
    preset = ctx.preset
    assert isinstance(preset, InferencePreset)
    if ctx.world_size > 1:
        raise InferenceError(
            f"{preset.name}: the demo runs in one process (its K streams are one batch); start it "
            "with `python main.py`, not torchrun"
        )
    session = Session(ctx, preset)
    session.answer(preset.prompt)
    if not inbox.serving():
        return "finished"
    box = inbox.Inbox(ctx.run_dir, from_start=True)
    ctx.log("ready for more prompts (type one in the prompt box; stop with s)")
    while not ctx.stop_requested():
        prompts = box.poll()
        for prompt in prompts:
            if ctx.stop_requested():
                break
            session.answer(prompt)
        if not prompts:
            time.sleep(0.2)
    return "finished"


# --------------------------------------------------------------------------- setup helpers


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InferenceError('device "cuda" was asked for but no CUDA GPU is visible; use "auto" or "cpu"')
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def _sidecar_folder(preset: InferencePreset) -> Path:
    src = preset.sidecars
    if src.preset is not None:
        folder = checkpoints_root() / src.preset / "export"
        if not (folder / SIDECAR_META).exists():
            raise InferenceError(
                f"{preset.name} needs the sidecars of curriculum preset {src.preset!r}, and {folder} does "
                f"not exist yet: run the preset {src.preset!r} to the end first (PDT_PRESET={src.preset} "
                "python main.py, or the quickstart from the home screen)"
            )
        return folder
    folder = Path(str(src.path)).expanduser()
    if not (folder / SIDECAR_META).exists():
        raise InferenceError(
            f"sidecars.path {folder} holds no {SIDECAR_META}: point it at a stage's export folder"
        )
    return folder


def _stage_preset(name: str) -> CurriculumPreset | None:
    from pdt.presets import PresetError, find_preset

    try:
        found = find_preset(name)
    except PresetError:
        return None
    return found if isinstance(found, CurriculumPreset) else None


def _trunk_config(preset: InferencePreset) -> tuple[CurriculumTrunk, CurriculumPreset | None]:
    stage = _stage_preset(preset.sidecars.preset) if preset.sidecars.preset else None
    if preset.trunk is not None:
        return preset.trunk, stage
    if stage is None:
        raise InferenceError(
            f'{preset.name}: say which trunk the sidecars run on — add "trunk": {{"preset": ...}} or '
            '{"path": ...} (it is taken from the curriculum preset only when sidecars.preset names one)'
        )
    return stage.trunk, stage


def _trunk_folder(trunk: CurriculumTrunk) -> Path:
    if trunk.path is not None:
        return Path(trunk.path).expanduser()
    folder = checkpoints_root() / str(trunk.preset) / "export"
    if not (folder / "config.json").exists():
        raise InferenceError(
            f"the trunk is pretrain preset {trunk.preset!r}'s export and {folder} does not exist: run "
            f"{trunk.preset!r} to the end first"
        )
    return folder


def _wants_bf16(trunk: CurriculumTrunk, device: torch.device) -> bool:
    return trunk.dtype == "bf16" or (trunk.dtype == "auto" and device.type == "cuda")


def _item_vectors(ctx: JobContext, folder: Path, d_notes: int) -> tuple[list[str], torch.Tensor] | None:
    """The export's plan-item embeddings, or None: sidecars exported before they were written, or a
    file that does not fit (a warning: the demo then embeds a plan's items when it first meets
    them, as before — slower, the same keys)."""
    from pdt.infer.orchestrator import NOTE_TOKENS
    from pdt.train.curriculum_data import read_item_vectors

    path = folder / PLAN_VECTORS
    if not path.exists():
        return None
    try:
        return read_item_vectors(path, d_notes, NOTE_TOKENS)
    except ValueError as exc:
        ctx.log(f"{exc}; the plan items are embedded as prompts name them instead", level="warning")
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise InferenceError(
            f"{path}: cannot read ({exc}); run the stage again to rewrite its export"
        ) from None


def _training_defaults(folder: Path, stage: CurriculumPreset | None) -> dict[str, Any]:
    """Stride and bus the sidecars were trained with: the export's training.json, else its preset."""
    saved = _read_json(folder / TRAINING_FILE)
    if saved is not None:
        return saved
    if stage is None:
        return {}
    stride = stage.stride
    if stride is None:
        manifest = _read_json(data_root() / "processed" / stage.dataset / "export" / "manifest.json")
        stride = int(manifest["stride"]) if manifest else None
    out: dict[str, Any] = {"bus": stage.bus.model_dump(mode="json")}
    if stride is not None:
        out["stride"] = stride
    return out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
