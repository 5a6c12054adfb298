"""Where the time goes (GPU): a breakdown for the two ratios the issues set goals on.

1. Decode (`PDT_BENCH_TRUNK=random`-style trunk: the pretrain_124m shape, random weights, untrained
   sidecars, γ = 0): for K = 1 and 3 on the `cuda_graph` engine, the mean wall time of a decode step
   per mode (PDT, independent, sequential; the orchestrator's own step timer), of one bare replay of
   each captured graph (GPU time of the step alone), and of the sampler on the step's logits;
   `PDT_PROFILE_KERNELS=1` lists the kernels inside each graph, `PDT_PROFILE_HOST=1` the host-side
   calls (runtime API, ATen ops) per decode step of PDT and sequential.
2. Curriculum (the curriculum_throughput setup: pretrain_124m shape, dataset_wiki rows, stage3_124m):
   the stage-3 step and the plain step split into forward, backward and optimizer (synchronised
   wall times), then the top CUDA kernels of each by self time (torch.profiler).
On a CPU it runs as a smoke test of itself (tiny shapes, no graphs).

Prints everything and writes $OUT/profile_gpu.json (or bench/results/profile_gpu.json).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the script


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _ms(fn: Any, reps: int) -> float:
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _kernel_table(fn: Any, reps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync()
    averages = prof.key_averages()
    total = sum(e.self_device_time_total for e in averages)
    count = sum(e.count for e in averages)
    table = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
    return f"{count / reps:.0f} kernels, {total / reps / 1000:.3f} ms of kernel time per replay\n{table}"


def _host_table(decode: Any) -> str:
    """One decode under torch.profiler (CPU + CUDA activity): the host-side calls (CUDA runtime API:
    launches, copies, syncs, graph launches) and ATen ops per decode step, by count — what a step
    does on the host around its graph replay."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = decode()
    steps = max(1, res.steps)
    rows = sorted(prof.key_averages(), key=lambda e: -e.count)
    lines = [f"{res.steps} steps; calls per step (count, host µs per step):"]
    for e in rows[:40]:
        lines.append(f"  {e.key[:70]:<70} {e.count / steps:8.2f} {e.self_cpu_time_total / steps:9.1f}")
    return "\n".join(lines)


def decode_profile() -> dict[str, Any]:
    import decode_speedup as ds

    from pdt.infer.orchestrator import ParallelDecoder
    from pdt.infer.sampling import sample_rows

    device = DEVICE
    session = ds._random_session(device)
    out: dict[str, Any] = {}
    prompt = "Tell me about the Moon."
    for k in (1, 3):
        model = ds._untrained(session.model, k)
        settings = dataclasses.replace(
            session.settings,
            num_streams=k,
            max_new_tokens=128,
            ignore_eos=True,
            seed=0,
            gamma=0.0,
            prefixes=(),
            fast_path="cuda_graph" if device.type == "cuda" else "auto",
        )
        decoder = ParallelDecoder(model, session.tokenizer, settings, **ds.decoder_kwargs(session))
        rec: dict[str, Any] = {}
        for _ in range(2):  # the second pass is the measured one (graphs captured in the first)
            pdt = decoder.decode(prompt, "pdt", emit_tokens=False)
            ind = decoder.decode(prompt, "independent", emit_tokens=False)
            seq = decoder.decode(prompt, "sequential", total_tokens=pdt.new_tokens)
        for name, res in (("pdt", pdt), ("independent", ind), ("sequential", seq)):
            steps = res.step_seconds[res.prefix_steps :]
            rec[f"{name}_step_ms"] = 1000 * statistics.median(steps)
            rec[f"{name}_answer_s"] = res.seconds
            rec[f"{name}_tokens"] = res.new_tokens
        buffers = {}
        for res in (pdt, seq):
            if getattr(res.state, "buffers", None) is not None:  # the graph engine's
                buffers[res.mode] = res.state.buffers
        for mode, buf in buffers.items():
            for key, run in buf.graphs.items():
                if run.graph is not None:
                    label = f"{mode} rows={buf.rows} {key[0]}"
                    rec[f"replay_ms[{label}]"] = _ms(run.graph.replay, 50)
                    if os.environ.get("PDT_PROFILE_KERNELS") == "1":  # the kernels inside the replay
                        rec[f"kernels[{label}]"] = _kernel_table(run.graph.replay, 20)
                        print(f"\n=== replay {label}, 20 replays\n{rec[f'kernels[{label}]']}", flush=True)
        if os.environ.get("PDT_PROFILE_HOST") == "1":  # host-side calls per decode step, by mode
            for name, kwargs in (
                ("pdt", {"emit_tokens": False}),
                ("sequential", {"total_tokens": pdt.new_tokens}),
            ):
                rec[f"host[{name}]"] = _host_table(functools.partial(decoder.decode, prompt, name, **kwargs))
                print(f"\n=== host calls per step, {name} K={k}\n{rec[f'host[{name}]']}", flush=True)
        logits = torch.randn(
            k, model.trunk.config.vocab_size, device=device, dtype=next(model.trunk.parameters()).dtype
        )
        sample = functools.partial(
            sample_rows,
            logits,
            [[1, 2, 3]] * k,
            [0.5] * k,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            no_repeat_ngram=settings.no_repeat_ngram,
        )
        rec["sample_ms"] = _ms(sample, 50)
        out[f"K={k}"] = rec
        print(
            f"decode K={k}: "
            + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}" for a, b in rec.items()),
            flush=True,
        )
    return out


def curriculum_profile() -> dict[str, Any]:
    import curriculum_throughput as ct

    from pdt.model.instrument import decoder_layers
    from pdt.train import losses as L
    from pdt.train.curriculum_step import StepPlan, step_losses

    device = DEVICE
    torch.manual_seed(0)
    model, stage, batch, _cfg = ct._setup(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    stage3, plain, _ = ct._fns(model, stage, batch, device, dtype)
    for _ in range(3):
        stage3()
        plain()
    plan = StepPlan.from_preset(stage)
    params = model.set_trainable(list(stage.trained_groups))
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    labelled = batch.labels != L.IGNORE
    first = decoder_layers(model.trunk)[model.layer_ids[0]]
    gen = torch.Generator().manual_seed(0)
    holder: dict[str, Any] = {}

    def s_fwd() -> None:
        with autocast():
            holder["loss"] = step_losses(model, batch, plan, gen).loss

    def s_bwd() -> None:
        holder.pop("loss").backward()

    def s_opt() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def p_fwd() -> None:
        with autocast():
            out = model.forward_base(batch.input_ids, batch.attention_mask, logits_at=labelled)
        holder["loss"] = L.lm_ce(out.logits, batch.labels)[0]

    rec: dict[str, Any] = {}
    parts: dict[str, list[float]] = {
        k: [] for k in ("stage_fwd", "stage_bwd", "stage_opt", "plain_fwd", "plain_bwd")
    }
    handle = None
    for _ in range(10):
        parts["stage_fwd"].append(_ms(s_fwd, 1))
        parts["stage_bwd"].append(_ms(s_bwd, 1))
        parts["stage_opt"].append(_ms(s_opt, 1))
        handle = first.register_forward_pre_hook(ct.grad_from_here, with_kwargs=True)
        parts["plain_fwd"].append(_ms(p_fwd, 1))
        parts["plain_bwd"].append(_ms(s_bwd, 1))
        handle.remove()
    for k, v in parts.items():
        rec[f"{k}_ms"] = statistics.median(v)
    print("curriculum: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()), flush=True)
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("stage3", stage3), ("plain", plain)):
        with profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        ) as prof:
            for _ in range(3):
                fn()
            _sync()
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
            row_limit=35,
            max_name_column_width=70,
        )
        print(f"\n=== {name} (3 steps) by self CUDA time\n{table}", flush=True)
        rec[f"{name}_table"] = table
    return rec


def main() -> None:
    which = os.environ.get("PDT_PROFILE", "decode,curriculum").split(",")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"}
    if "decode" in which:
        result["decode"] = decode_profile()
    if "curriculum" in which:
        result["curriculum"] = curriculum_profile()
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
