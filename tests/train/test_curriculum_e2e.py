"""End to end on the CPU through `python main.py`: the shipped `quickstart` pipeline —
dataset_tiny → pretrain_tiny → stage0…stage3 → demo_tiny.

The shipped presets, resolved and shrunk to a tiny budget (same names, so every cross-reference —
trunk.preset, dataset, init_from, sidecars.preset, the pipeline's list — resolves as in a user's
run), run as ONE unattended child process of the pipeline. Then the demo's manifest validates and
the stage-3 sidecars load strictly onto the exported trunk (SPEC §2b.10: a renamed argument
anywhere on this path fails here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pdt.infer.manifest import load_manifest
from pdt.model.pdt_model import PDTModel
from pdt.model.trunk import load_trunk
from pdt.presets import find_preset, load_preset_file
from pdt.presets.loader import SHIPPED_DIR
from pdt.telemetry.sinks import read_events
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
    "demo_tiny": {"decode": {"max_new_tokens": 12}},
    "quickstart": {},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return out


def test_quickstart_from_dataset_to_live_streams_then_the_sidecars_load(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    for name, over in OVERRIDES.items():
        data = _merge(find_preset(name, SHIPPED_DIR).model_dump(mode="json"), over)
        (presets / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    run_dir = tmp_path / "logs" / "quickstart"
    env = child_env(
        tmp_path, PDT_DATA_DIR=str(tmp_path / "data"), PDT_PRESETS_DIR=str(presets), PDT_RUN_DIR=str(run_dir)
    )
    proc = subprocess.run(
        [PYTHON, MAIN],
        env={**env, "PDT_PRESET": "quickstart"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr
    events = read_events(run_dir / "events.jsonl")
    answers = [e for e in events if e.kind == "answer"]
    assert len(answers) == 1 and answers[0].text.strip()
    tokens = [e for e in events if e.kind == "stream_token"]
    assert {e.stream for e in tokens} == {0, 1, 2}  # three streams wrote, live
    manifest = load_manifest(answers[0].manifest)  # validated against the schema
    assert manifest.preset == "demo_tiny" and len(manifest.streams) == 3
    assert manifest.timings["sequential"].new_tokens == manifest.timings["pdt"].new_tokens
    checkpoints = tmp_path / "checkpoints"
    stage3 = load_preset_file(presets / "stage3.json")
    export = checkpoints / "stage3" / "export"
    calibration = json.loads((export / "calibration.json").read_text())
    assert 0.0 <= calibration["readiness"]["gamma"] <= 1.0
    names = json.loads((export / "plan_items.json").read_text())
    assert manifest.plan["source"] == "planner" and manifest.plan["slot_ids"]
    for pid, label in zip(manifest.plan["item_ids"][0], manifest.plan["items"][0], strict=True):
        assert label == names.get(str(pid), f"plan id {pid}")  # the planner's ids shown as their texts
    assert len(names) > 100 and all(isinstance(t, str) and t for t in names.values())
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
