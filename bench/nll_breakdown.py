"""Where the merged answer's NLL gap comes from: per-token NLL under the plain trunk, by part.

For the first validation prompts of the stage's dataset (as bench/decode_speedup.py), K = 3 trained
sidecars, EOS banned, sequential writing as many tokens as PDT committed, both scored by the plain
trunk after the prompt (mean nats per token):
- `sequential`: the sequential answer; `sequential_first_section`: its first tokens, as many as
  PDT's first section has (the like-for-like yardstick of `section_1_in_merged`);
- `merged`: PDT's merged answer as generated (`DecodeResult.merged_ids`), split into `seam` (the
  first SEAM tokens of every section after the first: written without the sections before them,
  scored after them) and `rest`;
- per section k: `section_k_in_merged` (its tokens inside the merged answer) and, for k ≥ 2,
  `section_k_alone` (the section scored right after the prompt, as it was written);
- `independent_merged`: the `independent` baseline's merged answer (sidecars on, bus off);
- `trunk_sections_merged`: K sections written by the plain trunk alone (α = 0: every token sampled
  from the trunk's logits with sidecars off), each from the prompt and its stream prefix, merged the
  same way — what the parallel layout itself costs, with no sidecar in the text;
- `merged_with_headers` / `trunk_sections_with_headers`: the same two answers with each section
  after its stream's header ("Part k of K:"), scored on the sections' tokens only — each section in
  the context it was written in, less the notes.
The gap `merged − sequential` splits into what the sidecars shift in a section written from the
prompt (`section_1_in_merged` against `sequential_first_section`), the seams, and later sections'
own content; `trunk_sections_merged − sequential` is the part no sidecar training can remove.
CPU: the tiny pipeline (PDT_CHECKPOINTS_DIR / PDT_DATA_DIR as for the presets); GPU: the 124M one.
Writes $OUT/nll_breakdown.json (else bench/results/nll_breakdown.json; this device kind's record replaced, the
other's kept) and prints the figures.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import decode_speedup as ds  # noqa: E402
import torch  # noqa: E402

from pdt import code_version  # noqa: E402
from pdt.infer.orchestrator import SECTION_SEPARATOR, ParallelDecoder  # noqa: E402
from pdt.infer.quality import token_nlls  # noqa: E402

SEAM = 8  # tokens at the start of a later section counted as its seam
PROMPTS = 10


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = ds.SETUPS[device.type]
    session = ds._session(device, setup["demo"])
    prompts, source = ds._prompts(session, PROMPTS, False)
    settings = dataclasses.replace(
        session.settings, max_new_tokens=setup["tokens"], ignore_eos=True, seed=0, prefixes=()
    )
    decoder = ParallelDecoder(session.model, session.tokenizer, settings, **ds.decoder_kwargs(session))
    trunk_only = ParallelDecoder(
        session.model,
        session.tokenizer,
        dataclasses.replace(settings, alpha=0.0),
        **ds.decoder_kwargs(session),
    )
    trunk, separator = session.model.trunk, session.tokenizer.encode(SECTION_SEPARATOR)
    parts: dict[str, list[float]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        parts.setdefault(name, []).extend(values.tolist())

    for prompt in prompts:
        pdt = decoder.decode(prompt, "pdt", emit_tokens=False)
        seq = decoder.decode(prompt, "sequential", total_tokens=pdt.new_tokens)
        seq_nll = token_nlls(trunk, pdt.prompt_ids, seq.streams[0].token_ids)
        add("sequential", seq_nll)
        add("sequential_first_section", seq_nll[: len(pdt.streams[0].token_ids)])
        merged = token_nlls(trunk, pdt.prompt_ids, pdt.merged_ids(session.tokenizer))
        add("merged", merged)
        pos = 0
        for k, stream in enumerate(pdt.streams, start=1):
            ids = stream.token_ids
            pos += len(separator) if k > 1 else 0
            inside = merged[pos : pos + len(ids)]
            add(f"section_{k}_in_merged", inside)
            if k > 1:
                add("seam", inside[:SEAM])
                add("rest", inside[SEAM:])
                add(f"section_{k}_alone", token_nlls(trunk, pdt.prompt_ids, ids))
            else:
                add("rest", inside)
            pos += len(ids)
        add("merged_with_headers", pdt.headed_nlls(trunk, session.tokenizer))
        for name, dec in (("independent_merged", decoder), ("trunk_sections_merged", trunk_only)):
            other = dec.decode(prompt, "independent", emit_tokens=False)
            add(name, token_nlls(trunk, other.prompt_ids, other.merged_ids(session.tokenizer)))
            if dec is trunk_only:
                add("trunk_sections_with_headers", other.headed_nlls(trunk, session.tokenizer))
    figures = {name: {"nll": statistics.mean(v), "tokens": len(v)} for name, v in parts.items()}
    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor()})",
        "trunk": session.trunk_info["folder"],
        "date": time.strftime("%Y-%m-%d"),
        "code_version": code_version(),
        "prompts": len(prompts),
        "prompt_source": source,
        "tokens_per_stream": setup["tokens"],
        "seam_tokens": SEAM,
        "parts": figures,
    }
    for name, f in figures.items():
        print(f"{name:<22} {f['nll']:.3f} nats/token over {f['tokens']} tokens")
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nll_breakdown.json"
    existing = json.loads(path.read_text()).get("records", []) if path.is_file() else []
    kept = [r for r in existing if str(r.get("device", "")).startswith("cpu") != (device.type == "cpu")]
    path.write_text(json.dumps({"records": kept + [record]}, indent=2) + "\n")  # this device's replaced
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
