"""Decode-step parts on the GPU, each timed inside a CUDA graph as the decode engine replays it.

What it measures, at the 124M preset's decode shape (3 rows × 1 token, D 768, bf16):
- the LM head for 3 rows against 1 row, written several ways (`F.linear` as the trunk calls it,
  the transposed product, rows padded to 8 / 16, `pdt.kernels.skinny_linear`): which kernel a
  [3, 768] × [768, 50257] product gets decides ~30 µs of a ~2 ms step (bench/profile_gpu.py,
  2026-12-06);
- `skinny_linear` at 3 rows over its launch settings (module knobs);
- the trunk's own linear layers (124M llama: q/k/v/o 768 → 768, gate/up 768 → 2048, down 2048 →
  768) at 1 and 3 rows, `F.linear` against `skinny_linear`: a K = 3 step costs ~0.19 ms more than
  the sequential one (H100, 2026-12-07: 1.925 vs 1.735 ms), of which the sidecar kernels are ~0.09;
  these 84 products are where the rest may go;
- `snc_folded` (the SNC layer of a decode round) and the row adapter's decode kernels over their
  launch settings (module knobs), each against the reference of the same call for correctness.
Per variant: 50 calls captured in one graph, replayed 20 times; microseconds per call (median of 5).
PDT_PARTS=lm_head,skinny,linears,snc,adapter picks parts (default all).
Writes $OUT/decode_parts.json (else bench/results/decode_parts.json); a table last. Needs CUDA.
"""

from __future__ import annotations

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
import torch.nn.functional as F  # noqa: E402

from pdt.kernels import reference  # noqa: E402
from pdt.model.graph_decode import capture_graph  # noqa: E402

CALLS, REPLAYS = 50, 20


def graph_us(fn: Callable[[], Any]) -> float:
    """Microseconds per call of `fn` inside a CUDA graph of CALLS calls (median of 5 timings)."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(CALLS)], warmup=1)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6 / (REPLAYS * CALLS))
    return statistics.median(times)


def lm_head_variants() -> list[dict[str, Any]]:
    from pdt.kernels.skinny_linear_triton import skinny_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(50257, 768, device="cuda", generator=gen).bfloat16() * 0.02
    h3 = torch.randn(3, 768, device="cuda", generator=gen).bfloat16()
    expect = F.linear(h3, w)
    pads = {n: torch.zeros(n, 768, device="cuda", dtype=torch.bfloat16) for n in (8, 16)}
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "F.linear rows=1": lambda: F.linear(h3[:1], w),
        "F.linear rows=3": lambda: F.linear(h3, w),
        "mm(W, hT).T rows=3": lambda: torch.mm(w, h3.t()).t(),
        "F.linear rows=3 padded to 8": lambda: F.linear(
            pads[8].index_copy_(0, torch.arange(3, device="cuda"), h3), w
        )[:3],
        "F.linear rows=3 padded to 16": lambda: F.linear(
            pads[16].index_copy_(0, torch.arange(3, device="cuda"), h3), w
        )[:3],
        "3 x F.linear rows=1": lambda: torch.cat([F.linear(h3[i : i + 1], w) for i in range(3)]),
        "skinny_linear rows=1": lambda: skinny_linear_triton(h3[:1], w),
        "skinny_linear rows=3": lambda: skinny_linear_triton(h3, w),
    }
    out = []
    for name, fn in variants.items():
        got = fn()
        err = None if got.shape[0] != 3 else float((got.float() - expect.float()).abs().max())
        out.append({"part": "lm_head", "variant": name, "us": graph_us(fn), "max_abs_diff_vs_linear": err})
    return out


def trunk_linear_variants() -> list[dict[str, Any]]:
    """Each trunk linear shape at 1 and 3 rows: cuBLAS (`F.linear`) against `skinny_linear` at
    several output-block widths."""
    from pdt.kernels import skinny_linear_triton as mod
    from pdt.kernels.skinny_linear_triton import skinny_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for name, (n_out, n_in) in {
        "qkvo 768x768": (768, 768),
        "gate/up 2048x768": (2048, 768),
        "down 768x2048": (768, 2048),
    }.items():
        w = torch.randn(n_out, n_in, device="cuda", generator=gen).bfloat16() * 0.02
        x = torch.randn(3, n_in, device="cuda", generator=gen).bfloat16()
        for rows in (1, 3):
            h = x[:rows]
            expect = F.linear(h, w)
            variants = [("F.linear", {}, lambda h=h, w=w: F.linear(h, w))]
            # BLOCK_V 64 gives a 768-wide output only 12 programs: narrower blocks spread the read
            for block_v in (16, 32, 64):
                variants.append(
                    (
                        f"skinny_linear BLOCK_V={block_v}",
                        {"BLOCK_V": block_v},
                        lambda h=h, w=w: skinny_linear_triton(h, w),
                    )
                )
            for kind, setting, fn in variants:
                err = float(_with(mod, setting, fn).float().sub(expect.float()).abs().max())
                us = _with(mod, setting, lambda fn=fn: graph_us(fn))
                out.append(
                    {
                        "part": "linears",
                        "variant": f"{name} {kind} rows={rows}",
                        "us": us,
                        "max_abs_diff_vs_linear": err,
                    }
                )
    return out


def _with(module: Any, setting: dict[str, Any], fn: Callable[[], Any]) -> Any:
    old = {k: getattr(module, k) for k in setting}
    try:
        for k, v in setting.items():
            setattr(module, k, v)
        return fn()
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def snc_variants() -> list[dict[str, Any]]:
    from pdt.kernels import snc_folded_triton as mod

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, d, heads, n = 3, 768, 4, 25
    base = torch.randn(rows, 1, d, device="cuda", generator=gen).bfloat16()
    hidden = (torch.randn(rows, 1, d, device="cuda", generator=gen) * 8).bfloat16()
    keys = (torch.randn(rows, d, heads * n, device="cuda", generator=gen) * 0.02).bfloat16()
    values = torch.randn(rows, heads * n, d, device="cuda", generator=gen).bfloat16()
    bias = torch.zeros(rows, 1, heads * n, device="cuda", dtype=torch.bfloat16)
    args = (base, hidden, keys, values, bias, heads, 1e-6)
    truth = reference.snc_folded(*[a.float() if torch.is_tensor(a) else a for a in args])
    out = []
    for block_d in (128, 256, 1024):
        for block_n, block_o in ((32, 128), (64, 64), (128, 64), (128, 128), (32, 256)):
            setting = {"BLOCK_D": block_d, "BLOCK_N": block_n, "BLOCK_O": block_o}

            def run() -> torch.Tensor:
                return mod.snc_folded_triton(*args)

            got = _with(mod, setting, run)
            err = float((got.float() - truth).abs().max())
            us = _with(mod, setting, lambda: graph_us(run))
            out.append({"part": "snc_folded", "variant": str(setting), "us": us, "max_abs_err": err})
    return out


def skinny_variants() -> list[dict[str, Any]]:
    """`skinny_linear` at 3 rows over its launch settings (the 124M head, bf16)."""
    from pdt.kernels import skinny_linear_triton as mod

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(50257, 768, device="cuda", generator=gen).bfloat16() * 0.02
    h3 = torch.randn(3, 768, device="cuda", generator=gen).bfloat16()
    truth = F.linear(h3.float(), w.float())
    out = []
    for block_v in (32, 64, 128):
        for block_d in (64, 128, 256):
            for warps, stages in ((4, 3), (4, 4), (8, 4)):
                setting = {"BLOCK_V": block_v, "BLOCK_D": block_d, "NUM_WARPS": warps, "NUM_STAGES": stages}

                def run() -> torch.Tensor:
                    return mod.skinny_linear_triton(h3, w)

                err = float((_with(mod, setting, run).float() - truth).abs().max())
                us = _with(mod, setting, lambda: graph_us(run))
                out.append({"part": "skinny_linear", "variant": str(setting), "us": us, "max_abs_err": err})
    return out


def adapter_variants() -> list[dict[str, Any]]:
    from pdt.kernels import row_adapter_triton as mod

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, d, r, k = 3, 768, 64, 3
    h = torch.randn(rows, 1, d, device="cuda", generator=gen).bfloat16()
    ids = torch.arange(rows, device="cuda")
    weights = [
        (torch.randn(s, device="cuda", generator=gen) * c).bfloat16()
        for s, c in zip([(k, d, r), (k, r), (k, r, d), (k, d)], [d**-0.5, 0.1, r**-0.5, 0.1], strict=True)
    ]
    gate = torch.zeros(k, device="cuda")
    kw = {"gate": gate, "residual": True}
    truth = reference.row_adapter(h.float(), ids, *[w.float() for w in weights], **kw)
    out = []
    settings = [{"DECODE_T": 0}]  # the token-block kernel (one program a row)
    settings += [
        {"DECODE_SPLIT": split, "DECODE_BLOCK_O": block_o}
        for split in (3, 6, 12)
        for block_o in (64, 128, 256)
    ]
    for setting in settings:

        def run() -> torch.Tensor:
            with torch.no_grad():
                return mod.row_adapter_triton(h, ids, *weights, **kw)

        got = _with(mod, setting, run)
        err = float((got.float() - truth).abs().max())
        us = _with(mod, setting, lambda: graph_us(run))
        out.append({"part": "row_adapter", "variant": str(setting), "us": us, "max_abs_err": err})
    return out


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("decode_parts.py needs a CUDA GPU")
    records = []
    parts = {
        "lm_head": lm_head_variants,
        "skinny": skinny_variants,
        "linears": trunk_linear_variants,
        "snc": snc_variants,
        "adapter": adapter_variants,
    }
    only = os.environ.get("PDT_PARTS")  # e.g. "lm_head,skinny"
    for part in (parts[name] for name in (only.split(",") if only else parts)):
        for rec in part():
            rec["device"] = torch.cuda.get_device_name()
            records.append(rec)
            print(f"{rec['part']:<12} {rec['variant']:<60} {rec['us']:8.2f} us", flush=True)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "torch": torch.__version__, "calls_per_graph": CALLS}
    (out_dir / "decode_parts.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"wrote {out_dir / 'decode_parts.json'}")


if __name__ == "__main__":
    main()
