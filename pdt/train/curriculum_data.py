"""Curriculum data: the dataset export, teacher-note embeddings, and teacher-forced batches.

What it is: opening a dataset's `export/` (with the checks that make a mismatch a message, not a
silent mix: streams, plan salt and vocabulary, tokenizer, stride); the cache of teacher-note
embeddings (the frozen trunk's pooled hidden states of each note text — SPEC §2b.6 — computed
once per dataset × trunk and stored beside the export); the collation of B examples into R = B·K
rows (prompt + stream prefix + section, LM labels shifted by one and masked to the section); and
a resumable, rank-sharded example order. What it is not: the forward or the losses
(`pdt.train.curriculum_step`).

Rounds (SPEC §2, §2b.7): a section token at offset o lies in round floor(o / B). The teacher note
of round r is snapshot version r + 1 (the stream's notes after r + 1 blocks) — exactly what a
stream emits at the end of round r at inference — and it is read through `pdt.bus.teacher_windows`
with the decode-time visibility rule.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from pdt.bus import section_pos_round
from pdt.data.build.layout import build_root, write_atomic
from pdt.data.build.notes import CORRUPTIONS
from pdt.presets.curriculum import CurriculumPreset
from pdt.train.losses import IGNORE
from pdt.train.sibling_repeats import ContentVocab, SiblingRows, sibling_continuations, sibling_negatives

CACHE_VERSION = 2  # 2: the plan items' texts follow the variants
COVERAGE_TARGET = {0: 0.0, 1: 0.5, 2: 1.0}  # missing, partial, covered


class CurriculumDataError(Exception):
    """The dataset cannot feed this stage; the message says what to run or change."""


@dataclass
class ExportedDataset:
    name: str
    root: Path  # data/processed/<name>/export
    manifest: dict[str, Any]
    splits: dict[str, list[dict[str, Any]]]

    @property
    def stride(self) -> int:
        return int(self.manifest["stride"])


def open_dataset(name: str, splits: tuple[str, ...] = ("train", "validation")) -> ExportedDataset:
    root = build_root(name) / "export"
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise CurriculumDataError(
            f"dataset {name!r} is not built ({manifest_path} is missing): run the dataset preset "
            f"{name!r} first (PDT_PRESET={name} python main.py, or from the home screen)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    out: dict[str, list[dict[str, Any]]] = {}
    for split in splits:
        table = pq.read_table(root / f"{split}.parquet")
        if "prompt_ids" not in table.schema.names:
            raise CurriculumDataError(
                f"{root} was exported by an older version (no prompt_ids): delete that folder and run "
                f"the dataset preset {name!r} again (only the export stage is redone)"
            )
        out[split] = table.to_pylist()
    if not out.get("train"):
        raise CurriculumDataError(f"dataset {name!r} has no training examples ({root / 'train.parquet'})")
    return ExportedDataset(name, root, manifest, out)


def check_compatible(ds: ExportedDataset, preset: CurriculumPreset, tokenizer: Any) -> None:
    """Refuse a dataset built for other streams, plan ids, tokenizer or stride, naming the field."""
    m, sc = ds.manifest, preset.sidecars
    problems = []
    if int(m["num_streams"]) != sc.num_streams:
        problems.append(f"num_streams {m['num_streams']} vs sidecars.num_streams {sc.num_streams}")
    if m["plan_salt"] != sc.plan_salt or int(m["plan_vocab"]) != sc.plan_vocab:
        problems.append(
            f"plan ids hashed with salt {m['plan_salt']!r} / V_p {m['plan_vocab']} vs sidecars "
            f"{sc.plan_salt!r} / {sc.plan_vocab}"
        )
    if preset.stride is not None and preset.stride != ds.stride:
        problems.append(
            f"stride {preset.stride} vs the dataset's {ds.stride} (its notes are cut at that stride)"
        )
    saved, now = m.get("tokenizer", {}), tokenizer.identity()
    if saved.get("hash") != now.get("hash"):
        problems.append(
            f"token ids from tokenizer {saved.get('name')} ({saved.get('hash')}), the trunk uses "
            f"{now.get('name')} ({now.get('hash')}) — build the dataset with the trunk's tokenizer"
        )
    if problems:
        raise CurriculumDataError(
            f"dataset {ds.name!r} does not fit preset {preset.name!r}: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- teacher notes


def note_texts(record: dict[str, Any]) -> list[str]:
    """Texts embedded for one record, in a fixed order: stream-major round notes, then variants,
    then the plan items' texts (stream-major: the coverage keys, `item_text`)."""
    texts = [t for snaps in record["snapshot_texts"] for t in snaps[1:]]
    items = [str(t) for per in record["plan_item_texts"] for t in per]
    return texts + list(record["variant_texts"]) + items


def note_text_is_item(record: dict[str, Any]) -> list[bool]:
    """For each of `note_texts(record)`: whether it is a plan item's text (a coverage key)."""
    n_items = sum(len(per) for per in record["plan_item_texts"])
    return [False] * (len(note_texts(record)) - n_items) + [True] * n_items


def cache_path(ds: ExportedDataset, split: str, key_parts: dict[str, Any]) -> Path:
    file_hash = ds.manifest["files"][f"{split}.parquet"]["sha256"]
    blob = json.dumps({**key_parts, "split_sha256": file_hash, "v": CACHE_VERSION}, sort_keys=True)
    return (
        ds.root.parent
        / "note_cache"
        / f"{split}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"
    )


@torch.no_grad()
def embed_note_texts(
    texts: list[str], tokenizer: Any, embed: Any, note_tokens: int, device: torch.device, batch: int = 64
) -> torch.Tensor:
    """[len(texts), d_n] fp32 (CPU): `embed(ids, mask)` over the first `note_tokens` tokens of each,
    in length-sorted batches (little padding)."""
    ids = [tokenizer.encode(t)[:note_tokens] or [tokenizer.eot_id] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        width = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), width), tokenizer.eot_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        vec = embed(x.to(device), mask.to(device)).float().cpu()  # [b, d_n]
        if out is None:
            out = torch.zeros(len(texts), vec.shape[-1])
        out[torch.tensor(chunk)] = vec
    return out if out is not None else torch.zeros(0, 0)


def plan_names(records: list[dict[str, Any]]) -> dict[str, str]:
    """Plan id → the item text it stands for in these records (the commonest, when texts collide
    in the hash), for the demo to show the planner's plan as words."""
    counts: dict[int, Counter[str]] = {}
    for record in records:
        for ids, texts in zip(record["plan_item_ids"], record["plan_item_texts"], strict=True):
            for i, text in zip(ids, texts, strict=True):
                counts.setdefault(int(i), Counter())[str(text)] += 1
    return {str(i): c.most_common(1)[0][0] for i, c in sorted(counts.items())}


def embed_item_texts(
    model: Any, texts: list[str], tokenizer: Any, note_tokens: int, device: torch.device, batch: int = 64
) -> torch.Tensor:
    """[len(texts), d_n] fp32 (CPU): plan-item texts as the coverage head reads them — the frozen
    trunk's pooled embedding, never centred (the curriculum's coverage keys; the demo's too)."""

    def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.embed_texts(ids, mask, centred=False)

    return embed_note_texts(texts, tokenizer, embed, note_tokens, device, batch)


def write_item_vectors(path: Path, texts: list[str], vectors: torch.Tensor, note_tokens: int) -> None:
    """The plan items' text embeddings beside an export: the vectors [n, d_n] fp32, the texts (same
    order) and the token budget they were embedded with in the safetensors metadata."""
    from safetensors.torch import save

    meta = {"texts": json.dumps(texts), "note_tokens": str(note_tokens)}
    write_atomic(path, save({"vectors": vectors.float().contiguous().cpu()}, metadata=meta))


def read_item_vectors(path: Path, d_notes: int, note_tokens: int) -> tuple[list[str], torch.Tensor]:
    """(texts, vectors [n, d_n]) from `write_item_vectors`; ValueError naming the file when it is
    damaged or was embedded for other sidecars (another d_n or token budget)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("vectors")
        texts = json.loads(meta["texts"])
        tokens = int(meta["note_tokens"])
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is one message
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(texts, list) or vectors.dim() != 2 or len(texts) != vectors.shape[0]:
        count = len(texts) if isinstance(texts, list) else type(texts).__name__
        raise ValueError(f"{path}: texts ({count}) do not match vectors of shape {tuple(vectors.shape)}")
    if vectors.shape[1] != d_notes or tokens != note_tokens:
        raise ValueError(
            f"{path}: embedded for d_n {vectors.shape[1]} over {tokens} tokens; "
            f"these sidecars have d_n {d_notes} and the demo embeds {note_tokens} tokens"
        )
    return [str(t) for t in texts], vectors.float()


def load_or_build_notes(
    path: Path, records: list[dict[str, Any]], build: Any, is_main: bool, barrier: Any
) -> list[torch.Tensor]:
    """Per record [n_texts, d_n]: read the cache, or (rank 0) build and write it; others wait.
    `build(texts, is_item)` embeds the flat texts; `is_item` marks the plan items' texts."""
    from safetensors.torch import load_file, save

    counts = [len(note_texts(r)) for r in records]
    if is_main and not path.exists():
        texts = [t for r in records for t in note_texts(r)]
        flat = build(texts, [i for r in records for i in note_text_is_item(r)])  # [Σ n_texts, d_n]
        write_atomic(path, save({"vectors": flat.contiguous()}, metadata={"counts": json.dumps(counts)}))
    barrier()
    flat = load_file(str(path))["vectors"]
    if flat.shape[0] != sum(counts):
        raise CurriculumDataError(
            f"{path}: damaged note cache ({flat.shape[0]} rows for {sum(counts)} notes); delete it"
        )
    return list(torch.split(flat, counts))


# --------------------------------------------------------------------------- batches


@dataclass
class CurriculumBatch:
    """B examples as R = B·K rows (example-major: row b·K + k is stream k of example b)."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T] next token on the section, IGNORE elsewhere
    sidecar_positions: torch.Tensor  # [R, T] bool: the stream's prefix + section (not the prompt)
    pos_round: torch.Tensor  # [R, T] round of each position
    row_example: torch.Tensor  # [R]
    row_stream: torch.Tensor  # [R]
    prompt_ids: torch.Tensor  # [B, Tp]
    prompt_mask: torch.Tensor  # [B, Tp]
    plan_targets: torch.Tensor  # [B, S] plan ids, IGNORE on inactive slots
    notes: torch.Tensor  # [B, K, Rn, d_n] teacher note of (stream, round)
    notes_mask: torch.Tensor  # [B, K, Rn] bool
    item_ids: torch.Tensor  # [R, P] the row's plan items
    item_mask: torch.Tensor  # [R, P] bool
    item_text: torch.Tensor  # [R, P, d_n] the frozen trunk's embedding of each item's text (0: padding)
    block_row: torch.Tensor  # [M] row of each block end
    block_pos: torch.Tensor  # [M] position of the block's last token
    block_note: torch.Tensor  # [M] flat index into notes [B·K·Rn] of the block's teacher note
    block_cov: torch.Tensor  # [M, P] coverage target after the block
    var_block: torch.Tensor  # [Nv] the block a corrupted note stands in for
    var_note: torch.Tensor  # [Nv, d_n] the corrupted note's embedding
    var_kind: torch.Tensor  # [Nv] its corruption, an index into pdt.data.build.notes.CORRUPTIONS (-1: other)
    tokens: int  # real tokens in the rows
    # Index forms of the masks above, built on the host, so a GPU step never reads a mask back
    # (a boolean-mask index or nonzero() is a device sync).
    label_flat: torch.Tensor  # [N] row·T + t of each labelled position, row-major
    label_rows: torch.Tensor  # [N] its row
    label_targets: torch.Tensor  # [N] its next token
    label_counts: torch.Tensor  # [R] labelled positions per row
    last_blocks: torch.Tensor  # [M_last] the last block of each stream (where the corrupted notes stand)
    # Readiness in note space as the decoder sees it: block spec_own[i] with its own speculation note
    # (label 1) and with the speculation note of block spec_sib[i] — a sibling stream's block of the
    # same round (else its last) — claiming to be its own (label 0: an ownership violation).
    spec_own: torch.Tensor  # [Ms]
    spec_sib: torch.Tensor  # [Ms]
    # The frozen trunk's cached outputs (pdt.train.trunk_cache.attach), None when computed live.
    kd_ids: torch.Tensor | None = None  # [N, k] teacher top-k ids at labelled positions
    kd_logp: torch.Tensor | None = None  # [N, k] their log-probabilities
    trunk_target_logp: torch.Tensor | None = None  # [N] trunk log-prob of the true token
    base_block_hidden: torch.Tensor | None = None  # [M, D] trunk state at each block end
    prompt_pool: torch.Tensor | None = None  # [B, D] pooled prompt state
    # [N, C] name-like ids the siblings already wrote (-1 padded; pdt.train.sibling_repeats), only
    # when the stage weighs the sibling-repeat loss
    sibling_ids: torch.Tensor | None = None
    sibling_next_ids: torch.Tensor | None = (
        None  # [N, C'] the siblings' continuations of each position's 2 tokens
    )

    def to(self, device: torch.device) -> CurriculumBatch:
        moved = {
            f.name: to_device(getattr(self, f.name), device)
            for f in fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return CurriculumBatch(**{**self.__dict__, **moved})


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without stalling the GPU: from pinned memory the copy is asynchronous (a copy
    from pageable memory waits for every kernel already queued)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def plan_targets(record: dict[str, Any], slots: int) -> list[int]:
    """Round-robin over the streams' plan ids (first item of each stream first), unique, ≤ S."""
    out: list[int] = []
    lists = record["plan_item_ids"]
    for i in range(max(len(x) for x in lists)):
        for ids in lists:
            if i < len(ids) and ids[i] not in out and len(out) < slots:
                out.append(int(ids[i]))
    return out


def _pad(rows: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    width = width or max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(
    records: list[dict[str, Any]],
    vectors: list[torch.Tensor],
    preset: CurriculumPreset,
    pad_id: int,
    stride: int,
    content: ContentVocab | None = None,
    continuations: bool = False,
) -> CurriculumBatch:
    """Teacher-forced rows, rounds, notes, blocks and corrupted notes of B records (`stride` = B).
    `content`: also the sibling-repeat negatives of every labelled position (`sibling_ids`);
    `continuations`: the siblings' continuations of its last two tokens (`sibling_next_ids`)."""
    k, cap = preset.sidecars.num_streams, preset.train.max_stream_tokens
    rows = [rec["token_ids"][j][:cap] for rec in records for j in range(k)]
    section_start = [
        len(rec["token_ids"][j]) - sum(rec["label_mask"][j]) for rec in records for j in range(k)
    ]
    ids = _pad(rows, pad_id)  # [R, T]
    r_count, t = ids.shape
    lengths = torch.tensor([len(r) for r in rows])
    arange = torch.arange(t)[None, :]
    attention = (arange < lengths[:, None]).long()  # [R, T]
    start = torch.tensor(section_start)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = torch.where(
        (arange[:, 1:] >= start[:, None]) & (arange[:, 1:] < lengths[:, None]), ids[:, 1:], IGNORE
    )
    prompt_len = torch.tensor([len(rec["prompt_ids"]) for rec in records]).repeat_interleave(k)  # [R]
    sidecar_positions = (arange >= prompt_len[:, None]) & (arange < lengths[:, None])
    pos_round = section_pos_round(start, t, stride)  # [R, T]
    notes, notes_mask, note_index = _notes(records, vectors, k)
    blocks = _blocks(records, k, cap, stride, note_index, notes_mask.shape[-1])
    items = [[int(x) for x in rec["plan_item_ids"][j]] for rec in records for j in range(k)]
    item_ids = _pad(items, 0)
    item_mask = _pad([[1] * len(x) for x in items], 0).bool()
    item_text = _item_texts(records, vectors, k, item_ids.shape[1])
    var_block, var_note, var_kind = _variants(records, vectors, blocks["last_block"])
    labelled = labels != IGNORE  # [R, T]
    label_pos = labelled.nonzero()  # [N, 2] (row, t), row-major
    sibling_ids = sibling_next_ids = None
    if content is not None or continuations:
        bus = preset.bus
        sib = SiblingRows.of(ids, start, lengths, label_pos, pos_round, k, stride, bus.lag, bus.topology)
        sibling_ids = sibling_negatives(sib, content) if content is not None else None
        sibling_next_ids = sibling_continuations(sib) if continuations else None
    return CurriculumBatch(
        input_ids=ids,
        attention_mask=attention,
        labels=labels,
        sidecar_positions=sidecar_positions,
        pos_round=pos_round,
        row_example=torch.arange(len(records)).repeat_interleave(k),
        row_stream=torch.arange(k).repeat(len(records)),
        prompt_ids=_pad([rec["prompt_ids"] for rec in records], pad_id),
        prompt_mask=_pad([[1] * len(rec["prompt_ids"]) for rec in records], 0),
        plan_targets=_pad(
            [plan_targets(rec, preset.sidecars.plan_slots) for rec in records],
            IGNORE,
            preset.sidecars.plan_slots,
        ),
        notes=notes,
        notes_mask=notes_mask,
        item_ids=item_ids,
        item_mask=item_mask,
        item_text=item_text,
        block_row=blocks["row"],
        block_pos=blocks["pos"],
        block_note=blocks["note"],
        block_cov=_pad_float(blocks["cov"], item_ids.shape[1]),
        var_block=var_block,
        var_note=var_note,
        var_kind=var_kind,
        tokens=int(lengths.sum()),
        label_flat=label_pos[:, 0] * t + label_pos[:, 1],
        label_rows=label_pos[:, 0],
        label_targets=labels[labelled],
        label_counts=labelled.sum(dim=1),
        last_blocks=torch.tensor(sorted(blocks["last_block"].values()), dtype=torch.long),
        spec_own=blocks["spec_own"],
        spec_sib=blocks["spec_sib"],
        sibling_ids=sibling_ids,
        sibling_next_ids=sibling_next_ids,
    )


def _notes(
    records: list[dict[str, Any]], vectors: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]]:
    """notes [B, K, Rn, d_n], mask [B, K, Rn], and per (b, k) the flat index of each round's note."""
    rounds = [[len(s) - 1 for s in rec["snapshot_texts"]] for rec in records]
    rn = max(1, max(max(r) for r in rounds))
    d = vectors[0].shape[-1]
    notes = torch.zeros(len(records), k, rn, d)
    mask = torch.zeros(len(records), k, rn, dtype=torch.bool)
    index: list[list[list[int]]] = []
    for b, vec in enumerate(vectors):
        offset, per_stream = 0, []
        for j in range(k):
            n = rounds[b][j]
            notes[b, j, :n] = vec[offset : offset + n]
            mask[b, j, :n] = True
            per_stream.append([(b * k + j) * rn + r for r in range(n)])
            offset += n
        index.append(per_stream)
    return notes, mask, index


def _blocks(
    records: list[dict[str, Any]], k: int, cap: int, stride: int, note_index: list, rn: int
) -> dict[str, Any]:
    """Block ends: for round r of stream j, the position of the block's last section token."""
    row, pos, note, cov, last, where = [], [], [], [], {}, {}
    for b, rec in enumerate(records):
        for j in range(k):
            start = len(rec["token_ids"][j]) - sum(rec["label_mask"][j])
            length = min(len(rec["token_ids"][j]), cap)
            for r, written in enumerate(rec["snapshot_token_pos"][j][1:]):
                end = start + int(written) - 1
                if end >= length or end < start:
                    continue
                last[(b, j)] = len(row)
                where[(b, j, r)] = len(row)
                row.append(b * k + j)
                pos.append(end)
                note.append(note_index[b][j][r])
                cov.append([COVERAGE_TARGET[int(c)] for c in rec["coverage_targets"][j][r + 1]])
    own, sib = [], []
    for (b, j, r), i in where.items():
        for step in range(1, k):  # the next stream that has a block of this round, else its last block
            other = (j + step) % k
            found = where.get((b, other, r), last.get((b, other)))
            if found is not None:
                own.append(i)
                sib.append(found)
                break
    return {
        "row": torch.tensor(row, dtype=torch.long),
        "pos": torch.tensor(pos, dtype=torch.long),
        "note": torch.tensor(note, dtype=torch.long),
        "cov": cov,
        "last_block": last,
        "spec_own": torch.tensor(own, dtype=torch.long),
        "spec_sib": torch.tensor(sib, dtype=torch.long),
    }


def _pad_float(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _item_texts(
    records: list[dict[str, Any]], vectors: list[torch.Tensor], k: int, width: int
) -> torch.Tensor:
    """[B·K, P, d_n]: each row's plan-item text embeddings (they follow the round notes and the
    variants in `note_texts` order), zero on padding."""
    out = torch.zeros(len(records) * k, width, vectors[0].shape[-1])
    for b, (rec, vec) in enumerate(zip(records, vectors, strict=True)):
        offset = sum(len(s) - 1 for s in rec["snapshot_texts"]) + len(rec["variant_texts"])
        for j, per in enumerate(rec["plan_item_texts"][:k]):
            out[b * k + j, : len(per)] = vec[offset : offset + len(per)]
            offset += len(per)
    return out


def _variants(
    records: list[dict[str, Any]], vectors: list[torch.Tensor], last_block: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupted notes (entity swap, dropped fact, wrong owner, duplicate) placed at their stream's
    last block: (blocks [Nv], notes [Nv, d_n], kinds [Nv] — the index of each one's `variant_labels` entry in
    CORRUPTIONS, -1 for a label it does not know)."""
    blocks, notes, kinds = [], [], []
    for b, (rec, vec) in enumerate(zip(records, vectors, strict=True)):
        n_round_notes = sum(len(s) - 1 for s in rec["snapshot_texts"])
        labels = rec.get("variant_labels") or []
        for i, stream in enumerate(rec["variant_streams"]):
            if (b, int(stream)) in last_block:
                blocks.append(last_block[(b, int(stream))])
                notes.append(vec[n_round_notes + i])
                label = labels[i] if i < len(labels) else None
                kinds.append(CORRUPTIONS.index(label) if label in CORRUPTIONS else -1)
    d = vectors[0].shape[-1]
    return (
        torch.tensor(blocks, dtype=torch.long),
        torch.stack(notes) if notes else torch.zeros(0, d),
        torch.tensor(kinds, dtype=torch.long),
    )


# --------------------------------------------------------------------------- order


class ExampleOrder:
    """A seeded permutation per epoch, sharded by rank; the cursor (epoch, position) is the state."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n // world < batch:
            raise CurriculumDataError(
                f"{n} training examples cannot fill a micro-batch of {batch} on each of {world} "
                "process(es): lower train.micro_batch_size or build a larger dataset"
            )
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.pos = 0, 0

    def _shard(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        return perm[self.rank :: self.world][: (self.n // self.world)]

    def next(self) -> list[int]:
        shard = self._shard()
        if self.pos + self.batch > len(shard):
            self.epoch, self.pos = self.epoch + 1, 0
            shard = self._shard()
        out = shard[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n or state.get("batch") != self.batch:
            raise CurriculumDataError(
                f"the data cursor was saved for {state.get('n')} examples in batches of "
                f"{state.get('batch')}, "
                f"now {self.n} / {self.batch}"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
