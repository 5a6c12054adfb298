"""Profile one K = 3 decode step (sidecars on and off) with torch.profiler; prints the top ops.

A diagnostic companion of bench/sidecar_overhead.py: run it where a step is slower than expected.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sidecar_overhead as so  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    model = so._model("pretrain_124m" if gpu else "pretrain_tiny", device)
    on, off, _ = so._decode_fns(model, device, torch.bfloat16 if gpu else None)
    for _ in range(5):
        on()
        off()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for name, fn in (("on", on), ("off", off)):
        with profile(activities=activities) as prof:
            for _ in range(5):
                fn()
        key = "cuda_time_total" if gpu else "cpu_time_total"
        print(f"=== decode step, sidecars {name} (5 steps) ===")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )
        print(prof.key_averages().table(sort_by=key, row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
