"""End to end on the CPU through `python main.py`: dataset_tiny → pretrain_tiny → stage0…stage3.

The shipped presets, resolved and shrunk to a tiny budget (same names, so every cross-reference —
trunk.preset, dataset, init_from — resolves as in a user's run), each run as its own unattended
child process. Then the stage-3 sidecars load strictly onto the exported trunk (SPEC §2b.10: a
renamed argument anywhere on this path fails here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pdt.model.pdt_model import PDTModel
from pdt.model.trunk import load_trunk
from pdt.presets import find_preset, load_preset_file
from pdt.presets.loader import SHIPPED_DIR
from tests.conftest import MAIN, PYTHON, child_env

CURRICULUM = {
    "train": {
        "steps": 2,
        "micro_batch_size": 4,
        "eval_every": 100,
        "eval_batches": 1,
        "note_tokens": 32,
        "max_stream_tokens": 96,
    },
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "dataset_tiny": {"data": {"sources": [{"type": "wiki_vital", "limit": 60}]}},
    "pretrain_tiny": {
        "train": {"token_budget": 2 * 16 * 128, "eval_batches": 1, "sample_tokens": 4, "warmup_steps": 1},
    },
    "stage0": CURRICULUM,
    "stage1": CURRICULUM,
    "stage2": CURRICULUM,
    "stage3": {**CURRICULUM, "rollouts": {"every": 1, "rows": 2}},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return out


def test_dataset_pretrain_and_stages_0_to_3_then_the_sidecars_load(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    env = child_env(tmp_path, PDT_DATA_DIR=str(tmp_path / "data"))
    for name, over in OVERRIDES.items():
        data = _merge(find_preset(name, SHIPPED_DIR).model_dump(mode="json"), over)
        path = presets / f"{name}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        proc = subprocess.run(
            [PYTHON, MAIN],
            env={**env, "PDT_PRESET": str(path)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stdout + proc.stderr
    checkpoints = tmp_path / "checkpoints"
    stage3 = load_preset_file(presets / "stage3.json")
    export = checkpoints / "stage3" / "export"
    calibration = json.loads((export / "calibration.json").read_text())
    assert 0.0 <= calibration["readiness"]["gamma"] <= 1.0
    state = json.loads((checkpoints / "stage3" / "current" / "state.json").read_text())
    assert state["finished"] and state["started_from"]["preset"] == "stage2"
    model = PDTModel(load_trunk(checkpoints / "pretrain_tiny" / "export"), stage3.sidecars)
    before = {k: v.clone() for k, v in model.sidecar_state_dict().items()}
    model.load_sidecars(export)
    after = model.sidecar_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # trained values, not the init
    report = json.loads((export / "report.json").read_text())
    assert report["stage"] == 3 and report["steps"] == 2


@pytest.mark.parametrize("name", ["stage1", "stage4_lora"])
def test_a_stage_on_a_fresh_clone_says_which_preset_to_run_first(tmp_path: Path, name: str) -> None:
    """No trunk export yet: the message names the pretrain preset (the first missing piece)."""
    proc = subprocess.run(
        [PYTHON, MAIN],
        env={**child_env(tmp_path, PDT_DATA_DIR=str(tmp_path / "data")), "PDT_PRESET": name},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "run the preset 'pretrain_tiny' to the end first" in out
