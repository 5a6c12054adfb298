"""The curriculum stages on a tiny trunk and dataset: groups, losses, resume, chaining, messages.

Every test runs the real job (`run_curriculum`) or the real step (`step_losses`) on a dataset built
by the real pipeline and a real exported HF trunk (tests/train/curriculum_setup.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pdt.data.build.notes import CORRUPTIONS
from pdt.jobs import JobContext
from pdt.model.pdt_model import GROUPS, PDTModel
from pdt.model.trunk import load_trunk
from pdt.presets.curriculum import STAGE_GROUPS, CurriculumPreset
from pdt.runs import checkpoints_root
from pdt.telemetry.events import Event, Log, Metric
from pdt.train import calibration as C
from pdt.train.checkpoint import CheckpointManager
from pdt.train.curriculum import CurriculumError, run_curriculum
from pdt.train.curriculum_data import CurriculumBatch, CurriculumDataError, collate, note_texts, open_dataset
from pdt.train.curriculum_step import StepPlan, StepResult, step_losses
from pdt.train.losses import IGNORE
from tests.train.curriculum_setup import build_world, stage_preset


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("curriculum"))


@pytest.fixture(autouse=True)
def data_env(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDT_DATA_DIR", str(world["data"]))


def run(preset, stop_at: int | None = None) -> tuple[str, list[Event]]:
    events: list[Event] = []
    ckpt = checkpoints_root() / preset.name
    ctx = JobContext(
        preset=preset,
        run_dir=ckpt.parent.parent / "logs" / preset.name,
        checkpoints_dir=ckpt,
        emit=events.append,
    )
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if stop_at is not None:

        def emit(event: Event) -> None:
            events.append(event)
            if isinstance(event, Metric) and event.name == "train/loss" and event.step >= stop_at:
                ctx.request_stop()

        ctx.emit = emit
    return run_curriculum(ctx), events


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per sidecar group (and the trunk, and LoRA): a hash of its tensors."""
    out: dict[str, hashlib._Hash] = {}
    for key in sorted(tensors):
        top = key.split(".", 1)[0]
        group = next((g for g, attrs in GROUPS.items() if top in attrs), top)
        if "lora_" in key:
            group = "lora"
        out.setdefault(group, hashlib.sha256()).update(tensors[key].float().numpy().tobytes())
    return {k: h.hexdigest() for k, h in out.items()}


def model_state(model: PDTModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_each_stage_trains_only_its_groups(world: dict[str, Path], stage: int) -> None:
    over = {"init_from": None, "bus_mix_prob": 0.3 if stage >= 2 else 0.0}
    preset = stage_preset(stage, world["trunk"], **over)
    trunk_before = {k: v.clone() for k, v in load_trunk(world["trunk"]).state_dict().items()}
    # The sidecars a fresh stage starts from: same seed, same construction as the job's.
    torch.manual_seed(preset.train.seed)
    fresh = PDTModel(load_trunk(world["trunk"]), preset.sidecars).sidecar_state_dict()
    status, events = run(preset)
    assert status == "finished"
    loaded = CheckpointManager(checkpoints_root() / preset.name).load()
    after = loaded.tensors["sidecars"]
    before_sums, after_sums = checksums(fresh), checksums(after)
    changed = {g for g in before_sums if before_sums[g] != after_sums[g]}
    # a fresh start (no predecessor) also sets the text embedder's centre, which no stage trains
    assert changed == set(STAGE_GROUPS[stage]) | {"text_embedder"}, f"stage {stage} changed {sorted(changed)}"
    if stage == 4:
        assert loaded.tensors["lora"] and all("lora_" in k for k in loaded.tensors["lora"])
        assert any(float(v.abs().sum()) > 0 for k, v in loaded.tensors["lora"].items() if "lora_B" in k)
    # The trunk's own weights never change (LoRA lives beside them).
    trunk_after = load_trunk(world["trunk"]).state_dict()
    assert all(torch.equal(trunk_before[k], trunk_after[k]) for k in trunk_before)
    names = {e.name for e in events if isinstance(e, Metric)}
    assert {"train/loss", "throughput/tokens_per_s", "eval/lm_ce_stream0", "eval/trunk_ce_stream2"} <= names
    assert any(n.startswith("gate/layer") for n in names)


def test_stages_chain_and_say_where_they_start(world: dict[str, Path], tmp_path: Path) -> None:
    centred = {"sidecars": {"center_text_embeddings": True}}
    with pytest.raises(CurriculumError, match="run the preset 'stage0' first"):
        run(stage_preset(1, world["trunk"], **centred))
    assert run(stage_preset(0, world["trunk"], **centred))[0] == "finished"
    stage0 = CheckpointManager(checkpoints_root() / "stage0").load()
    status, events = run(stage_preset(1, world["trunk"], **centred))
    assert status == "finished"
    logs = " ".join(e.message for e in events if isinstance(e, Log))
    assert "starting from 'stage0' step 3" in logs
    stage1 = CheckpointManager(checkpoints_root() / "stage1").load()
    assert stage1.state["started_from"]["preset"] == "stage0"
    # The stream adapters' down-projections are random at init: stage 1 must have started from
    # stage 0's (untrained there) values, not from a new draw. Their up-projections were zero.
    key = "adapters.0.w_down"
    assert not torch.equal(stage0.tensors["sidecars"][key], torch.zeros_like(stage0.tensors["sidecars"][key]))
    drift = (stage1.tensors["sidecars"][key] - stage0.tensors["sidecars"][key]).abs().max()
    assert float(drift) < 0.1  # 3 Adam steps of lr 1e-2 move a weight by at most ~0.03
    # Stage 0 centred the text embeddings on the train split's note texts; stage 1 keeps that centre
    center = stage0.tensors["sidecars"]["text_embedder.center"]
    assert torch.equal(stage1.tensors["sidecars"]["text_embedder.center"], center)
    model = PDTModel(load_trunk(world["trunk"]), stage_preset(0, world["trunk"], **centred).sidecars)
    ds = open_dataset("ds_curr")
    from pdt.data.tokenizer import load_tokenizer
    from pdt.train.curriculum_data import embed_note_texts, note_text_is_item, note_texts

    pairs = [
        (t, item)
        for r in ds.splits["train"]
        for t, item in zip(note_texts(r), note_text_is_item(r), strict=True)
    ]
    texts = [t for t, item in pairs if not item]  # the centre is the notes' (the plan items aside)
    assert 0 < len(texts) < len(pairs)
    pooled = embed_note_texts(
        texts, load_tokenizer(world["trunk"]), model.pooled_texts, 32, torch.device("cpu")
    )
    torch.testing.assert_close(center, pooled.mean(dim=0), atol=5e-3, rtol=0.0)  # (bf16 autocast)
    # The teacher notes' targets are centred; the plan items' texts (the coverage keys) are not
    from pdt.train import curriculum as CUR

    preset0 = stage_preset(0, world["trunk"], **centred)
    ctx = JobContext(
        preset=preset0, run_dir=tmp_path, checkpoints_dir=checkpoints_root() / "stage0", emit=lambda e: None
    )
    st = CUR._setup(ctx, preset0)  # resumes the finished stage 0: its centre, its note vectors
    rec, vec = ds.splits["train"][0], st.vectors["train"][0]
    is_item = torch.tensor(note_text_is_item(rec))
    tok = load_tokenizer(world["trunk"])
    for item in (False, True):
        part = [t for t, x in zip(note_texts(rec), is_item.tolist(), strict=True) if x == item]
        as_note = embed_note_texts(part, tok, st.model.embed_texts, 32, torch.device("cpu"))

        def raw(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return st.model.embed_texts(i, m, centred=False)

        as_key = embed_note_texts(part, tok, raw, 32, torch.device("cpu"))
        want, other = (as_key, as_note) if item else (as_note, as_key)
        torch.testing.assert_close(vec[is_item == item], want, atol=3e-2, rtol=0.0)  # (bf16 autocast)
        assert float((vec[is_item == item] - other).abs().max()) > 0.1
    # A missing note cache at a fresh start: the train split's notes are the centre pass's pooled
    # states projected (no second trunk pass over them); the plan items' texts still go through
    # the trunk. Sentinel pooled states (and another centre, so another cache key) show which is which.
    st.model.text_embedder.center.add_(1.0)
    sentinel = torch.randn(len(texts), pooled.shape[1])
    vectors = CUR._note_vectors(ctx, preset0, ds, st.model, tok, st.dist, sentinel)
    flat = torch.cat(vectors["train"])
    items = torch.tensor([item for _, item in pairs])
    want = st.model.text_embedder.project(sentinel)
    torch.testing.assert_close(flat[~items], want, atol=1e-2, rtol=0.0)  # (bf16 autocast)
    keys = embed_note_texts(
        [t for t, item in pairs if item],
        tok,
        lambda i, m: st.model.embed_texts(i, m, centred=False),
        32,
        torch.device("cpu"),
    )
    torch.testing.assert_close(flat[items], keys, atol=3e-2, rtol=0.0)
    # centred, the notes of different texts are less alike than the raw pooled states are
    raw = torch.nn.functional.normalize(pooled[:64], dim=-1)
    centred = torch.nn.functional.normalize(pooled[:64] - center, dim=-1)
    assert float((centred @ centred.T).mean()) < float((raw @ raw.T).mean()) - 0.1


def test_a_mismatched_predecessor_is_refused(world: dict[str, Path]) -> None:
    assert run(stage_preset(0, world["trunk"]))[0] == "finished"
    other = stage_preset(1, world["trunk"], sidecars={"adapter_rank": 4})
    with pytest.raises(CurriculumError, match="adapter_rank"):
        run(other)


def test_missing_dataset_and_trunk_name_what_to_run(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CurriculumDataError, match="run the dataset preset 'nope' first"):
        run(stage_preset(0, world["trunk"], dataset="nope"))
    with pytest.raises(CurriculumError, match="run the preset 'pretrain_missing' to the end first"):
        run(stage_preset(0, world["trunk"], trunk={"path": None, "preset": "pretrain_missing"}))
    with pytest.raises(CurriculumDataError, match="num_streams 3 vs sidecars.num_streams 2"):
        run(stage_preset(0, world["trunk"], sidecars={"num_streams": 2}))


def test_resume_matches_an_uninterrupted_run(world: dict[str, Path]) -> None:
    over = {"init_from": None, "bus_mix_prob": 0.5, "stream_dropout_prob": 0.3, "train": {"steps": 6}}
    straight = stage_preset(3, world["trunk"], name="straight", **over)
    assert run(straight)[0] == "finished"
    split = stage_preset(3, world["trunk"], name="split", **over)
    status, _ = run(split, stop_at=3)
    assert status == "stopped"
    assert CheckpointManager(checkpoints_root() / "split").load().state["step"] == 3
    status, events = run(split)
    assert status == "finished"
    a = CheckpointManager(checkpoints_root() / "straight").load()
    b = CheckpointManager(checkpoints_root() / "split").load()
    for key, value in a.tensors["sidecars"].items():
        assert torch.equal(value, b.tensors["sidecars"][key]), key
    losses = lambda s: [h["loss"] for h in s.state["history"] if "loss" in h]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == 6


def _trained_deltas(
    world: dict[str, Path], stage: int, name: str, train: dict[str, Any]
) -> tuple[CurriculumPreset, dict[str, torch.Tensor]]:
    """(the preset, each sidecar weight's change): a stage run `train` from fresh sidecars."""
    preset = stage_preset(stage, world["trunk"], name=name, init_from=None, train=train)
    torch.manual_seed(preset.train.seed)
    fresh = PDTModel(load_trunk(world["trunk"]), preset.sidecars).sidecar_state_dict()
    assert run(preset)[0] == "finished"
    after = CheckpointManager(checkpoints_root() / preset.name).load().tensors["sidecars"]
    return preset, {k: (after[k].float() - fresh[k].float()) for k in fresh}


def test_heads_lr_scale_speeds_the_heads_and_leaves_the_lm_path_alone(world: dict[str, Path]) -> None:
    """One AdamW step from the same fresh sidecars: its first update is lr · g / (|g| + eps) per
    weight, so the coverage and readiness heads move `heads_lr_scale` times as far, and the LM's
    sidecars (which the heads' detached inputs send no gradient) move exactly as at scale 1."""
    deltas = {
        scale: _trained_deltas(world, 3, f"heads_x{scale:g}", {"steps": 1, "heads_lr_scale": scale})[1]
        for scale in (1.0, 4.0)
    }
    heads = [k for k in deltas[1.0] if k.split(".", 1)[0] in ("coverage_head", "agreement_head")]
    lm_path = [k for k in deltas[1.0] if k.split(".", 1)[0] in ("adapters", "snc")]
    assert heads and lm_path
    moved = {s: sum(float(deltas[s][k].abs().sum()) for k in heads) for s in deltas}
    assert moved[1.0] > 0 and moved[4.0] / moved[1.0] == pytest.approx(4.0, rel=0.02)
    for k in lm_path:
        torch.testing.assert_close(deltas[4.0][k], deltas[1.0][k], atol=1e-6, rtol=1e-4)
    assert any(float(deltas[1.0][k].abs().sum()) > 0 for k in lm_path)  # the LM path did train


def test_gates_lr_scale_speeds_the_gates_alone(world: dict[str, Path]) -> None:
    """Two AdamW steps from the same fresh sidecars. The first moves no gate: W_o and the adapters'
    up-projections start at zero, so a gate's gradient is 0 until they move. The second is the
    gates' first update, a fixed multiple of lr per gate whatever its gradient's size, so the gates
    move `gates_lr_scale` times as far; every other weight moves exactly as at scale 1."""
    deltas = {}
    for scale in (1.0, 20.0):
        preset, deltas[scale] = _trained_deltas(
            world, 1, f"gates_x{scale:g}", {"steps": 2, "gates_lr_scale": scale}
        )
    gates = [k for k in deltas[1.0] if k.endswith(".gate") and k.split(".", 1)[0] in ("adapters", "snc")]
    assert len(gates) == 2 * preset.sidecars.n_layers  # an SNC and an adapter gate a layer
    moved = {s: sum(float(deltas[s][k].abs().sum()) for k in gates) for s in deltas}
    assert moved[1.0] > 0 and moved[20.0] / moved[1.0] == pytest.approx(20.0, rel=0.02)
    for k in set(deltas[1.0]) - set(gates):
        torch.testing.assert_close(deltas[20.0][k], deltas[1.0][k], atol=1e-6, rtol=1e-4)


def test_export_calibration_and_report(world: dict[str, Path]) -> None:
    rollouts = {"every": 2, "rows": 2, "eval_rows": 4, "calibration_prompts": 3, "calibration_tokens": 32}
    preset = stage_preset(3, world["trunk"], init_from=None, rollouts=rollouts)
    assert run(preset)[0] == "finished"
    folder = checkpoints_root() / "stage3" / "export"
    cal = json.loads((folder / "calibration.json").read_text())
    ready = cal["readiness"]
    assert 0.0 <= ready["gamma"] <= ready["gamma_youden"] <= 1.0 and ready["n"] > 0
    # γ is capped on the blocks the decoder itself wrote (γ 0) on 3 validation prompts: at most
    # ⌊share·n⌋ of them score below it
    decoded = [x for answer in ready["decoded_scores"] for x in answer]
    assert ready["decoded_prompts"] == 3 and len(decoded) == ready["decoded_blocks"] > 0
    below = sum(x < ready["gamma"] for x in decoded)
    assert below <= int(preset.readiness_max_rollback * len(decoded))
    assert ready["decoded_rollback_rate"] == pytest.approx(below / len(decoded))
    assert ready["decoded_rollback_rate_at_youden"] >= ready["decoded_rollback_rate"]
    assert "the decoder itself writes on 3 validation prompts" in ready["rule"]
    own_q, lab_q = ready["own_good_quantiles"], ready["labelled_good_quantiles"]  # the rollouts, beside
    assert own_q["min"] <= own_q["p10"] <= own_q["p50"] <= own_q["p90"] and lab_q["min"] <= lab_q["p90"]
    scores = ready["own_good_scores"]  # every own good rollout block's score, ascending
    good = ready["own_blocks"] - ready["own_violations"]
    assert len(scores) == good and scores == sorted(scores) and scores[0] == pytest.approx(own_q["min"])
    assert len(ready["own_violation_scores"]) == ready["own_violations"]
    by_share = ready["gamma_by_max_rollback"]  # the γ each cap keeps: the preset's own is the γ used
    assert by_share[f"{preset.readiness_max_rollback:g}"] == pytest.approx(ready["gamma"])
    gammas = [by_share[k] for k in sorted(by_share, key=float)]
    assert gammas == sorted(gammas) and gammas[-1] <= ready["gamma_youden"]
    assert by_share["0.1"] == pytest.approx(C.capped_gamma(ready["gamma_youden"], decoded, 0.1))
    cov = cal["coverage"]
    assert 0.0 <= cov["threshold"] <= 1.0 and 0.0 <= cov["macro_f1"] <= 1.0
    assert cov["f1_all_covered"] == pytest.approx(2 * cov["base_rate"] / (1 + cov["base_rate"]))
    training = json.loads((folder / "training.json").read_text())
    assert training["stage"] == 3 and training["coverage_keys"] == "item_text"  # the demo reads text keys
    report = json.loads((folder / "report.json").read_text())
    assert report["stage"] == 3 and report["calibration"] == cal
    assert {"coverage_f1", "coverage_auc", "readiness_auc", "lm_ce_stream1", "trunk_ce_stream1"} <= set(
        report["final_eval"]
    )
    split = [k for k in report["final_eval"] if k.startswith("readiness_auc_dataset_")]
    assert split and all(0.0 <= report["final_eval"][k] <= 1.0 for k in split)  # per corruption kind
    ev = report["final_eval"]  # the notes' worth: CE with another example's notes, less with the real ones
    assert ev["lm_ce_foreign_notes"] > 0 and ev["lm_ce_foreign_bus"] > 0
    assert math.isfinite(ev["notes_gain"]) and math.isfinite(ev["bus_gain"])
    # the sibling-repeat term is evaluated (not trained: weight 0), with its worth under a foreign bus
    assert ev["sibling_ul"] >= 0 and "sibling_ul" not in preset.losses.model_fields_set
    assert math.isfinite(ev["sibling_ul_notes_gain"]) and math.isfinite(ev["sibling_ul_bus_gain"])
    assert report["parameters"]["sidecars"] > 0 and len(report["gates"]) == preset.sidecars.n_layers
    state = CheckpointManager(checkpoints_root() / "stage3").load().state
    assert state["calibration"] == cal
    # The exported sidecars load strictly into a fresh model and reproduce the trained outputs.
    model = PDTModel(load_trunk(world["trunk"]), preset.sidecars)
    model.load_sidecars(folder)
    saved = CheckpointManager(checkpoints_root() / "stage3").load().tensors["sidecars"]
    assert all(torch.equal(v, saved[k]) for k, v in model.sidecar_state_dict().items())
    # The calibration's answers are the decoder's: the exported sidecars answer the first validation
    # prompt alike (same settings, fp32 on the CPU as the demo) and score the same blocks.
    from pdt.data.tokenizer import load_tokenizer
    from pdt.infer.orchestrator import NOTE_TOKENS, DecodeSettings, ParallelDecoder
    from pdt.train.curriculum_data import embed_item_texts, read_item_vectors
    from pdt.train.decode_calibration import TEMPERATURE, TOP_P

    tok = load_tokenizer(world["trunk"])
    settings = DecodeSettings(
        num_streams=3, tau=16, bus=preset.bus, gamma=0.0, max_retries=0, temperature=TEMPERATURE,
        top_p=TOP_P, max_new_tokens=32, seed=0, fast_path="eager",
    )  # fmt: skip
    # as the demo loads them: the planner's ids named by their training texts, whose exported
    # embeddings are what the decoder would compute itself (fp32 on the CPU)
    names = {int(i): t for i, t in json.loads((folder / "plan_items.json").read_text()).items()}
    texts, vectors = read_item_vectors(
        folder / "plan_item_vectors.safetensors", preset.sidecars.d_notes, NOTE_TOKENS
    )
    assert texts == sorted(set(names.values())) and len(texts) > 3
    model.eval()
    with torch.no_grad():
        fresh = embed_item_texts(model, texts[:3], tok, NOTE_TOKENS, torch.device("cpu"))
    torch.testing.assert_close(vectors[:3], fresh, atol=1e-5, rtol=1e-5)
    prompt = tok.decode(open_dataset("ds_curr").splits["validation"][0]["prompt_ids"])
    demo = ParallelDecoder(model, tok, settings, plan_names=names, item_vectors=(texts, vectors))
    again = demo.decode(prompt, "pdt", emit_tokens=False)
    scores0 = [a.readiness for s in again.streams for b in s.blocks for a in b if a.readiness is not None]
    assert scores0 == pytest.approx(ready["decoded_scores"][0], abs=1e-5)


def test_a_calibration_decode_that_fails_falls_back_to_the_rollout_blocks(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pdt.train.curriculum_eval as CE

    def fail(_st: object) -> list:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CE, "decoded_readiness", fail)
    rollouts = {"every": 2, "rows": 2, "eval_rows": 4, "calibration_prompts": 3, "calibration_tokens": 32}
    status, events = run(stage_preset(3, world["trunk"], init_from=None, rollouts=rollouts))
    assert status == "finished"  # the run ends with its sidecars exported and a γ
    cal = json.loads((checkpoints_root() / "stage3" / "export" / "calibration.json").read_text())
    ready = cal["readiness"]
    assert ready["decoded_blocks"] == 0 and "rollout blocks with no violation" in ready["rule"]
    warnings = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert any("could not decode validation prompts (CUDA out of memory" in w for w in warnings)


# --------------------------------------------------------------------------- one step


def _teacher_window(preset, model, batch):  # noqa: ANN001, ANN202
    """The batch's teacher-forced notes windows, snapshot 0 from its plan targets (as a step builds them)."""
    from pdt.bus import teacher_windows

    snapshot0 = model.planner.snapshot0(batch.plan_targets, batch.plan_targets != IGNORE)
    return teacher_windows(
        snapshot0,
        batch.notes,
        batch.notes_mask,
        batch.pos_round,
        preset.bus,
        preset.sidecars.max_rounds,
        row_example=batch.row_example,
        row_stream=batch.row_stream,
    )


def _model_and_batch(world: dict[str, Path], stage: int = 3, **over):
    preset = stage_preset(stage, world["trunk"], init_from=None, **over)
    torch.manual_seed(0)
    model = PDTModel(load_trunk(world["trunk"]), preset.sidecars)
    ds = open_dataset("ds_curr")
    from pdt.data.tokenizer import load_tokenizer
    from pdt.train.curriculum_data import embed_note_texts, note_texts

    tok = load_tokenizer(world["trunk"])
    records = ds.splits["train"][:4]
    vectors = []
    for rec in records:
        vectors.append(embed_note_texts(note_texts(rec), tok, model.embed_texts, 32, torch.device("cpu")))
    batch = collate(records, vectors, preset, tok.eot_id, ds.stride)
    return preset, model, batch, records, tok


def test_collate_rows_labels_rounds_and_blocks(world: dict[str, Path]) -> None:
    preset, model, batch, records, tok = _model_and_batch(world)
    k, stride = 3, 16
    for row in range(batch.input_ids.shape[0]):
        rec, j = records[row // k], row % k
        ids = rec["token_ids"][j]
        n_prompt = len(rec["prompt_ids"])
        start = len(ids) - sum(rec["label_mask"][j])
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert batch.input_ids[row, :n_prompt].tolist() == rec["prompt_ids"]
        # Labels: shifted by one, on the section only.
        labelled = (batch.labels[row] != IGNORE).nonzero().squeeze(-1).tolist()
        assert labelled == list(range(start - 1, len(ids) - 1))
        assert batch.labels[row, start - 1].item() == ids[start]
        # Sidecars act on the stream's own tokens, never on the shared prompt.
        assert not batch.sidecar_positions[row, :n_prompt].any()
        assert batch.sidecar_positions[row, n_prompt : len(ids)].all()
        assert batch.pos_round[row, start].item() == 0 and batch.pos_round[row, start + stride].item() == 1
    for m in range(batch.block_row.shape[0]):
        row, pos = int(batch.block_row[m]), int(batch.block_pos[m])
        b, j = divmod(row, k)
        r = int(batch.pos_round[row, pos])
        assert int(batch.block_note[m]) == (b * k + j) * batch.notes.shape[2] + r  # note of its own round
        assert bool(batch.notes_mask.reshape(-1)[batch.block_note[m]])
    assert batch.var_block.numel() > 0 and torch.isin(batch.var_block, batch.last_blocks).all()
    # each corrupted note keeps its kind: the record's variant labels, in order, as CORRUPTIONS indices
    expect = [
        CORRUPTIONS.index(rec["variant_labels"][i])
        for b, rec in enumerate(records)
        for i, stream in enumerate(rec["variant_streams"])
        if any(int(batch.block_row[m]) == b * k + int(stream) for m in range(len(batch.block_row)))
    ]
    assert batch.var_kind.tolist() == expect and len(expect) == batch.var_block.numel()
    assert len(set(expect)) > 1  # the tiny dataset has more than one kind of corruption
    # Speculation-note readiness pairs: every block, against a block of another stream of the same
    # example, of the same round when that stream has one.
    assert batch.spec_own.numel() == batch.block_row.numel()
    for own, sib in zip(batch.spec_own.tolist(), batch.spec_sib.tolist(), strict=True):
        (b1, j1), (b2, j2) = divmod(int(batch.block_row[own]), k), divmod(int(batch.block_row[sib]), k)
        assert b1 == b2 and j1 != j2
        r1 = int(batch.pos_round[b1 * k + j1, batch.block_pos[own]])
        r2 = int(batch.pos_round[b2 * k + j2, batch.block_pos[sib]])
        last = max(i for i in range(len(batch.block_row)) if batch.block_row[i] == b2 * k + j2)
        assert r1 == r2 or sib == last


def test_readiness_content_spans_are_each_blocks_own_tokens(world: dict[str, Path]) -> None:
    """The readiness head's block mean covers exactly the block's section tokens (every one of
    them, the first of a later round included) and its section mean everything written up to it."""
    from pdt.train.curriculum_step import block_starts, written_positions

    preset, model, batch, records, tok = _model_and_batch(world)
    written = written_positions(batch.labels)
    start = block_starts(written, batch.pos_round, batch.block_row, batch.block_pos)
    for m in range(batch.block_row.shape[0]):
        row, s, e = int(batch.block_row[m]), int(start[m]), int(batch.block_pos[m])
        r = int(batch.pos_round[row, e])
        span = [t for t in range(written.shape[1]) if written[row, t] and int(batch.pos_round[row, t]) == r]
        assert span and s == span[0] and e == span[-1], (m, s, e, span[:2], span[-1:])
        assert all(written[row, s : e + 1])
    first_section = [int((written[row]).nonzero()[0]) for row in range(written.shape[0])]
    n_prompt = [len(records[row // 3]["prompt_ids"]) for row in range(written.shape[0])]
    assert all(f > p for f, p in zip(first_section, n_prompt, strict=True))  # never the prompt or prefix


def test_coverage_keys_are_the_item_texts_embeddings(world: dict[str, Path]) -> None:
    """Each row's plan items arrive as the frozen trunk's embedding of their text (in `note_texts`
    order, after the notes and the variants), and the coverage head reads those, unit-normed; a row
    without a text falls back to the planner's learned embedding of the id."""
    from pdt.train.curriculum_data import embed_note_texts

    preset, model, batch, records, tok = _model_and_batch(world)
    k = 3
    for row in range(batch.item_ids.shape[0]):
        texts = records[row // k]["plan_item_texts"][row % k]
        n = len(texts)
        assert int(batch.item_mask[row].sum()) == n and n > 0
        expect = embed_note_texts(list(texts), tok, model.embed_texts, 32, torch.device("cpu"))
        torch.testing.assert_close(batch.item_text[row, :n], expect, atol=1e-5, rtol=1e-5)
        assert not batch.item_text[row, n:].any()
    keys = model.coverage_keys(batch.item_ids, batch.item_text)
    real = batch.item_mask
    torch.testing.assert_close(keys[real], torch.nn.functional.normalize(batch.item_text[real], dim=-1))
    unknown = batch.item_text.clone()
    unknown[0] = 0.0  # row 0: no texts known
    fallback = model.coverage_keys(batch.item_ids, unknown)
    torch.testing.assert_close(fallback[0], model.planner.item_embeddings(batch.item_ids[0]))
    torch.testing.assert_close(fallback[1:], keys[1:])


def test_kd_is_zero_at_init_and_grows_once_sidecars_move(world: dict[str, Path]) -> None:
    preset, model, batch, _, _ = _model_and_batch(world, stage=1)
    plan = StepPlan.from_preset(preset)
    model.set_trainable(list(preset.trained_groups))
    first = step_losses(model, batch, plan, torch.Generator().manual_seed(0))
    assert float(first.parts["kd"]) == 0.0  # sidecars are an exact identity at init
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        step_losses(model, batch, plan, torch.Generator().manual_seed(0)).loss.backward()
        opt.step()
    assert float(step_losses(model, batch, plan, torch.Generator().manual_seed(0)).parts["kd"]) > 1e-5


def test_overfit_every_loss_falls(world: dict[str, Path]) -> None:
    # KD off: on a fixed batch it pulls the LM back towards the (random) trunk, which is its job.
    preset, model, batch, _, _ = _model_and_batch(world, stage=3, bus_mix_prob=0.0, losses={"kd": 0.0})
    plan = StepPlan.from_preset(preset)
    params = model.set_trainable(list(preset.trained_groups))
    opt = torch.optim.Adam(params, lr=1e-2)
    history: list[dict[str, float]] = []
    for _ in range(40):
        opt.zero_grad()
        res = step_losses(model, batch, plan, torch.Generator().manual_seed(0))
        res.loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in res.parts.items()})
    assert all(math.isfinite(v) for h in history for v in h.values())
    for name in ("plan", "notes", "speculation", "coverage", "readiness", "stream"):
        start, end = history[0][name], history[-1][name]
        assert end < 0.85 * start, f"{name}: {start:.4f} -> {end:.4f}"
    # The LM is a frozen random trunk plus rank-8 adapters behind gates that start at 0.018: it
    # moves slowly, but on one fixed batch it must move down.
    assert history[-1]["lm"] < history[0]["lm"] - 0.05, (history[0]["lm"], history[-1]["lm"])


def test_bus_mixing_sends_gradient_into_the_speculation_head(world: dict[str, Path]) -> None:
    preset, model, batch, _, _ = _model_and_batch(world, stage=2, bus_mix_prob=1.0)
    plan = StepPlan.from_preset(preset)
    model.set_trainable(["speculation", "snc"])
    # Open the notes path so the LM loss depends on the notes: W_o non-zero, gates wide open.
    with torch.no_grad():
        for snc in model.snc:
            snc.w_o.weight.normal_(std=0.5)
            snc.gate.fill_(4.0)
    res = step_losses(
        model,
        batch,
        plan.__class__(**{**plan.__dict__, "weights": preset.losses.model_copy(update={"speculation": 0.0})}),
        torch.Generator().manual_seed(0),
    )
    res.loss.backward()
    grad = model.speculation_head.parameters().__next__().grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_plan_mixing_reads_the_planners_own_plan_as_snapshot_0(world: dict[str, Path], monkeypatch) -> None:  # noqa: ANN001
    """plan_mix_prob: that share of examples reads snapshot 0 built from the planner's own plan (each
    slot's argmax, repeats once: what the decoder reads), the rest the teacher's plan, as the step's
    generator draws; evaluation reads the teacher's plan, and the planner's only as its
    counterfactual bus."""
    import pdt.train.curriculum_step as cs

    preset, model, batch, _, _ = _model_and_batch(world, stage=3, losses={"kd": 0.0})
    seen: list[torch.Tensor] = []
    real = cs._read_bus

    def spy(model, batch, plan, snapshot0, notes, notes_mask):  # noqa: ANN001, ANN202
        seen.append(snapshot0.detach().clone())
        return real(model, batch, plan, snapshot0, notes, notes_mask)

    monkeypatch.setattr(cs, "_read_bus", spy)
    with torch.no_grad():
        pool = model.forward_base(batch.prompt_ids, batch.prompt_mask).hidden
        logits = model.planner.logits(pool, batch.prompt_mask)
        teacher = model.planner.snapshot0(batch.plan_targets, batch.plan_targets != IGNORE)
        own = model.planner.snapshot0(*model.planner.own_plan(logits))
    assert (own - teacher).abs().max() > 1e-3  # an untrained planner's plan is not the teacher's
    base = StepPlan.from_preset(preset)
    for p, want in ((0.0, teacher), (1.0, own)):
        seen.clear()
        gen = torch.Generator().manual_seed(0)
        step_losses(model, batch, dataclasses.replace(base, plan_mix_prob=p), gen)
        torch.testing.assert_close(seen[0], want)
    # a share: each example one or the other, as the step's generator draws
    seen.clear()
    gen = torch.Generator().manual_seed(1)
    mix = torch.rand(own.shape[0], generator=torch.Generator().manual_seed(1)) < 0.5
    step_losses(model, batch, dataclasses.replace(base, plan_mix_prob=0.5), gen)
    torch.testing.assert_close(seen[0], torch.where(mix[:, None], own, teacher))
    assert 0 < int(mix.sum()) < len(mix)
    seen.clear()  # evaluation: the teacher's plan; the planner's as the "planner" counterfactual
    step_losses(model, batch, dataclasses.replace(base, plan_mix_prob=1.0), gen, evaluate=True)
    torch.testing.assert_close(seen[0], teacher)
    assert any(torch.allclose(x, own) for x in seen[1:])


def test_the_planners_own_plan_is_each_slots_argmax_once() -> None:
    from pdt.model.sidecars.planner import Planner

    logits = torch.full((2, 4, 6), -1.0)
    for b, row in enumerate([[3, 1, 3, 5], [2, 2, 2, 0]]):
        for s, i in enumerate(row):
            logits[b, s, i] = 1.0
    ids, active = Planner.own_plan(logits)
    assert ids.tolist() == [[3, 1, 3, 5], [2, 2, 2, 0]]
    assert active.tolist() == [[True, True, False, True], [True, False, False, True]]


def test_rollout_labels_come_from_what_the_block_says() -> None:
    from pdt.train.rollouts import label_block

    own, sibling = ["Paris"], ["Napoleon", "1815"]
    assert label_block("The city of Paris grew.", own, sibling, ["Napoleon lost in 1815."]) == "ok"
    assert label_block("Then Napoleon arrived.", own, sibling, []) == "ownership"
    assert label_block("Paris, like Napoleon", ["Paris", "Napoleon"], sibling, []) == "ok"  # shared item: own
    dup = "he lost the battle of waterloo in june"
    assert label_block("he lost the battle of waterloo", own, [], [dup]) == "duplication"


def test_cached_rollout_sampling_equals_a_teacher_forced_pass_over_what_it_sampled(
    world: dict[str, Path],
) -> None:
    """The rollout samples with a KV cache (one prefill, then one batched step a token); the hidden
    states it returns — every row's teacher context, then its sampled block — are those one
    teacher-forced forward over the sampled rows gives, and so are the logits each token was drawn
    from (checked through the next-token argmax at temperature → 0)."""
    from pdt.bus import TeacherWindow
    from pdt.train.curriculum_step import block_starts, written_positions
    from pdt.train.rollouts import _sample_blocks
    from tests.model.test_pdt_model import open_gates

    preset, model, batch, records, tok = _model_and_batch(world, stage=3)
    open_gates(model, snc=True, adapters=True)  # sidecars that change the states (trained-looking)
    window = _teacher_window(preset, model, batch)
    m = batch.block_row.shape[0]
    pick = torch.randperm(m, generator=torch.Generator().manual_seed(3))[:5]
    row, end = batch.block_row[pick], batch.block_pos[pick]
    written = written_positions(batch.labels[row])
    start = block_starts(written, batch.pos_round[row], torch.arange(len(row)), end)
    assert (
        int((end - start).max()) > 0 and len(set(start.tolist())) > 1
    )  # blocks of several tokens, rows apart
    sub = TeacherWindow(
        notes=window.notes[row],
        producer=window.producer[row],
        rounds=window.rounds[row],
        visible=window.visible[row],
        row_stream=window.row_stream[row],
        row_example=window.row_example[row],
    )
    for temperature in (1.0, 1e-4):  # sampled, and (near) greedy
        ids = batch.input_ids[row].clone()
        with torch.no_grad():
            hidden = _sample_blocks(
                model, batch, sub, ids, row, start, end, temperature, torch.Generator().manual_seed(1)
            )
            e = int(end.max()) + 1
            full = model.forward_teacher(
                ids[:, :e],
                torch.ones_like(ids[:, :e]),
                batch.row_stream[row],
                TeacherWindow(
                    sub.notes, sub.producer, sub.rounds, sub.visible[:, :e], sub.row_stream, sub.row_example
                ),
                g=1.0,
                sidecar_positions=batch.sidecar_positions[row, :e],
            )
        for i in range(len(row)):
            upto = int(end[i]) + 1
            torch.testing.assert_close(hidden[i, :upto], full.hidden[i, :upto], atol=2e-5, rtol=1e-4)
            if temperature < 1e-3:  # each sampled token is the full pass's argmax at the position before
                s0 = int(start[i])
                want = full.logits[i, s0 - 1 : upto - 1].argmax(-1)
                assert ids[i, s0:upto].tolist() == want.tolist()
        assert not torch.equal(ids, batch.input_ids[row])  # it did write samples


def test_stage3_rollouts_sample_blocks_and_label_them(world: dict[str, Path]) -> None:
    from pdt.train.rollouts import rollout_examples

    preset, model, batch, records, tok = _model_and_batch(world, stage=3)
    window = _teacher_window(preset, model, batch)
    cudnn: list[bool] = []  # each trunk pass: a new length each token, so off cuDNN attention
    hook = model.trunk.register_forward_pre_hook(
        lambda *_: cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    try:
        ex = rollout_examples(model, batch, window, records, tok, 5, 1.0, torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert len(cudnn) > 2 and not any(cudnn)
    assert ex is not None and ex.state.shape == (5, 32) and ex.note.shape == (5, 16)
    assert set(ex.reasons) <= {"ok", "ownership", "duplication"}
    assert ex.labels.tolist() == [1.0 if r == "ok" else 0.0 for r in ex.reasons]
    assert all(t for t in ex.texts)  # a random trunk samples something for every block
    rollouts = {"every": 1, "rows": 3, "eval_rows": 4}
    status, events = run(stage_preset(3, world["trunk"], init_from=None, rollouts=rollouts))
    assert status == "finished"
    assert any(isinstance(e, Metric) and e.name == "train/rollout_violations" for e in events)
    # The evaluation scores the head on the model's own blocks of validation examples too.
    blocks = [e.value for e in events if isinstance(e, Metric) and e.name == "eval/rollout_blocks"]
    rates = [e.value for e in events if isinstance(e, Metric) and e.name == "eval/rollout_violation_rate"]
    assert blocks and all(0 < b <= 4 for b in blocks)  # ≤ eval_rows of the one eval batch
    assert rates and all(0.0 <= r <= 1.0 for r in rates)


def test_copied_rollout_blocks_repeat_a_sibling_and_are_scored_apart(world: dict[str, Path]) -> None:
    """`rollouts.copy_share`: that share of the rollout blocks writes a sibling's opening tokens in
    the block's place (the rest are sampled as before); the text is then labelled by the same rules,
    so a copy of a few words is a violation. The evaluation reports the head on the copies against
    the model's own good blocks (`readiness_auc_copies`), and keeps the model's own violation rate."""
    from pdt.train.rollouts import rollout_examples

    preset, model, batch, records, tok = _model_and_batch(world, stage=3)
    window = _teacher_window(preset, model, batch)
    k = int(batch.row_stream.max()) + 1
    ex = rollout_examples(model, batch, window, records, tok, 6, 1.0, torch.Generator().manual_seed(1), 0.5)
    assert ex is not None and ex.copied is not None and ex.copied.tolist() == [True] * 3 + [False] * 3
    for i in range(3):  # each copy is the opening of another stream's section of the same example
        b, j = divmod(int(ex.rows[i]), k)
        openings = [
            tok.decode(
                [t for t, m in zip(records[b]["token_ids"][s], records[b]["label_mask"][s], strict=True) if m]
            )
            for s in range(k)
            if s != j
        ]
        assert any(o.startswith(ex.texts[i]) for o in openings), ex.texts[i]
    # a copy of five words or more repeats two of the sibling's 3-grams, or names its plan items
    words = [len(t.split()) for t in ex.texts[:3]]
    assert max(words) >= 5
    assert all(r != "ok" for r, w in zip(ex.reasons[:3], words, strict=True) if w >= 5)
    rollouts = {"every": 1, "rows": 4, "eval_rows": 8, "copy_share": 0.5}
    status, events = run(stage_preset(3, world["trunk"], init_from=None, rollouts=rollouts))
    assert status == "finished"
    metric = {e.name: e.value for e in events if isinstance(e, Metric)}
    assert metric["eval/rollout_copies"] == 4 and metric["eval/rollout_blocks"] == 4
    assert 0.0 <= metric["eval/readiness_auc_copies"] <= 1.0


def _planted_repeats(world: dict[str, Path]):  # noqa: ANN202
    """Rollout blocks of a random trunk with, in each block that can, a sibling's 3-gram written at
    its start where the window covers that sibling's round: (preset, model, batch, examples,
    [(block, flat index of the predicting position, token)])."""
    from pdt.train.curriculum_step import written_positions
    from pdt.train.rollouts import rollout_examples

    preset, model, batch, records, tok = _model_and_batch(world, stage=3)
    window = _teacher_window(preset, model, batch)
    k = int(batch.row_stream.max()) + 1
    ex = rollout_examples(model, batch, window, records, tok, 8, 1.0, torch.Generator().manual_seed(1))
    assert ex is not None and ex.ids is not None and ex.window is not None
    written = written_positions(batch.labels)
    width = ex.ids.shape[1]
    planted = []
    for i, r in enumerate(ex.rows.tolist()):
        b, j = divmod(r, k)
        start, end = int(ex.start[i]), int(ex.end[i])
        if end - start < 3:
            continue
        p = start + 2  # the token that completes the planted 3-gram
        seen: dict[int, int] = {}
        for q in torch.nonzero(ex.window.visible[i, p - 1]).flatten().tolist():
            sj, u = int(ex.window.producer[i, q]), int(ex.window.rounds[i, q])
            if sj != j and sj < k:
                seen[sj] = max(seen.get(sj, -1), u)
        own = batch.input_ids[r][written[r]].tolist()
        own_grams = {tuple(own[n : n + 3]) for n in range(len(own) - 2)}
        for sj, u in seen.items():
            sib = b * k + sj
            tokens = batch.input_ids[sib][written[sib] & (batch.pos_round[sib] <= u)].tolist()
            fresh = [
                g for g in (tuple(tokens[n : n + 3]) for n in range(len(tokens) - 2)) if g not in own_grams
            ]
            if fresh:
                ex.ids[i, start : start + 3] = torch.tensor(fresh[0])
                planted.append((i, i * width + p - 1, fresh[0][2]))
                break
    assert planted, "no rollout block saw a sibling's note: the test world needs a block past round Δ"
    return preset, model, batch, ex, planted


def test_sampled_tokens_that_repeat_a_visible_sibling_3gram_are_found(world: dict[str, Path]) -> None:
    """`rollouts.sibling_repeats`: a sampled token that completes a 3-gram of a sibling's section in
    the rounds its window holds notes of is a repeat; the same 3-gram where no sibling's note covers
    it, or a copied (forced) token, is not."""
    from pdt.train.rollouts import sibling_repeats

    _, _, batch, ex, planted = _planted_repeats(world)
    k = int(batch.row_stream.max()) + 1
    at, tokens, looked = sibling_repeats(batch, ex)
    found = dict(zip(at.tolist(), tokens.tolist(), strict=True))
    assert looked == sum(int(e) - max(int(s), 2) + 1 for s, e in zip(ex.start, ex.end, strict=True))
    for _, flat, token in planted:
        assert found.get(flat) == token
    # the same 3-gram where no sibling's note covers it: the block's window emptied of siblings' notes
    i, flat, _ = planted[0]
    j = int(ex.rows[i]) % k
    hidden = ex.window.visible.clone()
    hidden[i] &= ((ex.window.producer[i] == j) | (ex.window.producer[i] >= k))[None, :]
    blind = dataclasses.replace(ex, window=dataclasses.replace(ex.window, visible=hidden))
    assert flat not in sibling_repeats(batch, blind)[0].tolist()
    # a forced (copied) token is not the model's draw
    forced = torch.full_like(ex.ids, -1)
    forced[i, int(ex.start[i]) + 2] = ex.ids[i, int(ex.start[i]) + 2]
    copied = dataclasses.replace(ex, forced=forced)
    again = sibling_repeats(batch, copied)
    assert flat not in again[0].tolist() and again[2] == looked - 1


def test_the_on_policy_sibling_term_trains_the_snc_only(world: dict[str, Path]) -> None:
    """`losses.sibling_rollout`: the planted repeats' −log(1 − p), read through the bus; its gradient
    reaches the SNC and not the adapters (which `independent` runs too), though the forward runs
    through both; reported with the repeat counts; a stage that trains no SNC skips it."""
    from pdt.train.curriculum_step import LOSS_GROUPS
    from tests.model.test_pdt_model import open_gates

    preset, model, batch, ex, planted = _planted_repeats(world)
    open_gates(model)
    weights = preset.losses.model_copy(update={n: 0.0 for n in LOSS_GROUPS} | {"sibling_rollout": 1.0})
    plan = dataclasses.replace(StepPlan.from_preset(preset), weights=weights)
    assert {"snc", "adapters"} <= plan.groups
    model.set_trainable(sorted(plan.groups))
    res = step_losses(model, batch, plan, torch.Generator().manual_seed(0), rollout_fn=lambda *_: ex)
    assert float(res.parts["sibling_rollout"]) > 0
    term = float(res.parts["sibling_rollout"])
    assert float(res.loss.detach()) == pytest.approx(term, rel=1e-5)  # the surrogate keeps its value
    repeats, looked = res.scores["rollout_repeats"].tolist()
    assert len(planted) <= repeats <= looked
    res.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.snc.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.adapters.parameters())
    assert LOSS_GROUPS["sibling_rollout"] == ("snc",)
    assert not dataclasses.replace(plan, groups=frozenset({"adapters", "lora"})).wants("sibling_rollout")


def test_cached_trunk_outputs_match_the_live_pass(world: dict[str, Path]) -> None:
    from pdt.train.trunk_cache import TrunkCacheEntry, attach, compute_batch

    preset, model, batch, _, _ = _model_and_batch(world, stage=3)
    plan = StepPlan.from_preset(preset)
    live = step_losses(model, batch, plan, torch.Generator().manual_seed(0), evaluate=True)
    entries = [TrunkCacheEntry(**e) for e in compute_batch(model, batch, 16)]
    cached_batch = attach(batch, entries, torch.device("cpu"))
    cached = step_losses(model, cached_batch, plan, torch.Generator().manual_seed(0), evaluate=True)
    assert torch.allclose(cached.row_ce, live.row_ce, atol=1e-4)
    assert torch.allclose(cached.base_row_ce, live.base_row_ce, atol=1e-4)  # trunk CE from the cache
    assert float(cached.parts["kd"]) < 1e-6  # identity sidecars: coarsened KL is 0
    assert torch.allclose(cached.parts["plan"], live.parts["plan"], atol=1e-5)  # pooled prompt from the cache
    # Top-k KD never exceeds the full KL and grows with it once the logits differ.
    from pdt.train.trunk_cache import kd_topk

    teacher = torch.randn(6, 50)
    student = teacher + 0.5 * torch.randn(6, 50)
    top = torch.log_softmax(teacher, -1).topk(8)
    coarse = kd_topk(torch.log_softmax(student, -1), top.indices, top.values)
    from pdt.train.losses import kd_kl

    assert 0.0 < float(coarse) <= float(kd_kl(student, teacher)) + 1e-6


def test_foreign_ce_reads_another_examples_notes_or_bus(world: dict[str, Path]) -> None:
    from pdt.data.tokenizer import load_tokenizer
    from pdt.train.sibling_repeats import content_vocab
    from tests.model.test_pdt_model import open_gates

    preset, model, batch, records, tok = _model_and_batch(world, stage=3)
    vectors = [batch.notes.new_zeros(len(note_texts(r)), batch.notes.shape[-1]) for r in records]
    collate_args = (records, vectors, preset, tok.eot_id, 16)
    plan = StepPlan.from_preset(preset)

    @torch.no_grad()  # as the curriculum's evaluation runs it
    def run_eval(b: CurriculumBatch) -> StepResult:
        return step_losses(model, b, plan, torch.Generator().manual_seed(0), evaluate=True)

    assert not run_eval(batch).foreign_sibling  # no negatives in the batch: no such terms
    tok = load_tokenizer(world["trunk"])
    full = collate(*collate_args, content_vocab(tok, tok.vocab_size), True)
    batch = dataclasses.replace(batch, sibling_ids=full.sibling_ids, sibling_next_ids=full.sibling_next_ids)
    terms = {"sibling_ul", "sibling_next"}
    res = run_eval(batch)
    assert set(res.foreign_row_ce) == {"notes", "bus", "planner"} == set(res.foreign_sibling)
    assert terms <= set(res.parts)
    for ce in res.foreign_row_ce.values():  # identity sidecars: the bus changes nothing
        torch.testing.assert_close(ce, res.row_ce)
    for foreign in res.foreign_sibling.values():
        assert set(foreign) == terms
        for term, value in foreign.items():
            torch.testing.assert_close(value, res.parts[term])
    open_gates(model, snc=True)  # SNC reads the bus now
    res = run_eval(batch)
    notes, bus = res.foreign_row_ce["notes"], res.foreign_row_ce["bus"]
    assert (notes - res.row_ce).abs().max() > 1e-3 and (bus - notes).abs().max() > 1e-3
    # the planner's own plan as snapshot 0 (an untrained planner: not the teacher's plan)
    assert (res.foreign_row_ce["planner"] - res.row_ce).abs().max() > 1e-3
    for term in terms:  # (small probabilities on a random trunk: compared relative to the term)
        own, foreign = float(res.parts[term]), float(res.foreign_sibling["notes"][term])
        assert own > 0 and abs(foreign - own) > 1e-4 * own, term
    # every example holding example 0's notes: "another example's notes" are the same notes, and
    # the foreign bus differs from them by its snapshot 0 alone
    same = dataclasses.replace(
        batch,
        notes=batch.notes[:1].expand_as(batch.notes).clone(),
        notes_mask=batch.notes_mask[:1].expand_as(batch.notes_mask).clone(),
    )
    res = run_eval(same)
    torch.testing.assert_close(res.foreign_row_ce["notes"], res.row_ce)
    assert (res.foreign_row_ce["bus"] - res.row_ce).abs().max() > 1e-3


def test_torchrun_two_processes_train_one_stage(world: dict[str, Path], tmp_path: Path) -> None:
    """DDP by hand: both ranks read the caches rank 0 built, average gradients, rank 0 saves."""
    import subprocess

    from tests.conftest import MAIN, PYTHON, child_env

    preset = stage_preset(
        3, world["trunk"], name="ddp3", init_from=None, bus_mix_prob=0.5, train={"steps": 3}
    )
    path = tmp_path / "ddp3.json"
    path.write_text(json.dumps(preset.model_dump(mode="json")), encoding="utf-8")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", MAIN]
    env = child_env(tmp_path, PDT_PRESET=str(path), PDT_DEVICE="cpu", PDT_DATA_DIR=str(world["data"]))
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "ddp3" / "current" / "state.json").read_text())
    assert state["finished"] and state["world_size"] == 2 and len(state["data"]) == 2 and state["step"] == 3
    assert (tmp_path / "checkpoints" / "ddp3" / "export" / "calibration.json").is_file()


def test_plan_names_take_the_commonest_text_of_each_id() -> None:
    from pdt.train.curriculum_data import plan_names

    records = [
        {"plan_item_ids": [[5, 7], [9]], "plan_item_texts": [["Moon", "Apollo"], ["Luna"]]},
        {"plan_item_ids": [[5], [7, 7]], "plan_item_texts": [["Moon"], ["Apollo", "Saturn V"]]},
        {"plan_item_ids": [[5]], "plan_item_texts": [["Mond"]]},  # a hash collision: 5 is mostly Moon
    ]
    assert plan_names(records) == {"5": "Moon", "7": "Apollo", "9": "Luna"}


def test_item_vectors_round_trip_and_a_file_that_does_not_fit_is_a_message(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from pdt.train.curriculum_data import read_item_vectors, write_item_vectors

    path = tmp_path / "plan_item_vectors.safetensors"
    vectors = torch.randn(3, 8)
    write_item_vectors(path, ["Moon", "Apollo", "Luna"], vectors, 16)
    texts, got = read_item_vectors(path, 8, 16)
    assert texts == ["Moon", "Apollo", "Luna"] and torch.equal(got, vectors)
    with pytest.raises(ValueError, match="d_n 8 over 16 tokens.*d_n 4 and the demo embeds 32"):
        read_item_vectors(path, 4, 32)
    save_file({"vectors": vectors}, str(path), metadata={"texts": json.dumps(["Moon"]), "note_tokens": "16"})
    with pytest.raises(ValueError, match=r"texts \(1\) do not match vectors of shape \(3, 8\)"):
        read_item_vectors(path, 8, 16)
    save_file({"other": vectors}, str(path))
    with pytest.raises(ValueError, match="plan_item_vectors.safetensors: unreadable"):
        read_item_vectors(path, 8, 16)


@pytest.mark.parametrize("term", ["sibling_ul", "sibling_next"])
def test_sibling_terms_read_the_batch_negatives_and_train_the_lm_path(
    world: dict[str, Path], term: str
) -> None:
    """With `losses.sibling_ul` (`sibling_next`) on, the batch carries each labelled position's
    negatives: name-like ids a sibling wrote in a round its window covers, none of the row's own
    (the tokens a sibling wrote after the position's last two tokens, never the true next one).
    The step reports the term, and its gradient alone moves the SNC and adapters so that it falls."""
    from pdt.data.tokenizer import load_tokenizer
    from pdt.train.sibling_repeats import content_vocab

    preset, model, batch, records, tok = _model_and_batch(
        world, stage=1, losses={"lm": 0.0, "kd": 0.0, "stream": 0.0, term: 1.0}
    )
    assert batch.sibling_ids is None and batch.sibling_next_ids is None  # not asked for: none
    tok = load_tokenizer(world["trunk"])
    vectors = [torch.zeros(len(note_texts(r)), 16) for r in records]
    vocab = content_vocab(tok, tok.vocab_size)
    names = term == "sibling_ul"
    batch = collate(records, vectors, preset, tok.eot_id, 16, vocab if names else None, not names)
    neg = batch.sibling_ids if names else batch.sibling_next_ids
    assert (batch.sibling_next_ids if names else batch.sibling_ids) is None
    assert neg is not None and neg.shape[0] == batch.label_targets.shape[0]
    assert int((neg >= 0).sum()) > 0
    k = 3
    for i in range(neg.shape[0]):
        row, t = int(batch.label_rows[i]), int(batch.label_flat[i]) % batch.input_ids.shape[1]
        ids = [x for x in neg[i].tolist() if x >= 0]
        own = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        sibling_rows = [batch.input_ids[row - row % k + s].tolist() for s in range(k) if s != row % k]
        if names:
            siblings = {x for r in sibling_rows for x in r}
            assert all(vocab.name_like[x] and x not in own and x in siblings for x in ids)
        else:
            pair = (own[t - 1], own[t])
            after = {r[p + 2] for r in sibling_rows for p in range(len(r) - 2) if (r[p], r[p + 1]) == pair}
            assert all(x in after and x != own[t + 1] for x in ids)
    plan = StepPlan.from_preset(preset)
    params = model.set_trainable(list(preset.trained_groups))
    with torch.no_grad():  # open the LM path so the one loss can move it within a few steps
        for snc in model.snc:
            snc.gate.fill_(0.0)
    opt = torch.optim.Adam(params, lr=1e-2)
    history = []
    for _ in range(8):
        opt.zero_grad()
        res = step_losses(model, batch, plan, torch.Generator().manual_seed(0))
        res.loss.backward()
        opt.step()
        history.append(float(res.parts[term]))
    assert term in res.parts and "lm" not in res.parts
    assert history[-1] < 0.9 * history[0], history
