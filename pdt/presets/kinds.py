"""The registry of preset kinds: `kind` in a preset's JSON → its schema class. A new kind adds one row."""

from __future__ import annotations

from pdt.presets.curriculum import CurriculumPreset
from pdt.presets.inference import InferencePreset, PipelinePreset
from pdt.presets.schema import DatasetPreset, PresetBase, PretrainPreset

PRESET_KINDS: dict[str, type[PresetBase]] = {
    "pretrain": PretrainPreset,
    "dataset": DatasetPreset,
    "curriculum": CurriculumPreset,
    "inference": InferencePreset,
    "pipeline": PipelinePreset,
}
