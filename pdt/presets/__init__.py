"""Presets: JSON job descriptions, their schema and their loader (never code)."""

from pdt.presets.kinds import PRESET_KINDS
from pdt.presets.loader import (
    PresetError,
    PresetInfo,
    find_preset,
    list_presets,
    load_preset_file,
    preset_hash,
    preset_to_json,
    validate_preset,
)
from pdt.presets.schema import PresetBase, PretrainPreset

__all__ = [
    "PRESET_KINDS",
    "PresetBase",
    "PresetError",
    "PresetInfo",
    "PretrainPreset",
    "find_preset",
    "list_presets",
    "load_preset_file",
    "preset_hash",
    "preset_to_json",
    "validate_preset",
]
