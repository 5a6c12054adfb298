"""Curriculum throughput: a stage-3 training step against a plain frozen-trunk step, same run, same rows.

- stage-3 step: `pdt.train.curriculum_step.step_losses` with every stage-3 group training (planner,
  notes, adapters, SNC, stream classifier, speculation, coverage, readiness), bus mixing 0.25 and
  stream dropout 0.1 as in the shipped presets — so the frozen-trunk pass (KD teacher and bus-mix
  source), the notes windows, every head and loss — then backward and the AdamW step. The frozen
  trunk's side (top-k KD targets, block states, pooled prompt) comes from the per-dataset trunk
  cache, as in the job (`train.kd_top_k`); a record with `kd_top_k = 0` measures the live pass. Own-rollout
  sampling (every 10–20 steps in the presets) is not part of the step and is not timed.
- plain step: the same rows through the trunk without sidecars, the same masked LM CE (logits on
  section tokens only, as the stage step computes them), backward
  through the same top layers (the input of the lowest instrumented layer requires grad), so the
  difference is what the curriculum adds. Its CE is `F.cross_entropy` on fp32 logits, what a plain
  fine-tuning step runs; `step_ratio_vs_plain_fused_ce` also gives the ratio against the plain
  step with the stage step's own CE kernel (`pdt.kernels.picked_logprobs`, target only).
Rows are real: the dataset's first examples with their teacher-note embeddings. The trunk has the
pretrain preset's shape (random weights: speed does not depend on training).
CPU: pretrain_tiny + dataset_tiny, 8 examples (24 rows), fp32. GPU: pretrain_124m + dataset_wiki,
64 examples (192 rows: the stage*_124m presets' micro-batch), bf16 autocast.
Writes bench/results/curriculum_throughput.json (or $OUT/...) with a `records` list; table last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pdt import kernels  # noqa: E402
from pdt.data.build.layout import build_root  # noqa: E402
from pdt.data.build.pipeline import run_dataset  # noqa: E402
from pdt.data.tokenizer import build_tokenizer  # noqa: E402
from pdt.jobs import JobContext  # noqa: E402
from pdt.model.instrument import decoder_layers  # noqa: E402
from pdt.model.pdt_model import PDTModel  # noqa: E402
from pdt.model.trunk import build_trunk  # noqa: E402
from pdt.presets.loader import load_preset_file, validate_preset  # noqa: E402
from pdt.train import losses as L  # noqa: E402
from pdt.train.curriculum_data import collate, embed_note_texts, note_texts, open_dataset  # noqa: E402
from pdt.train.curriculum_step import StepPlan, step_losses  # noqa: E402
from pdt.train.trunk_cache import TrunkCacheEntry, attach, compute_batch  # noqa: E402

SETUPS = {
    "cpu": {"trunk": "pretrain_tiny", "dataset": "dataset_tiny", "stage": "stage3", "batch": 8},
    "cuda": {"trunk": "pretrain_124m", "dataset": "dataset_wiki", "stage": "stage3_124m", "batch": 64},
}


def _preset(name: str):
    return load_preset_file(ROOT / "presets" / f"{name}.json")


def _setup(device: torch.device) -> tuple[PDTModel, Any, Any, dict[str, Any]]:
    cfg = SETUPS[device.type]
    ds_preset = _preset(cfg["dataset"])
    if not (build_root(ds_preset.name) / "export" / "manifest.json").exists():
        run_dataset(JobContext(preset=ds_preset, run_dir=ROOT, checkpoints_dir=ROOT, emit=lambda e: None))
    tok = build_tokenizer(ds_preset.tokenizer)
    pre = _preset(cfg["trunk"])
    trunk = build_trunk(pre.trunk, tok.vocab_size, 1024, tok.eot_id, seed=0).to(device)
    data = _preset(cfg["stage"]).model_dump(mode="json")
    data.update({"init_from": None, "rollouts": {"every": 0}})
    stage = validate_preset(data, source=cfg["stage"])
    model = PDTModel(trunk, stage.sidecars)
    ds = open_dataset(ds_preset.name)
    records = ds.splits["train"][: cfg["batch"]]
    vectors = [
        embed_note_texts(note_texts(r), tok, model.embed_texts, stage.train.note_tokens, device)
        for r in records
    ]
    batch = collate(records, vectors, stage, tok.eot_id, ds.stride).to(device)
    if stage.train.kd_top_k:  # the frozen trunk's side from the cache, as the job does after its first pass
        entries = [TrunkCacheEntry(**e) for e in compute_batch(model, batch, stage.train.kd_top_k)]
        batch = attach(batch, entries, device)
    return model, stage, batch, cfg


def grad_from_here(_mod: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the layer's input requires grad, so backward runs from that layer up."""
    kwargs.get("hidden_states", args[0] if args else None).requires_grad_(True)


def _fns(model: PDTModel, stage: Any, batch: Any, device: torch.device, dtype: torch.dtype | None):
    plan = StepPlan.from_preset(stage)
    params = model.set_trainable(list(stage.trained_groups))
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    first = decoder_layers(model.trunk)[model.layer_ids[0]]
    counter = iter(range(10**9))
    labelled = batch.labels != L.IGNORE  # both sides compute logits on section tokens only

    def stage3() -> None:
        with autocast:
            res = step_losses(model, batch, plan, torch.Generator().manual_seed(next(counter)))
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain(fused_ce: bool = False) -> None:
        handle = first.register_forward_pre_hook(grad_from_here, with_kwargs=True)
        try:
            with autocast:
                out = model.forward_base(batch.input_ids, batch.attention_mask, logits_at=labelled)
            if fused_ce:  # the stage step's own CE kernel, C = 1 (the target only)
                picked = kernels.picked_logprobs(out.logits, batch.labels[labelled][:, None])
                (-picked.mean()).backward()
            else:
                L.lm_ce(out.logits, batch.labels)[0].backward()
        finally:
            handle.remove()

    return stage3, plain, lambda: plain(fused_ce=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fns: tuple[Any, ...], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Median seconds per call of each, measured in turn so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for side, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[side].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _peak(fn: Any, device: torch.device) -> int:
    """Peak bytes of one call: CUDA allocator peak on a GPU, process max RSS on CPU (monotone)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    fn()
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    model, stage, batch, cfg = _setup(device)
    stage3, plain, plain_fused = _fns(model, stage, batch, device, dtype)
    t_stage, t_plain, t_fused = _timed((stage3, plain, plain_fused), device, 3, 20 if gpu else 8)
    mem_plain = _peak(plain, device)
    mem_stage = _peak(stage3, device)
    return {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "trunk": cfg["trunk"],
        "dataset": cfg["dataset"],
        "mode": "eager",
        "tokens_per_s": batch.tokens / t_stage,
        "plain_tokens_per_s": batch.tokens / t_plain,
        "step_ratio": t_stage / t_plain,
        "stage_step_s": t_stage,
        "plain_step_s": t_plain,
        "plain_ce": "F.cross_entropy on fp32 logits (lm_ce)",
        "step_ratio_vs_plain_fused_ce": t_stage / t_fused,
        "plain_fused_ce_step_s": t_fused,
        "kernels": os.environ.get("PDT_KERNELS", "auto"),
        "peak_mem_bytes": mem_stage,
        "plain_peak_mem_bytes": mem_plain,
        "peak_mem_kind": "cuda max_memory_allocated"
        if gpu
        else "process max RSS (monotone: plain measured first)",
        "rows": int(batch.input_ids.shape[0]),
        "tokens_per_step": batch.tokens,
        "padded_len": int(batch.input_ids.shape[1]),
        "precision": "bf16" if gpu else "fp32",
        "bus_mix_prob": stage.bus_mix_prob,
        "kd": f"cached top-{stage.train.kd_top_k}" if stage.train.kd_top_k else "live full-vocabulary pass",
        "stream_dropout_prob": stage.stream_dropout_prob,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fresh = measure(device)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "curriculum_throughput.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"records": []}
    records = [r for r in existing.get("records", []) if r.get("device") != fresh["device"]] + [fresh]
    path.write_text(json.dumps({"records": records}, indent=2) + "\n")
    print(
        f"{'device':<24} {'trunk':<14} {'rows':>5} {'tok/step':>9} {'stage3 tok/s':>13} {'plain tok/s':>12} "
        f"{'ratio':>6} {'vs fused':>8} {'peak MiB':>9}"
    )
    for r in records:
        print(
            f"{r['device'][:24]:<24} {r['trunk']:<14} {r['rows']:>5} {r['tokens_per_step']:>9} "
            f"{r['tokens_per_s']:>13,.0f} {r['plain_tokens_per_s']:>12,.0f} {r['step_ratio']:>6.3f} "
            f"{r.get('step_ratio_vs_plain_fused_ce', float('nan')):>8.3f} "
            f"{r['peak_mem_bytes'] / 2**20:>9,.0f}"
        )


if __name__ == "__main__":
    main()
