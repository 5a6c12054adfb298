"""Pretrain throughput: tokens/s, MFU and peak memory of the real training loop.

Runs the shipped presets through the ordinary job (`pdt.jobs.run_job`) for a short budget in a
scratch folder and reads the figures from the job's own events:
- CPU: `pretrain_tiny` as shipped;
- GPU: `pretrain_124m` as shipped, and `pretrain_tiny` with a GPU-sized micro-batch (the shipped
  one is sized for a laptop CPU).
MFU is against a dense bf16 matmul peak measured on the same GPU in the same run
(`pdt.telemetry.flops.matmul_peak_flops`). Steady state: the first `WARMUP_STEPS` logged
windows (compile, allocator warm-up) are dropped.

Writes bench/results/pretrain_throughput.json (or $OUT/pretrain_throughput.json when $OUT is set)
and prints a table last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pdt.jobs import run_job  # noqa: E402
from pdt.presets.loader import load_preset_file, validate_preset  # noqa: E402
from pdt.telemetry.events import Event, Metric  # noqa: E402
from pdt.telemetry.flops import matmul_peak_flops  # noqa: E402

WARMUP_STEPS = 5


def _variant(name: str, steps: int, workers: int | None = None, **train: Any) -> Any:
    preset = load_preset_file(ROOT / "presets" / f"{name}.json")
    data = preset.model_dump(mode="json")
    if workers is not None:
        data["data"]["num_workers"] = workers
    t = data["train"]
    t.update(train)
    per_step = t["seq_len"] * t["micro_batch_size"] * t["grad_accum"]
    t.update(
        {
            "token_budget": per_step * steps,
            "log_every": 1,
            "eval_every": 10**9,
            "sample_every": 10**9,
            "eval_batches": 1,
            "sample_tokens": 1,
        }
    )
    data["checkpoint"] = {"every_steps": 10**9, "every_minutes": 10**6, "export": False}
    return validate_preset(data, source=f"{name} (bench)")


def measure(label: str, preset: Any, device: str) -> dict[str, Any]:
    metrics: dict[str, list[float]] = {}

    def sink(event: Event) -> None:
        if isinstance(event, Metric):
            metrics.setdefault(event.name, []).append(event.value)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PDT_CHECKPOINTS_DIR"] = str(Path(tmp) / "ckpt")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        code = run_job(preset, Path(tmp) / "run", console=False, extra_sinks=[sink])
        wall = time.time() - start
    if code != 0:
        raise SystemExit(f"{label}: the job failed (exit {code})")
    tps = metrics.get("throughput/tokens_per_s", [])[WARMUP_STEPS:]
    mfu = metrics.get("throughput/mfu", [])[WARMUP_STEPS:]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        import psutil

        peak = psutil.Process().memory_info().rss
    return {
        "device": device,
        "preset": label,
        "tokens_per_s": statistics.median(tps) if tps else 0.0,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_bytes": int(peak),
        "steps_measured": len(tps),
        "wall_s": round(wall, 1),
        "seq_len": preset.train.seq_len,
        "micro_batch_size": preset.train.micro_batch_size,
        "grad_accum": preset.train.grad_accum,
        "precision": preset.train.precision,
        "compile": preset.train.compile,
    }


def main() -> None:
    records = []
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        peak = matmul_peak_flops("cuda:0")
        versions["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
        records.append(measure("pretrain_124m", _variant("pretrain_124m", 30), gpu))
        records.append(
            measure(
                "pretrain_tiny (micro_batch 256, bf16)",
                _variant(
                    "pretrain_tiny", 40, workers=4, micro_batch_size=256, precision="bf16", compile=True
                ),
                gpu,
            )
        )
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        records.append(measure("pretrain_tiny", _variant("pretrain_tiny", 30), "cpu"))
    for r in records:
        r.update(versions)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pretrain_throughput.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"records": []}
    keep = [r for r in existing.get("records", []) if r.get("device") not in {x["device"] for x in records}]
    path.write_text(json.dumps({"records": keep + records}, indent=2))
    print(f"\n{'device':<28} {'preset':<40} {'tokens/s':>12} {'MFU':>7} {'peak mem':>10}")
    for r in keep + records:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(
            f"{r['device']:<28} {r['preset']:<40} {r['tokens_per_s']:>12,.0f} {mfu:>7} "
            f"{r['peak_mem_bytes'] / 2**30:>8.2f}GiB"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
