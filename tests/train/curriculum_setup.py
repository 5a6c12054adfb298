"""A tiny curriculum world for tests: a built dataset and an exported trunk under one folder.

Real parts only: the dataset is built by the real pipeline from bundled Wikipedia summaries, the
trunk is a real HF Llama built from a config and exported with the real exporter (not trained:
the curriculum only needs a frozen trunk). Presets are validated through the real loader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pdt.data.build.pipeline import run_dataset
from pdt.data.tokenizer import Tokenizer
from pdt.jobs import JobContext
from pdt.model.trunk import build_trunk, export_trunk
from pdt.presets.curriculum import CurriculumPreset
from pdt.presets.loader import validate_preset
from pdt.presets.schema import TrunkConfig

DATASET = {
    "name": "ds_curr",
    "kind": "dataset",
    "description": "test",
    "data": {"sources": [{"type": "wiki_vital", "limit": 80}]},
    "tokenizer": {"vocab_size": 1024},
    "num_streams": 3,
    "stride": 16,
    "validation_fraction": 0.15,
    "test_fraction": 0.05,
    "shard_size": 16,
}

SIDECARS = {"num_streams": 3, "n_layers": 2, "d_notes": 16, "adapter_rank": 8, "snc_heads": 2, "d_plan": 8}


def build_world(root: Path) -> dict[str, Path]:
    """data/ with dataset `ds_curr` built, and trunk/ (a 2-layer d=32 Llama with its tokenizer)."""
    data, trunk_dir = root / "data", root / "trunk"
    old = os.environ.get("PDT_DATA_DIR")
    os.environ["PDT_DATA_DIR"] = str(data)
    try:
        preset = validate_preset(dict(DATASET), source="test")
        status = run_dataset(
            JobContext(preset=preset, run_dir=root, checkpoints_dir=root, emit=lambda e: None)
        )
        assert status == "finished"
    finally:
        if old is None:
            os.environ.pop("PDT_DATA_DIR", None)
        else:
            os.environ["PDT_DATA_DIR"] = old
    tok = Tokenizer(vocab_size=1024)
    cfg = TrunkConfig(
        model_type="llama",
        config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    trunk = build_trunk(cfg, tok.vocab_size, 256, tok.eot_id, seed=0)
    export_trunk(trunk, tok, trunk_dir, {"preset": "test"})
    return {"data": data, "trunk": trunk_dir}


def stage_preset(stage: int, trunk_dir: Path, name: str | None = None, **over: Any) -> CurriculumPreset:
    data: dict[str, Any] = {
        "name": name or f"stage{stage}",
        "kind": "curriculum",
        "description": "test",
        "stage": stage,
        "trunk": {"path": str(trunk_dir)},
        "dataset": "ds_curr",
        "init_from": f"stage{stage - 1}" if stage > 0 else None,
        "sidecars": dict(SIDECARS, plan_vocab=16384),
        "train": {
            "steps": 3,
            "micro_batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 0,
            "log_every": 1,
            "eval_every": 100,
            "eval_batches": 1,
            "note_tokens": 32,
        },
        "checkpoint": {"every_steps": 100, "every_minutes": 100.0},
    }
    if stage == 4:
        data["lora"] = {"rank": 4}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    preset = validate_preset(data, source="test")
    assert isinstance(preset, CurriculumPreset)
    return preset
