"""Profile a training step and a K = 3 decode step (sidecars on and off) with torch.profiler.

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


def _profile(name: str, fn, gpu: bool, steps: int) -> None:  # noqa: ANN001
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for _ in range(3):
        fn()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(f"=== {name} ({steps} steps) ===")
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50))


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    model = so._model("pretrain_124m" if gpu else "pretrain_tiny", device)
    train_on, train_off = so._train_fns(model, 4 if gpu else 2, 1024 if gpu else 128, device, dtype)
    decode_on, decode_off, _ = so._decode_fns(model, device, dtype)
    for name, fn in (
        ("train, sidecars on", train_on),
        ("train, sidecars off", train_off),
        ("decode, sidecars on", decode_on),
        ("decode, sidecars off", decode_off),
    ):
        _profile(name, fn, gpu, 3)


if __name__ == "__main__":
    main()
