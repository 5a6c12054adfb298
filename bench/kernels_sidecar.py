"""Sidecar kernels: the fused Triton `snc_attend` / `row_adapter` against the PyTorch references.

For each op, shape and dtype: milliseconds per call of the reference and of the Triton path, for
the forward alone and for forward + backward (`torch.autograd.grad` of every differentiable
input), measured alternately in the same process (5 rounds, median) so drift hits both alike.
Two clocks: wall-clock per call with a sync only at the end of each round (at decode shapes the
ops are launch-bound, and the host-side cost of launching is what an eager decode step pays), and
GPU time per call from torch.profiler (what a training step pays when the GPU is the bottleneck).
Shapes: the 124M preset's sidecars (SNC width 192 = 4 heads × dh 48, notes window N = 97 at
1024 tokens, adapter D = 768, r = 64, K = 3) at 12 and 24 rows × 1024 tokens, the issue's
(N = 40, dh = 32), and a K = 3 decode step (T = 1, the window mask expanded over T).
Inputs are laid out as the sidecars pass them (q/k/v transposed views; bf16 activations with fp32
adapter weights, as under autocast).
Writes bench/results/kernels_sidecar.json (or $OUT/kernels_sidecar.json) with a `records` list;
prints a table last. `--sweep` instead times the Triton path's launch settings (module knobs such
as NUM_STAGES, FP32_DOT, block sizes) at the 124M training shape and writes kernels_sidecar_sweep.json.
Needs a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity  # noqa: E402

from pdt.kernels import reference  # noqa: E402

ROUNDS = 5
DEVICE = "cuda"
SNC_124M = (12, 4, 1024, 97, 48)  # R, H, T, N, dh: 12 rows, 4 heads × 48, N = 1 + 3·32 notes
ADAPTER_124M = (12, 1024, 768, 64, 3)  # R, T, D, r, K


def _per_call_ms(fn: Callable[[], Any], reps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps


def _gpu_ms(fn: Callable[[], Any], calls: int = 10) -> float:
    """GPU time per call: the sum of the device activity (kernels, copies) torch.profiler records.
    Wall-clock is what an eager, launch-bound step pays; GPU time is what a busy GPU pays."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return device_us / 1e3 / calls


def _compare(ref: Callable[[], Any], tri: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median ms per call of each over ROUNDS alternating rounds, after a warm-up (compiles)."""
    for fn in (ref, tri):
        for _ in range(3):
            fn()
    rounds = [(_per_call_ms(ref, reps), _per_call_ms(tri, reps)) for _ in range(ROUNDS)]
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def _snc_inputs(rows: int, heads: int, t: int, n: int, dh: int, dtype: torch.dtype) -> tuple:
    dev = DEVICE
    q = torch.randn(rows, t, heads, dh, device=dev, dtype=dtype).transpose(1, 2)  # [R, H, T, dh] view
    kv = torch.randn(rows, n, 2, heads, dh, device=dev, dtype=dtype)
    k, v = kv.permute(2, 0, 3, 1, 4)  # 2 × [R, H, N, dh] views, as the sidecar's projections give
    if t == 1:  # decode: one window per row, expanded over T (stride 0)
        mask = (torch.rand(rows, n, device=dev) < 0.7)[:, None].expand(rows, t, n)
    else:
        mask = torch.rand(rows, t, n, device=dev) < 0.5
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    return leaves, (mask,), torch.randn(rows, heads, t, dh, device=dev, dtype=dtype)


def _adapter_inputs(rows: int, t: int, d: int, r: int, k: int, dtype: torch.dtype) -> tuple:
    dev = DEVICE
    h = torch.randn(rows, t, d, device=dev, dtype=dtype)
    shapes, scales = [(k, d, r), (k, r), (k, r, d), (k, d)], [d**-0.5, 0.1, r**-0.5, 0.1]
    weights = [torch.randn(s, device=dev) * c for s, c in zip(shapes, scales, strict=True)]  # fp32 params
    leaves = [h.requires_grad_(), *(w.requires_grad_() for w in weights)]
    ids = torch.arange(rows, device=dev) % k
    return leaves, (ids,), torch.randn(rows, t, d, device=dev, dtype=dtype)


def _call(op: str, fn: Callable[..., torch.Tensor], leaves: list, extra: tuple) -> torch.Tensor:
    if op == "snc_attend":
        return fn(*leaves, *extra)  # q, k, v, mask
    return fn(leaves[0], *extra, *leaves[1:])  # h, ids, weights


def _ops(op: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    from pdt.kernels.row_adapter_triton import row_adapter_triton
    from pdt.kernels.snc_attend_triton import snc_attend_triton

    if op == "snc_attend":
        return reference.snc_attend, snc_attend_triton
    return reference.row_adapter, row_adapter_triton


def _passes(op: str, leaves: list, extra: tuple, grad: torch.Tensor, decode: bool) -> dict[str, tuple]:
    """{pass name: (reference callable, Triton callable)}. The forward runs as it does in use:
    without autograd at decode, with it (activations saved) in training."""
    ref_fn, tri_fn = _ops(op)

    def fwd(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad() if decode else contextlib.nullcontext():
                return _call(op, f, leaves, extra)

        return run

    def fwd_bwd(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(_call(op, f, leaves, extra), leaves, grad)

    return {"forward": (fwd(ref_fn), fwd(tri_fn)), "forward+backward": (fwd_bwd(ref_fn), fwd_bwd(tri_fn))}


def _measure(op: str, case: str, shape: dict, dtype: torch.dtype, make: Callable[[], tuple]) -> list[dict]:
    leaves, extra, grad = make()
    decode = shape.get("T") == 1
    ref_fn, tri_fn = _ops(op)
    with torch.no_grad():
        diff = (
            (_call(op, tri_fn, leaves, extra).float() - _call(op, ref_fn, leaves, extra).float()).abs().max()
        )
    common = {
        "device": torch.cuda.get_device_name(),
        "op": op,
        "case": case,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_diff_forward": float(diff),
        "forward_with_autograd": not decode,
    }
    records = []
    for name, (ref, tri) in _passes(op, leaves, extra, grad, decode).items():
        ref_ms, tri_ms = _compare(ref, tri, 200 if decode else 30)
        ref_gpu, tri_gpu = _gpu_ms(ref), _gpu_ms(tri)
        records.append(
            {
                **common,
                "pass": name,
                "reference_ms": ref_ms,
                "triton_ms": tri_ms,
                "speedup": ref_ms / tri_ms,
                "reference_gpu_ms": ref_gpu,
                "triton_gpu_ms": tri_gpu,
                "gpu_speedup": ref_gpu / tri_gpu if tri_gpu > 0 else float("nan"),
            }
        )
    return records


def _cases() -> list[tuple[str, str, dict, torch.dtype, Callable[[], tuple]]]:
    bf16, fp32 = torch.bfloat16, torch.float32
    snc = [
        ("train 124m, 12 rows", (12, 4, 1024, 97, 48), bf16),
        ("train 124m, 24 rows", (24, 4, 1024, 97, 48), bf16),
        ("train, issue shape", (12, 4, 1024, 40, 32), bf16),
        ("train 124m, fp32", (12, 4, 1024, 97, 48), fp32),
        ("decode K=3", (3, 4, 1, 25, 48), bf16),
    ]
    adapter = [
        ("train 124m, 12 rows", (12, 1024, 768, 64, 3), bf16),
        ("train 124m, 24 rows", (24, 1024, 768, 64, 3), bf16),
        ("train 124m, fp32", (12, 1024, 768, 64, 3), fp32),
        ("decode K=3", (3, 1, 768, 64, 3), bf16),
    ]
    cases = [
        (
            "snc_attend",
            name,
            dict(zip("R H T N dh".split(), s, strict=True)),
            dt,
            lambda s=s, dt=dt: _snc_inputs(*s, dt),
        )
        for name, s, dt in snc
    ]
    cases += [
        (
            "row_adapter",
            name,
            dict(zip("R T D r K".split(), s, strict=True)),
            dt,
            lambda s=s, dt=dt: _adapter_inputs(*s, dt),
        )
        for name, s, dt in adapter
    ]
    return cases


SWEEP = {
    # (op, dtype): list of {module attribute: value} settings of the Triton path to time.
    ("snc_attend", torch.bfloat16): [
        {"NUM_STAGES": st, "block_n": bn, "chunks": ch}
        for st in (1, 2, 3)
        for bn in (64, 128)
        for ch in (None, 1)
    ],
    ("snc_attend", torch.float32): [
        {"FP32_DOT": p, "NUM_STAGES": st} for p in ("ieee", "tf32x3") for st in (1, 2)
    ],
    ("row_adapter", torch.bfloat16): [
        {"BLOCK_T": bt, "NUM_WARPS": w, "NUM_STAGES": st}
        for bt, w in ((32, 4), (64, 4), (128, 4), (128, 8))
        for st in (2, 3)
    ],
    ("row_adapter", torch.float32): [
        {"FP32_DOT": p, "NUM_STAGES": st} for p in ("ieee", "tf32x3") for st in (1, 2)
    ],
}


def _time_setting(mod: Any, op: str, setting: dict, inputs: tuple, expect: torch.Tensor) -> dict:
    """Forward+backward of the Triton path under one setting: upper-case keys are module knobs
    (restored afterwards), lower-case ones keyword arguments of the op."""
    leaves, extra, grad = inputs
    knobs = {k: v for k, v in setting.items() if k.isupper()}
    saved = {k: getattr(mod, k) for k in knobs}
    fn = functools.partial(_ops(op)[1], **{k: v for k, v in setting.items() if not k.isupper()})
    try:
        for k, v in knobs.items():
            setattr(mod, k, v)
        with torch.no_grad():
            err = float((_call(op, fn, leaves, extra).float() - expect).abs().max())

        def run() -> Any:
            return torch.autograd.grad(_call(op, fn, leaves, extra), leaves, grad)

        run()  # compile outside the timing
        wall, gpu = _per_call_ms(run, 30), _gpu_ms(run)
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
    return {"op": op, "setting": setting, "fwd_bwd_ms": wall, "gpu_ms": gpu, "max_abs_diff_forward": err}


def _sweep() -> list[dict]:
    """Time the Triton path at the 124M training shape under each setting of SWEEP."""
    import pdt.kernels.row_adapter_triton as adapter_mod
    import pdt.kernels.snc_attend_triton as snc_mod

    results = []
    for (op, dtype), settings in SWEEP.items():
        snc = op == "snc_attend"
        inputs = _snc_inputs(*SNC_124M, dtype) if snc else _adapter_inputs(*ADAPTER_124M, dtype)
        with torch.no_grad():
            expect = _call(op, _ops(op)[0], inputs[0], inputs[1]).float()
        for setting in settings:
            rec = _time_setting(snc_mod if snc else adapter_mod, op, setting, inputs, expect)
            results.append({**rec, "dtype": str(dtype)})
            print(
                f"sweep {op:<12} {str(dtype):<15} {str(setting):<58} wall {rec['fwd_bwd_ms']:7.3f} ms"
                f"  gpu {rec['gpu_ms']:7.3f} ms  err {rec['max_abs_diff_forward']:.1e}"
            )
    return results


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_sidecar.py needs a CUDA GPU (the Triton kernels run there)")
    import triton

    torch.manual_seed(0)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if "--sweep" in sys.argv:
        (out_dir / "kernels_sidecar_sweep.json").write_text(json.dumps(_sweep(), indent=2))
        return
    fresh = [rec for case in _cases() for rec in _measure(*case)]
    versions = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    fresh = [{**rec, **versions} for rec in fresh]
    path = out_dir / "kernels_sidecar.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"records": []}
    records = [r for r in existing.get("records", []) if r.get("device") != fresh[0]["device"]] + fresh
    path.write_text(json.dumps({"records": records}, indent=2))
    _print_table(fresh)
    print(f"wrote {path} ({fresh[0]['device']})")


def _print_table(records: list[dict]) -> None:
    print(
        f"\n{'op':<12} {'case':<22} {'dtype':<9} {'pass':<17} {'ref ms':>8} {'triton ms':>10} {'speedup':>8}"
        f" {'ref GPU ms':>11} {'triton GPU ms':>14} {'GPU speedup':>12}"
    )
    for r in records:
        print(
            f"{r['op']:<12} {r['case']:<22} {r['dtype']:<9} {r['pass']:<17} "
            f"{r['reference_ms']:>8.3f} {r['triton_ms']:>10.3f} {r['speedup']:>7.2f}x"
            f" {r['reference_gpu_ms']:>11.3f} {r['triton_gpu_ms']:>14.3f} {r['gpu_speedup']:>11.2f}x"
        )


if __name__ == "__main__":
    main()
