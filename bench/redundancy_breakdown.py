"""Where cross-stream redundancy comes from: PDT against `independent`, with the bus taken apart.

For the trained demo (demo_tiny on the CPU, demo_124m on CUDA) and its dataset's validation prompts,
each prompt is answered (K streams, the demo's sampling, `ignore_eos`) by these variants:
  pdt           — as shipped: snapshot 0 and the notes;
  no_rollback   — the same at γ = 0: every block committed (pdt − no_rollback is the rollbacks' part);
  own_snapshot0 — each stream reads a snapshot 0 of its own planner slots (`own_snapshot0`);
  snapshot0     — every producer frozen from round 0 (`Counterfactual(freeze=all)`): snapshot 0 only;
  empty_window  — every reader ablated: no window, so the SNC adds nothing; commit and rollback stay;
  window1, lag2 — the bus with one note a producer (W = 1), with notes two rounds late (Δ = 2);
  triangular    — stream k reads streams j < k only (the bus's other topology);
  independent   — the baseline: bus off, g = 0.
Per variant: mean redundancy (`pdt.infer.quality.redundancy`; also of the streams' first blocks
alone, written before any sibling's note is visible, and of what follows them), its paired difference with
`independent` (mean ± s.e. over prompts), rollbacks an answer, and the entities and word 3-grams
the section pairs share most (`pdt.infer.quality.shared`). pdt − snapshot0 is the notes' part,
snapshot0 − empty_window snapshot 0's, empty_window − independent the commit/rollback protocol's.

Knobs: PDT_BENCH_PROMPTS (10), PDT_BENCH_SEEDS ("0,1": sampling seeds, each a draw of every answer),
PDT_BENCH_STAGE (another stage-3 preset's sidecars), PDT_BENCH_TOKENS (tokens a stream; the device's
setup by default: 64 on the CPU, where the tiny's sections share little, 128 on CUDA),
PDT_BENCH_VARIANTS ("pdt,window1": only these variants; `independent` is always run). Writes
bench/results/redundancy_breakdown.json (or $OUT/...) with a `records` list, one per seed, each
variant with its per-prompt `scores`; with several seeds the run's last record also holds `pooled`:
each variant's difference with `independent`, each prompt's averaged over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pdt  # noqa: E402
from bench.decode_speedup import _prompts, _session, bench_device, decoder_kwargs, mean_se  # noqa: E402
from pdt.bus import Counterfactual  # noqa: E402
from pdt.infer.orchestrator import ParallelDecoder  # noqa: E402
from pdt.infer.quality import redundancy, shared  # noqa: E402

TOP = 12  # shared items listed per variant


def _variants(k: int) -> dict[str, tuple[str, Counterfactual, dict[str, Any]]]:
    """name → (mode, counterfactual, settings changed; "bus": the bus fields changed)."""
    streams = frozenset(range(k))
    return {
        "pdt": ("pdt", Counterfactual(), {}),
        "no_rollback": ("pdt", Counterfactual(), {"gamma": 0.0}),
        "own_snapshot0": ("pdt", Counterfactual(), {"own_snapshot0": True}),
        "snapshot0": ("pdt", Counterfactual(freeze=streams, freeze_round=0), {}),
        "empty_window": ("pdt", Counterfactual(ablate=streams), {}),
        # the bus's decode knobs (no retraining): fewer notes a producer, later notes, a one-way bus
        "window1": ("pdt", Counterfactual(), {"bus": {"window": 1}}),
        "lag2": ("pdt", Counterfactual(), {"bus": {"lag": 2}}),
        "triangular": ("pdt", Counterfactual(), {"bus": {"topology": "triangular"}}),
        "independent": ("independent", Counterfactual(), {}),
    }


def one_seed(session: Any, prompts: list[str], seed: int, tokens: int) -> dict[str, Any]:
    base = dataclasses.replace(
        session.settings, max_new_tokens=tokens, ignore_eos=True, seed=seed, prefixes=()
    )
    k = base.num_streams
    per: dict[str, dict[str, Any]] = {}
    wanted = os.environ.get("PDT_BENCH_VARIANTS")
    variants = _variants(k)
    if wanted:
        names = {w.strip() for w in wanted.split(",")} | {"independent"}
        unknown = names - set(variants)
        if unknown:
            raise SystemExit(f"PDT_BENCH_VARIANTS: unknown {sorted(unknown)}; known: {', '.join(variants)}")
        variants = {n: v for n, v in variants.items() if n in names}
    for name, (mode, cf, changed) in variants.items():
        if "bus" in changed:
            changed = {**changed, "bus": base.bus.model_copy(update=changed["bus"])}
        decoder = ParallelDecoder(
            session.model,
            session.tokenizer,
            dataclasses.replace(base, counterfactual=cf, **changed),
            **decoder_kwargs(session),
        )
        scores, rollbacks, ents, grams = [], [], Counter(), Counter()
        openings, rests = [], []
        decode = session.tokenizer.decode
        for prompt in prompts:
            res = decoder.decode(prompt, mode, emit_tokens=False)
            scores.append(redundancy(res.sections))
            # the first block (written before any sibling's note is visible) against the rest
            openings.append(redundancy([decode(r.token_ids[: base.tau]) for r in res.streams]))
            rests.append(redundancy([decode(r.token_ids[base.tau :]) for r in res.streams]))
            rollbacks.append(res.rollbacks)
            e, g = shared(res.sections)
            ents.update(e)
            grams.update(g)
        per[name] = {
            "scores": scores,
            "scores_first_block": openings,
            "scores_after_first_block": rests,
            "redundancy": statistics.mean(scores),
            "redundancy_first_block": statistics.mean(openings),
            "redundancy_after_first_block": statistics.mean(rests),
            "rollbacks_per_answer": statistics.mean(rollbacks),
            "shared_entities": sum(ents.values()),
            "shared_trigrams": sum(grams.values()),
            "top_entities": ents.most_common(TOP),
            "top_trigrams": grams.most_common(TOP),
        }
    for name, diff in pooled([{"variants": per}]).items():  # one seed: each prompt's own difference
        per[name]["diff_vs_independent"] = diff
    return per


def pooled(records: list[dict[str, Any]], scores: str = "scores") -> dict[str, dict[str, Any]]:
    """Every variant's difference with `independent` over all the seeds: each prompt's difference
    averaged over the seeds (the draws of one prompt are not independent of each other), then mean
    ± s.e. over the prompts. `scores`: which per-prompt figure (the whole sections, or
    `scores_first_block` / `scores_after_first_block`)."""
    out = {}
    for name in records[0]["variants"]:
        per_seed = []
        for r in records:
            ours, ref = r["variants"][name][scores], r["variants"]["independent"][scores]
            per_seed.append([a - b for a, b in zip(ours, ref, strict=True)])
        out[name] = mean_se([statistics.mean(d) for d in zip(*per_seed, strict=True)])
    return out


def main() -> None:
    device, setup = bench_device()
    session = _session(device, setup["demo"])
    prompts, source = _prompts(session, int(os.environ.get("PDT_BENCH_PROMPTS") or 10), False)
    seeds = [int(s) for s in (os.environ.get("PDT_BENCH_SEEDS") or "0,1").split(",")]
    tokens = int(os.environ.get("PDT_BENCH_TOKENS") or setup["tokens"])
    records = []
    for seed in seeds:
        t0 = time.perf_counter()
        per = one_seed(session, prompts, seed, tokens)
        records.append(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "trunk": session.trunk_info["folder"],
                "sidecars": os.environ.get("PDT_BENCH_STAGE") or "stage 3 of the demo",
                "date": time.strftime("%Y-%m-%d"),
                "code_version": pdt.code_version(),
                "k": session.settings.num_streams,
                "gamma": session.settings.gamma,
                "sampling_seed": seed,
                "tokens_per_stream": tokens,
                "prompts": len(prompts),
                "prompt_source": source,
                "seconds": time.perf_counter() - t0,
                "variants": per,
            }
        )
        print(f"sampling seed {seed} ({len(prompts)} prompts, {source}):")
        for name, v in per.items():
            d = v["diff_vs_independent"]
            print(
                f"  {name:<13} redundancy {v['redundancy']:.4f}"
                f"  vs independent {d['mean']:+.4f} ± {d['se'] or float('nan'):.4f}"
                f"  (first block {v['redundancy_first_block']:.4f},"
                f" after {v['redundancy_after_first_block']:.4f})"
                f"  rollbacks {v['rollbacks_per_answer']:.1f}  shared entities {v['shared_entities']}"
                f" 3-grams {v['shared_trigrams']}"
            )
            print(f"    top 3-grams: {', '.join(f'{t} ({n})' for t, n in v['top_trigrams'][:6])}")
            print(f"    top entities: {', '.join(f'{t} ({n})' for t, n in v['top_entities'][:6])}")
    if len(records) > 1:
        summary = pooled(records)
        first, after = pooled(records, "scores_first_block"), pooled(records, "scores_after_first_block")
        print(f"all {len(seeds)} seeds (each prompt's difference averaged over the seeds):")
        for name, d in summary.items():
            print(
                f"  {name:<13} vs independent {d['mean']:+.4f} ± {d['se'] or float('nan'):.4f}"
                f"  (first block {first[name]['mean']:+.4f} ± {first[name]['se'] or float('nan'):.4f},"
                f" after {after[name]['mean']:+.4f} ± {after[name]['se'] or float('nan'):.4f})"
            )
        records[-1]["pooled"] = {  # the run's last record
            "seeds": seeds,
            "diff_vs_independent": summary,
            "diff_vs_independent_first_block": first,
            "diff_vs_independent_after_first_block": after,
        }
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "redundancy_breakdown.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text())["records"] if out.exists() else []
    out.write_text(json.dumps({"records": old + records}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
