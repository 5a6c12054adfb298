"""Readiness scores of the blocks the decoder itself writes, for the γ cap.

What it is: `decoded_readiness(st)` decodes the first validation prompts with the real
`pdt.infer.orchestrator.ParallelDecoder` on the stage's own sidecars — γ = 0 (no block rolls back),
the demo's sampling (temperature 0.7, top-p 0.9), the stage's stride and bus — and returns the
readiness of every block, prompt by prompt. `pdt.train.curriculum_eval.calibrate` caps γ on them.
Why: the readiness head reads the notes bus, and at decode the bus holds the model's own notes and
its planner's snapshot 0, not the teacher's. On the tiny pipeline (2026-12-07) the rollout blocks,
sampled against teacher windows, scored min 0.47 / p10 0.58 / median 0.75, while the decoder's own
blocks scored min 0.36 / p10 0.41 / median 0.64: the γ capped on the rollouts (0.431) rolled back
11.7% of the decoder's blocks — the cap's ≤ 1% did not hold where γ acts.
What it is not: a benchmark (`bench/decode_speedup.py`) nor the labels of own blocks (the rollouts
of `pdt.train.rollouts` still label readiness in training and in the evaluation's AUC).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from pdt.train import runtime as R
from pdt.train.curriculum_data import embed_item_texts, plan_names

#: The demo presets' sampling (`demo_tiny`, `demo_124m`): the blocks γ will be applied to.
TEMPERATURE, TOP_P = 0.7, 0.9


@contextlib.contextmanager
def _as_demo(st: Any) -> Iterator[None]:
    """The model in eval mode at the demo's precision — fp32 on the CPU (the training's bf16
    autocast would round the scores to bf16 steps, and a demo block could fall below a γ set at
    one); bf16 on a GPU, as there — and back in its training mode afterwards."""
    was_training = st.model.training
    st.model.eval()
    cast = st.autocast_dtype if st.dist.device.type == "cuda" else None
    try:
        with R.autocast(cast, st.dist.device):
            yield
    finally:
        st.model.train(was_training)


@torch.no_grad()
def item_vectors(st: Any, names: dict[str, str]) -> tuple[list[str], torch.Tensor]:
    """(texts, [n, d_n]): the plan items' texts (`names`: `plan_names` of the training split)
    embedded as the demo's coverage keys (`embed_item_texts`, the demo's token budget and precision,
    the model as it decodes), once per stage (`st.item_vectors`)."""
    if st.item_vectors is None:
        from pdt.infer.orchestrator import NOTE_TOKENS

        texts = sorted(set(names.values()))
        with _as_demo(st):
            vectors = embed_item_texts(st.model, texts, st.tokenizer, NOTE_TOKENS, st.dist.device)
        st.item_vectors = (texts, vectors)
    return st.item_vectors


@torch.no_grad()
def decoded_readiness(st: Any) -> list[list[float]]:
    """Per validation prompt (the first `rollouts.calibration_prompts`), the readiness of each block
    the decoder wrote, in stream order then block order."""
    from pdt.infer.orchestrator import DecodeSettings, ParallelDecoder

    cfg = st.preset.rollouts
    records = (st.ds.splits.get("validation") or [])[: cfg.calibration_prompts]
    if not records:
        return []
    settings = DecodeSettings(
        num_streams=st.preset.sidecars.num_streams,
        tau=st.ds.stride,
        bus=st.preset.bus,
        gamma=0.0,
        max_retries=0,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        max_new_tokens=cfg.calibration_tokens,
        seed=0,
        fast_path="eager",  # the reference engine: the training process's mixed precision, no graphs
    )
    # as the demo decodes: the planner's ids read as their training texts, whose embeddings are the
    # coverage keys (the same vectors the export writes for the demo)
    names = plan_names(st.ds.splits["train"])
    vectors = item_vectors(st, names)
    out: list[list[float]] = []
    with _as_demo(st):
        decoder = ParallelDecoder(
            st.model,
            st.tokenizer,
            settings,
            plan_names={int(i): t for i, t in names.items()},
            item_vectors=vectors,
        )
        for record in records:
            result = decoder.decode(st.tokenizer.decode(record["prompt_ids"]), "pdt", emit_tokens=False)
            out.append(
                [
                    float(a.readiness)
                    for stream in result.streams
                    for block in stream.blocks
                    for a in block
                    if a.readiness is not None
                ]
            )
    return out
