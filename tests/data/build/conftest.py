"""Fixtures for the dataset build: a tiny dataset preset on a few bundled wiki summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdt.presets.loader import validate_preset
from pdt.presets.schema import DatasetPreset

TINY: dict[str, Any] = {
    "name": "ds_test",
    "kind": "dataset",
    "description": "test",
    "data": {"sources": [{"type": "wiki_vital", "limit": 60}]},
    "tokenizer": {"vocab_size": 1024},
    "num_streams": 3,
    "stride": 16,
    "validation_fraction": 0.1,
    "test_fraction": 0.1,
    "shard_size": 8,
}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def tiny_preset() -> DatasetPreset:
    preset = validate_preset(dict(TINY), source="test")
    assert isinstance(preset, DatasetPreset)
    return preset
