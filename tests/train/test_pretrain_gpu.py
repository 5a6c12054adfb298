"""The pretrain job on a CUDA GPU: bf16 autocast, fused AdamW, compile, MFU and GPU memory events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdt.jobs import run_job
from pdt.presets.loader import validate_preset
from pdt.telemetry.events import Event, Memory, Metric

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_run_learns_and_reports_gpu_figures(tmp_path: Path, compile_model: bool) -> None:
    data = json.loads((ROOT / "presets" / "pretrain_tiny.json").read_text())
    data["name"] = f"gpu_tiny_{int(compile_model)}"
    data["train"].update(
        {
            "token_budget": 60 * 128 * 16,
            "precision": "bf16",
            "compile": compile_model,
            "log_every": 1,
            "eval_every": 30,
            "sample_every": 60,
            "lr": 0.003,
        }
    )
    preset = validate_preset(data)
    seen: list[Event] = []
    assert run_job(preset, tmp_path / "run", console=False, extra_sinks=[seen.append]) == 0
    loss = [e.value for e in seen if isinstance(e, Metric) and e.name == "train/loss"]
    assert len(loss) == 60 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 1.0
    mfu = [e.value for e in seen if isinstance(e, Metric) and e.name == "throughput/mfu"]
    assert mfu and all(0.0 < m < 1.0 for m in mfu)
    memory = [e for e in seen if isinstance(e, Memory)]
    assert memory and memory[-1].gpu_peak_bytes > 0
