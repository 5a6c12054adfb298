"""Decode speedup: PDT with K streams against the `sequential` baseline, same run, same total tokens.

For each K in {1, 2, 3, 4, 8} and a few prompts (the first validation prompts — "Tell me about
<title>." of held-out articles — of the dataset the stage was trained on), in the one runtime of
`pdt.infer.orchestrator`:
- PDT: K streams × N new tokens each (EOS banned, so every mode writes the same total), rounds of
  τ tokens, notes / coverage / readiness at every block end, commit or rollback at γ;
- `sequential`: the plain trunk writes K × N tokens alone (one row);
- `independent`: K streams, sidecars on, bus off (g = 0), every block committed.
Figures per K (means over the prompts):
- step_ratio: aggregate tokens per second of batched-forward time (prefix steps excluded; rolled-back
  tokens count, they were computed) of PDT over sequential's — what batching the streams buys;
- e2e_ratio: sequential's wall time over PDT's for the whole answer (prefill, planner, prefixes,
  heads, rollbacks and sampling included);
- redundancy_pdt / redundancy_independent: shared word 3-grams and entities between the sections
  (`pdt.infer.quality.redundancy`; K ≥ 2), and `redundancy_diff`: their per-prompt difference's mean
  and standard error (the prompts differ far more than the modes do);
- nll_ratio: NLL of PDT's merged answer under the plain trunk / NLL of sequential's answer; the
  merged answer is scored as generated: the sections' token ids with the separator's between them
  (`DecodeResult.merged_ids`), as sequential's answer is its own token ids. The sectioned layout
  costs fluency by itself (each section written without the others: on the 124M pipeline the plain
  trunk writing the same sections scores 1.55× sequential's NLL with the headers read, 1.94×
  without), so beside it:
- nll_ratio_same_layout: PDT's sections against the plain trunk writing the same layout (the same
  decoder at α = 0: every token from the trunk's logits, sidecars off, bus off), both scored with
  each section after its stream header (`DecodeResult.headed_nlls`) — what the sidecars cost (or
  buy) in fluency, the part training can move.
K = 3 uses the trained stage-3 sidecars (real γ, real rollbacks); the other K have no trained
sidecars (they are trained for K = 3), so they use freshly initialised sidecars sized for K with
their gates opened and γ = 0 (no rollbacks): their speed is real, their quality figures are not
meaningful and are reported as null.
CPU: the tiny pipeline (pretrain_tiny + stage3, fp32). GPU: pretrain_124m + stage3_124m, bf16.
On CUDA each K runs with both decode-step engines, recorded as `mode`: `eager` (HF forward per
token) and `cuda_graph` (the step captured once and replayed: `pdt.model.graph_decode`); on the CPU
`static` (the same static buffers without a graph: what `auto` runs there; `eager` when
PDT_BENCH_ENGINES asks); all three modes of a record (PDT, sequential, independent) run on that
record's engine.
Knobs: PDT_BENCH_KS (e.g. "1,3"), PDT_BENCH_ENGINES ("cuda_graph"), PDT_BENCH_PROMPTS (how many
validation prompts, 8 by default: the quality figures of 3–4 prompts swung run to run; the K
without trained sidecars time the first 4 only),
PDT_BENCH_TRUNK=random, PDT_BENCH_SEED (the sampling seed, 0 by default), PDT_BENCH_STAGE (the
stage-3 preset whose sidecars the demo loads, e.g. a variant trained beside the shipped one),
PDT_BENCH_GAMMA (decode at this γ rather than the calibrated one), PDT_BENCH_G (the external SNC
gate g, 1 in the demos), PDT_BENCH_TRUNK_KERNEL=1 (the
graph step's decoder-block linears run `skinny_linear` as its LM head does: graph_decode's
TRUNK_KERNEL_ROWS, recorded as `trunk_linears`), PDT_BENCH_ROUND_GRAPH=0|1 (graph_decode's ROUND_GRAPH:
each round's window fold replayed as a graph, recorded as `round_graph`), PDT_BENCH_SPAN=n
(graph_decode's SPAN: the graphs attend over the written slots rounded up to n; 0: over the whole
buffer; recorded as `attention_span`), PDT_BENCH_WARMUP_STREAM=0|1 (graph_decode's
SHARED_WARMUP_STREAM: the captures' warm-ups share one side stream; recorded as `shared_warmup_stream`),
PDT_BENCH_PREFIX_FORWARD=0|1 (the orchestrator's PREFIX_ONE_FORWARD: the stream prefixes in one forward,
or one step a token; recorded as `prefix_one_forward`).
Writes bench/results/decode_speedup.json (or $OUT/...) with a `records` list; a table last.
"""

from __future__ import annotations

import dataclasses
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

import pdt  # noqa: E402
from pdt.bus import Counterfactual  # noqa: E402
from pdt.infer import orchestrator  # noqa: E402
from pdt.infer.job import Session  # noqa: E402
from pdt.infer.orchestrator import DecodeResult, ParallelDecoder  # noqa: E402
from pdt.infer.quality import answer_nll, redundancy  # noqa: E402
from pdt.jobs import JobContext  # noqa: E402
from pdt.model import graph_decode  # noqa: E402
from pdt.model.pdt_model import PDTModel  # noqa: E402
from pdt.presets.loader import load_preset_file, validate_preset  # noqa: E402

TIMING_PROMPTS = 4  # prompts of a K without trained sidecars: its speed only (quality figures are null)
SETUPS = {
    "cpu": {"demo": "demo_tiny", "tokens": 64, "prompts": 8},
    "cuda": {"demo": "demo_124m", "tokens": 128, "prompts": 8},
}
KS = (1, 2, 3, 4, 8)
TITLES = ("the Moon", "Photosynthesis", "the Roman Empire", "Volcano", "Music")  # random-trunk mode


def _prompts(session: Any, count: int, random_trunk: bool) -> tuple[list[str], str]:
    """The first `count` validation prompts of the dataset the stage was trained on (held-out
    articles); fixed titles for a random trunk (no dataset behind it) or when that dataset is gone."""
    fixed = [f"Tell me about {t}." for t in TITLES[:count]]
    if random_trunk:
        return fixed, "fixed titles"
    from pdt.infer.job import _trunk_config
    from pdt.train.curriculum_data import open_dataset

    _, stage = _trunk_config(session.preset)
    try:
        rows = open_dataset(stage.dataset).splits["validation"][:count]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"dataset {stage.dataset!r} not readable ({exc}): fixed titles instead", flush=True)
        return fixed, "fixed titles"
    return [session.tokenizer.decode(r["prompt_ids"]) for r in rows], f"{stage.dataset} validation"


def _session(device: torch.device, demo: str) -> Session:
    data = json.loads(load_preset_file(ROOT / "presets" / f"{demo}.json").model_dump_json())
    data["device"] = device.type
    if os.environ.get("PDT_BENCH_STAGE"):
        data["sidecars"] = {"preset": os.environ["PDT_BENCH_STAGE"]}
    preset = validate_preset(data, source=demo)
    ctx = JobContext(preset=preset, run_dir=Path("/tmp"), checkpoints_dir=Path("/tmp"), emit=lambda e: None)
    return Session(ctx, preset)


def decoder_kwargs(session: Any) -> dict[str, Any]:
    """What the demo's decoder gets from its session besides the settings: the plan ids' texts, how
    its coverage head reads plan items and those texts' exported embeddings (a random session has
    none of them)."""
    return {
        "plan_names": getattr(session, "plan_names", {}),
        "coverage_text": getattr(session, "coverage_text", True),
        "item_vectors": getattr(session, "item_vectors", None),
    }


def _random_session(device: torch.device) -> Any:
    """PDT_BENCH_TRUNK=random: the pretrain_124m (GPU) / pretrain_tiny (CPU) trunk shape with random
    weights and stage-0 sidecar shapes, no pipeline needed — for the engines' speed (γ = 0, no
    rollbacks; the quality figures are null)."""
    from types import SimpleNamespace

    from pdt.data.tokenizer import build_tokenizer
    from pdt.infer.orchestrator import DecodeSettings
    from pdt.model.trunk import build_trunk
    from pdt.presets.schema import BusConfig

    gpu = device.type == "cuda"
    pre = load_preset_file(ROOT / "presets" / ("pretrain_124m.json" if gpu else "pretrain_tiny.json"))
    stage = load_preset_file(ROOT / "presets" / ("stage0_124m.json" if gpu else "stage0.json"))
    tok = build_tokenizer(pre.tokenizer)
    trunk = build_trunk(pre.trunk, tok.vocab_size, pre.train.seq_len, tok.eot_id, seed=0)
    dtype = torch.bfloat16 if gpu else torch.float32
    trunk = trunk.to(device=device, dtype=dtype).eval()
    model = PDTModel(trunk, stage.sidecars).to(device=device, dtype=dtype).eval()
    settings = DecodeSettings(
        num_streams=stage.sidecars.num_streams, tau=32, bus=BusConfig(**stage.bus.model_dump())
    )
    info = {"folder": f"{pre.name} shape, random weights", "dtype": str(dtype)}
    return SimpleNamespace(model=model, tokenizer=tok, settings=settings, trunk_info=info)


def _untrained(model: PDTModel, k: int) -> PDTModel:
    """Sidecars sized for K streams, gates opened, zero-initialised outputs given weights (timing only)."""
    cfg = model.cfg.model_copy(update={"num_streams": k})
    fresh = PDTModel(model.trunk, cfg)
    gen = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name.startswith("trunk.") or not name.startswith(("snc.", "adapters.")):
                continue
            if p.dim() == 0 or p.numel() <= k:
                p.fill_(0.0)  # gate logits: λ = 0.5
            elif torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    dtype = next(model.snc.parameters()).dtype
    return fresh.to(device=next(model.trunk.parameters()).device, dtype=dtype).eval()


def _token_rate(res: DecodeResult) -> float:
    """Sampled tokens per second of batched-forward time, prefix steps excluded."""
    steps = res.step_seconds[res.prefix_steps :]
    tokens = sum(s.generated for s in res.streams)
    return tokens / sum(steps) if steps else 0.0


def _one(
    decoder: ParallelDecoder, prompt: str, trunk: torch.nn.Module, trunk_only: ParallelDecoder | None = None
) -> dict[str, Any]:
    """One prompt: PDT, sequential and independent timings; with `trunk_only` (the same decoder at
    α = 0), the quality figures too."""
    pdt = decoder.decode(prompt, "pdt", emit_tokens=False)
    seq = decoder.decode(prompt, "sequential", total_tokens=pdt.new_tokens)
    ind = decoder.decode(prompt, "independent", emit_tokens=False)
    out = {
        "step_ratio": _token_rate(pdt) / _token_rate(seq),
        "e2e_ratio": seq.seconds / pdt.seconds,
        "independent_step_ratio": _token_rate(ind) / _token_rate(seq),
        "independent_e2e_ratio": seq.seconds / ind.seconds,
        "pdt_s": pdt.seconds,
        "sequential_s": seq.seconds,
        "independent_s": ind.seconds,
        "tokens": pdt.new_tokens,
        "generated": sum(s.generated for s in pdt.streams),
        "rollbacks": pdt.rollbacks,
        "pdt_step_ms": 1000 * statistics.mean(pdt.step_seconds[pdt.prefix_steps :]),
        "sequential_step_ms": 1000 * statistics.mean(seq.step_seconds),
        "kv_cache_bytes": pdt.kv_cache_bytes,
        **{f"pdt_phase_{k}": v for k, v in pdt.phase_seconds.items()},
        **{f"sequential_phase_{k}": v for k, v in seq.phase_seconds.items()},
    }
    if trunk_only is not None:
        nll_pdt = answer_nll(trunk, pdt.prompt_ids, pdt.merged_ids(decoder.tokenizer))
        nll_seq = answer_nll(trunk, seq.prompt_ids, seq.streams[0].token_ids)
        plain = trunk_only.decode(prompt, "independent", emit_tokens=False)  # the layout, no sidecar
        headed_pdt = float(pdt.headed_nlls(trunk, decoder.tokenizer).mean())
        headed_plain = float(plain.headed_nlls(trunk, decoder.tokenizer).mean())
        out.update(
            nll_pdt_headed=headed_pdt,
            nll_trunk_sections_headed=headed_plain,
            nll_ratio_same_layout=headed_pdt / headed_plain,
            redundancy_pdt=redundancy(pdt.sections),
            redundancy_independent=redundancy(ind.sections),
            nll_pdt=nll_pdt,
            nll_sequential=nll_seq,
            nll_ratio=nll_pdt / nll_seq,
        )
    return out


def _paired(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-prompt differences of the quality figures, with their standard error over the prompts:
    `redundancy_diff` = PDT − `independent` (negative: PDT repeats less), `nll_same_layout_diff` =
    PDT − plain trunk, nats/token. A mean within about two standard errors of 0 is no difference
    these prompts can show."""
    out: dict[str, Any] = {}
    for name, a, b in (
        ("redundancy_diff", "redundancy_pdt", "redundancy_independent"),
        ("nll_same_layout_diff", "nll_pdt_headed", "nll_trunk_sections_headed"),
    ):
        out[name] = mean_se([r[a] - r[b] for r in runs])
    return out


def mean_se(diffs: list[float]) -> dict[str, Any]:
    """Per-prompt differences → their mean, standard error (None from one prompt) and count."""
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.mean(diffs), "se": se, "prompts": len(diffs)}


def bench_device() -> tuple[torch.device, dict[str, Any]]:
    """The device the benchmarks run on (CUDA when there is one) and its `SETUPS` entry; on the CPU
    torch gets a thread per core."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return device, SETUPS[device.type]


def main() -> None:
    device, setup = bench_device()
    random_trunk = os.environ.get("PDT_BENCH_TRUNK") == "random"
    session = _random_session(device) if random_trunk else _session(device, setup["demo"])
    trained_k = None if random_trunk else session.model.cfg.num_streams
    n_prompts = int(os.environ.get("PDT_BENCH_PROMPTS") or setup["prompts"])  # more: steadier quality figures
    prompts, prompt_source = _prompts(session, n_prompts, random_trunk)
    seed = int(os.environ.get("PDT_BENCH_SEED") or 0)  # the sampling seed: another draw of every answer
    base = dataclasses.replace(session.settings, max_new_tokens=setup["tokens"], ignore_eos=True, seed=seed)
    if os.environ.get("PDT_BENCH_GAMMA"):  # another readiness threshold than the calibrated one
        base = dataclasses.replace(base, gamma=float(os.environ["PDT_BENCH_GAMMA"]))
    if os.environ.get("PDT_BENCH_G"):  # another external SNC gate than the demo's
        base = dataclasses.replace(base, g=float(os.environ["PDT_BENCH_G"]))
    if os.environ.get("PDT_BENCH_TRUNK_KERNEL") == "1":
        graph_decode.TRUNK_KERNEL_ROWS = graph_decode.LM_HEAD_KERNEL_ROWS
    if os.environ.get("PDT_BENCH_ROUND_GRAPH") in ("0", "1"):
        graph_decode.ROUND_GRAPH = os.environ["PDT_BENCH_ROUND_GRAPH"] == "1"
    if os.environ.get("PDT_BENCH_SPAN"):
        graph_decode.SPAN = int(os.environ["PDT_BENCH_SPAN"])
    if os.environ.get("PDT_BENCH_WARMUP_STREAM") in ("0", "1"):  # one warm-up stream, or one a capture
        graph_decode.SHARED_WARMUP_STREAM = os.environ["PDT_BENCH_WARMUP_STREAM"] == "1"
    if os.environ.get("PDT_BENCH_PREFIX_FORWARD") in ("0", "1"):
        orchestrator.PREFIX_ONE_FORWARD = os.environ["PDT_BENCH_PREFIX_FORWARD"] == "1"
    # CUDA: both engines; the CPU: `static` (what `auto` runs there), `eager` when asked for
    engines = ("eager", "cuda_graph") if device.type == "cuda" else ("static",)
    only = os.environ.get("PDT_BENCH_ENGINES")  # e.g. "cuda_graph" to rerun one engine
    if only:
        allowed = ("eager", "cuda_graph") if device.type == "cuda" else ("eager", "static")
        engines = tuple(e for e in allowed if e in only.split(","))
    records = []
    only_ks = os.environ.get("PDT_BENCH_KS")  # e.g. "1,3"
    ks = tuple(int(k) for k in only_ks.split(",")) if only_ks else KS
    for k, engine in ((k, e) for k in ks for e in engines):
        trained = k == trained_k
        model = session.model if trained else _untrained(session.model, k)
        settings = dataclasses.replace(
            base,
            num_streams=k,
            prefixes=(),
            gamma=base.gamma if trained else 0.0,
            counterfactual=base.counterfactual if trained else Counterfactual(),
            fast_path=engine,
        )
        decoder = ParallelDecoder(model, session.tokenizer, settings, **decoder_kwargs(session))
        trunk_only = None  # quality figures: the trained K only
        if trained and k > 1:
            trunk_only = ParallelDecoder(
                model,
                session.tokenizer,
                dataclasses.replace(settings, alpha=0.0, fast_path="auto"),
                **decoder_kwargs(session),
            )
        _one(decoder, prompts[0], session.model.trunk)  # warm-up (allocator, kernels)
        # the trained K's quality figures want every prompt; the other K time untrained sidecars
        used = prompts if trained else prompts[:TIMING_PROMPTS]
        runs = [_one(decoder, p, session.model.trunk, trunk_only) for p in used]
        mean = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
        paired = _paired(runs) if trunk_only is not None else {}
        records.append(
            {
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
                "trunk": session.trunk_info["folder"],
                "trunk_dtype": session.trunk_info["dtype"],
                "date": time.strftime("%Y-%m-%d"),
                "code_version": pdt.code_version(),
                "k": k,
                "mode": decoder.engine,
                "round_graph": graph_decode.ROUND_GRAPH and decoder.engine == "cuda_graph",
                "attention_span": graph_decode.SPAN if decoder.engine == "cuda_graph" else "written slots",
                "shared_warmup_stream": graph_decode.SHARED_WARMUP_STREAM
                if decoder.engine == "cuda_graph"
                else None,
                "prefix_one_forward": orchestrator.PREFIX_ONE_FORWARD,
                "trunk_linears": "skinny_linear"
                if len(graph_decode.TRUNK_KERNEL_ROWS) and decoder.engine == "cuda_graph"
                else "F.linear",
                "sidecars": f"trained ({os.environ.get('PDT_BENCH_STAGE') or 'stage 3'})"
                if trained
                else "untrained, gates opened (timing only)",
                "tau": settings.tau,
                "gamma": settings.gamma,
                "g": settings.g,
                "sampling_seed": settings.seed,
                "tokens_per_stream": setup["tokens"],
                "prompts": len(used),
                "prompt_source": prompt_source,
                "step_ratio": mean["step_ratio"],
                "e2e_ratio": mean["e2e_ratio"],
                "independent_step_ratio": mean["independent_step_ratio"],
                "independent_e2e_ratio": mean["independent_e2e_ratio"],
                "redundancy_pdt": mean.get("redundancy_pdt"),
                "redundancy_independent": mean.get("redundancy_independent"),
                "nll_ratio": mean.get("nll_ratio"),
                "nll_pdt": mean.get("nll_pdt"),
                "nll_sequential": mean.get("nll_sequential"),
                "nll_ratio_same_layout": mean.get("nll_ratio_same_layout"),
                **paired,
                "nll_pdt_headed": mean.get("nll_pdt_headed"),
                "nll_trunk_sections_headed": mean.get("nll_trunk_sections_headed"),
                "rollbacks_per_answer": mean["rollbacks"],
                "generated_per_answer": mean["generated"],
                "tokens_per_answer": mean["tokens"],
                "pdt_step_ms": mean["pdt_step_ms"],
                "sequential_step_ms": mean["sequential_step_ms"],
                "pdt_s": mean["pdt_s"],
                "sequential_s": mean["sequential_s"],
                "kv_cache_bytes": int(mean["kv_cache_bytes"]),
                "graph_captures": getattr(decoder.decoder, "captures", 0),  # step graphs, all answers
                "cuda_reserved_mib": torch.cuda.memory_reserved() / 2**20 if device.type == "cuda" else None,
                # where each answer's wall clock went (ms, mean over the prompts): see
                # DecodeResult.phase_seconds; `other` is sampling and the host's per-token work
                "phases_ms": {
                    mode: {
                        key.removeprefix(f"{mode}_phase_"): 1000 * v
                        for key, v in mean.items()
                        if key.startswith(f"{mode}_phase_")
                    }
                    for mode in ("pdt", "sequential")
                },
            }
        )
        r = records[-1]
        print(
            f"K={k} {engine}: step {r['step_ratio']:.2f}x  e2e {r['e2e_ratio']:.2f}x  independent step "
            f"{r['independent_step_ratio']:.2f}x e2e {r['independent_e2e_ratio']:.2f}x  rollbacks "
            f"{r['rollbacks_per_answer']:.1f}",
            flush=True,
        )
        for mode, ph in r["phases_ms"].items():
            print(f"  {mode} ms: " + "  ".join(f"{key} {v:.1f}" for key, v in ph.items()), flush=True)
        for name, d in paired.items():
            se = "" if d["se"] is None else f" ± {d['se']:.4f} (s.e.)"
            print(f"  {name}: {d['mean']:+.4f}{se} over {d['prompts']} prompts", flush=True)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("decode_engines.json" if random_trunk else "decode_speedup.json")
    existing = json.loads(path.read_text()) if path.is_file() else {"records": []}
    kind = "cuda" if device.type == "cuda" else "cpu"
    kept = [  # the other device's records, and this device's records of engines or K not rerun
        r
        for r in existing.get("records", [])
        if str(r.get("device", "")).startswith("cpu") != (kind == "cpu")
        or r.get("mode", "eager") not in engines
        or r.get("k") not in ks
    ]
    every = sorted(kept + records, key=lambda r: (str(r.get("device", "")).startswith("cpu"), r["k"]))
    path.write_text(json.dumps({"records": every}, indent=2) + "\n")
    head = f"{'device':<28} {'mode':<10} {'K':>2} {'step':>6} {'e2e':>6} {'ind step':>8}"
    print(f"\n{head} {'red pdt':>8} {'red ind':>8} {'nll':>6} {'nll lay':>7}")
    for r in every:

        def f(x: Any) -> str:
            return "  -  " if x is None else f"{x:.3f}"

        print(
            f"{r['device'][:28]:<28} {r.get('mode', 'eager'):<10} {r['k']:>2} "
            f"{r['step_ratio']:>6.2f} {r['e2e_ratio']:>6.2f} "
            f"{r['independent_step_ratio']:>8.2f} {f(r['redundancy_pdt']):>8} "
            f"{f(r['redundancy_independent']):>8} {f(r['nll_ratio']):>6} "
            f"{f(r.get('nll_ratio_same_layout')):>7}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
