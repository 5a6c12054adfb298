"""The frozen trunk's outputs per training example, computed once per dataset × trunk and reused.

What it is: the trunk is frozen in stages 0–3 and an example's tokens never change, so everything
the plain trunk says about an example is a constant: the KD teacher's distribution at each section
token (kept as its top-k token ids and log-probabilities), the log-probability of the true next
token (the trunk's CE, for the report), the trunk's state at each block end (the input of the
speculation notes that bus mixing puts on the bus) and the pooled prompt state (the planner's
input). One pass over the dataset writes them beside the export (`note_cache/trunk-*.safetensors`);
every later step of every stage reads them instead of running the trunk a second time.
What it is not: exact full-vocabulary KD — `train.kd_top_k = 0` keeps the live teacher pass.

KD with a cached top-k teacher: KL between the two distributions coarsened to {the teacher's top-k
ids, everything else}: Σ_top p (log p − log q) + p_rest (log p_rest − log q_rest). It is 0 when the
student equals the teacher, never exceeds the full KL (coarsening loses information), and with k = 32
keeps the part of the distribution that carries almost all of a small trunk's mass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdt.train.losses import IGNORE

CACHE_FIELDS = ("kd_ids", "kd_logp", "target_logp", "block_hidden", "prompt_pool")


@dataclass
class TrunkCacheEntry:
    kd_ids: torch.Tensor  # [n, k] int32: the teacher's top-k token ids at each labelled position
    kd_logp: torch.Tensor  # [n, k] fp32: their log-probabilities
    target_logp: torch.Tensor  # [n] fp32: log-probability of the true next token
    block_hidden: torch.Tensor  # [m, D] the trunk's final state at each block end
    prompt_pool: torch.Tensor  # [1, D] fp32: masked mean of the prompt's final states


@torch.no_grad()
def compute_batch(model: Any, batch: Any, top_k: int) -> list[dict[str, torch.Tensor]]:
    """The cache entries of the examples of one collated batch (sidecars off)."""
    labelled = batch.labels != IGNORE  # [R, T]
    out = model.forward_base(batch.input_ids, batch.attention_mask, logits_at=labelled)
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [N, V]
    top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # [N, k]
    target = logp.gather(1, batch.labels[labelled][:, None]).squeeze(1)  # [N]
    block_hidden = out.hidden[batch.block_row, batch.block_pos]  # [M, D]
    prompt = model.forward_base(batch.prompt_ids, batch.prompt_mask).hidden  # [B, Tp, D]
    from pdt.model.sidecars.seed_text import masked_mean_pool

    pooled = masked_mean_pool(prompt, batch.prompt_mask)  # [B, D]
    example_of_pos = batch.row_example[labelled.nonzero()[:, 0]]  # [N]
    example_of_block = batch.row_example[batch.block_row]  # [M]
    entries = []
    for b in range(pooled.shape[0]):
        at, blocks = example_of_pos == b, example_of_block == b
        entries.append(
            {
                "kd_ids": top.indices[at].to(torch.int32).cpu(),
                "kd_logp": top.values[at].float().cpu(),
                "target_logp": target[at].float().cpu(),
                "block_hidden": block_hidden[blocks].to(torch.bfloat16).cpu(),
                "prompt_pool": pooled[b : b + 1].float().cpu(),
            }
        )
    return entries


def save_entries(path: Path, entries: list[dict[str, torch.Tensor]], meta: dict[str, Any]) -> bytes:
    """safetensors bytes: each field concatenated over examples, with per-example counts in the metadata."""
    from safetensors.torch import save

    flat = {name: torch.cat([e[name] for e in entries]).contiguous() for name in CACHE_FIELDS}
    counts = {name: [int(e[name].shape[0]) for e in entries] for name in CACHE_FIELDS}
    return save(flat, metadata={"counts": json.dumps(counts), "meta": json.dumps(meta, sort_keys=True)})


def load_entries(path: Path, n_examples: int) -> list[TrunkCacheEntry]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        counts = json.loads(f.metadata()["counts"])
        parts = {name: torch.split(f.get_tensor(name), counts[name]) for name in CACHE_FIELDS}
    if any(len(v) != n_examples for v in parts.values()):
        raise ValueError(
            f"{path}: damaged trunk cache ({len(parts['kd_ids'])} entries for {n_examples} examples)"
        )
    return [TrunkCacheEntry(**{name: parts[name][i] for name in CACHE_FIELDS}) for i in range(n_examples)]


def load_or_build(
    path: Path,
    n_examples: int,
    build: Callable[[], list[dict[str, torch.Tensor]]],
    meta: dict[str, Any],
    is_main: bool,
    barrier: Callable[[], None],
) -> list[TrunkCacheEntry]:
    """Read the cache, or (rank 0) build and write it atomically; the other ranks wait, then read."""
    from pdt.data.build.layout import write_atomic

    if is_main and not path.exists():
        write_atomic(path, save_entries(path, build(), meta))
    barrier()
    return load_entries(path, n_examples)


def attach(batch: Any, entries: list[TrunkCacheEntry], device: torch.device) -> Any:
    """The batch with the cached trunk outputs of its examples (in the batch's row-major order)."""
    batch.kd_ids = torch.cat([e.kd_ids for e in entries]).long().to(device)
    batch.kd_logp = torch.cat([e.kd_logp for e in entries]).to(device)
    batch.trunk_target_logp = torch.cat([e.target_logp for e in entries]).to(device)
    batch.base_block_hidden = torch.cat([e.block_hidden for e in entries]).to(device)
    batch.prompt_pool = torch.cat([e.prompt_pool for e in entries]).to(device)
    n = batch.label_flat.shape[0]  # known on the host: no device read-back
    if batch.kd_ids.shape[0] != n or batch.base_block_hidden.shape[0] != batch.block_row.shape[0]:
        raise ValueError(
            f"trunk cache does not match the batch ({batch.kd_ids.shape[0]} vs {n} positions); delete "
            "the note_cache folder of the dataset"
        )
    return batch


def kd_topk(student_logp: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Coarsened forward KL(p_trunk ‖ p_student), mean over positions (module docstring).

    student_logp [N, V] (log-softmax, fp32), ids/teacher_logp [N, k] → scalar.
    """
    return kd_topk_picked(student_logp.gather(1, ids), teacher_logp)


def kd_topk_picked(q_top: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """`kd_topk` from the student's log-probabilities at the teacher's top-k ids, q_top [N, k]."""
    if q_top.shape[0] == 0:
        return q_top.sum() * 0.0
    p_top = teacher_logp.exp()
    p_rest = (1.0 - p_top.sum(dim=1)).clamp_min(1e-12)  # [N]
    q_rest = (1.0 - q_top.exp().sum(dim=1)).clamp_min(1e-12)
    kl = (p_top * (teacher_logp - q_top)).sum(dim=1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.clamp_min(0.0).mean()  # ≥ 0 in exact arithmetic; rounding can dip below by ~1e-7
