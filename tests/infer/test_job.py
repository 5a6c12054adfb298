"""The inference job end to end on the CPU: a real exported trunk + saved sidecars → events, the
manifest (validated against its schema, replayable), the baselines, errors and the ask-again loop."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pdt.data.tokenizer import Tokenizer
from pdt.infer.inbox import ask
from pdt.infer.manifest import ManifestError, load_manifest, manifest_events
from pdt.jobs import run_job
from pdt.model.pdt_model import PDTModel
from pdt.model.trunk import build_trunk, export_trunk
from pdt.presets.loader import validate_preset
from pdt.presets.schema import SidecarConfig, TrunkConfig
from pdt.telemetry.sinks import read_events
from tests.conftest import MAIN, PYTHON, child_env
from tests.model.test_pdt_model import open_gates

SIDECARS = SidecarConfig(
    num_streams=3, n_layers=2, d_notes=16, adapter_rank=8, snc_heads=2, d_plan=8, plan_vocab=512
)
PLAN = [["Moon", "orbit"], ["tides", "Earth"], ["Apollo"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer_world")
    tok = Tokenizer(vocab_size=1024)
    cfg = TrunkConfig(
        model_type="llama",
        config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    trunk = build_trunk(cfg, tok.vocab_size, 256, tok.eot_id, seed=0)
    export_trunk(trunk, tok, root / "trunk", {"preset": "test"})
    model = PDTModel(trunk, SIDECARS)
    open_gates(model, snc=True, adapters=True)
    with torch.no_grad():  # readiness scores spread around γ so both decisions happen
        model.agreement_head.out.weight.normal_(0, 2.0)
    folder = model.save_sidecars(root / "sidecars")
    (folder / "calibration.json").write_text(
        json.dumps({"readiness": {"gamma": 0.5}, "coverage": {"threshold": 0.4}}), encoding="utf-8"
    )
    (folder / "training.json").write_text(
        json.dumps(
            {
                "stride": 4,
                "bus": {"lag": 1, "window": 4, "topology": "all_to_all"},
                "stage": 3,
                "coverage_keys": "item_text",
            }
        ),
        encoding="utf-8",
    )
    return {"trunk": root / "trunk", "sidecars": folder}


def preset(world: dict[str, Path], **over) -> object:  # noqa: ANN003
    data = {
        "name": "demo_test",
        "kind": "inference",
        "sidecars": {"path": str(world["sidecars"])},
        "trunk": {"path": str(world["trunk"])},
        "prompt": "Tell me about the Moon.",
        "plan_items": PLAN,
        "decode": {"max_new_tokens": 10, "temperature": 0.8, "max_retries": 1},
        "baselines": ["sequential", "independent"],
        "device": "cpu",
    }
    data.update(over)
    return validate_preset(data, source="test")


def test_sidecars_exported_before_text_coverage_keys_keep_their_id_keys(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """A stage-3 export whose training.json does not say `coverage_keys` (exported before the
    coverage head read items by their text) decodes with the plan-id keys it was trained on and says
    so; the current export reads the text keys; their coverage scores differ."""
    from pdt.infer.job import Session
    from pdt.jobs import JobContext

    old = tmp_path / "old"
    shutil.copytree(world["sidecars"], old)
    training = json.loads((old / "training.json").read_text(encoding="utf-8"))
    del training["coverage_keys"]
    (old / "training.json").write_text(json.dumps(training), encoding="utf-8")
    sessions, logs = {}, {}
    for name, folder in (("new", world["sidecars"]), ("old", old)):
        events: list = []
        p = preset(world, sidecars={"path": str(folder)})
        sessions[name] = Session(
            JobContext(preset=p, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=events.append), p
        )
        logs[name] = " ".join(getattr(e, "message", "") for e in events)
    assert sessions["new"].coverage_text and not sessions["old"].coverage_text
    assert "run stage 3 again" in logs["old"] and "run stage 3 again" not in logs["new"]
    answers = {
        n: s._decoder().decode("Tell me about the Moon.", "pdt", plan_items=PLAN) for n, s in sessions.items()
    }
    cov = {
        n: [a.coverage for rec in r.streams for blk in rec.blocks for a in blk] for n, r in answers.items()
    }
    assert cov["new"] and cov["old"] and cov["new"] != cov["old"]


def test_an_answer_writes_a_valid_replayable_manifest(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_job(preset(world), run_dir, console=False) == 0
    manifest = load_manifest(run_dir / "manifest-0.json")  # validated against the schema
    assert manifest.prompt == "Tell me about the Moon." and manifest.config["tau"] == 4
    assert manifest.config["gamma"] == 0.5 and manifest.config["lag"] == 1
    assert [[c.item for c in cov] for cov in manifest.coverage] == PLAN
    assert all(c.covered == (c.prob >= 0.4) for cov in manifest.coverage for c in cov)
    assert set(manifest.timings) == {"pdt", "sequential", "independent"}
    pdt = manifest.timings["pdt"]
    assert manifest.timings["sequential"].new_tokens == pdt.new_tokens > 0  # the same total
    assert len(pdt.per_token_s) == pdt.generated_tokens >= pdt.new_tokens
    assert manifest.memory["kv_cache_bytes"] > 0
    for s in manifest.streams:  # text == committed attempts; token ids == committed tokens
        committed = [b[-1] for b in s.blocks]
        assert s.token_ids == [t for a in committed for t in a.tokens]
        assert all(a.decision == "rollback" for b in s.blocks for a in b[:-1])
    assert len(manifest.rollbacks) == sum(len(b) - 1 for s in manifest.streams for b in s.blocks)
    assert manifest.rollbacks and manifest.commits  # both decisions happened
    assert manifest.merged == "\n\n".join(s.text.strip() for s in manifest.streams if s.text.strip())
    # the replay is the live event sequence of this answer
    live = [e.to_dict() for e in read_events(run_dir / "events.jsonl")]
    first = next(i for i, e in enumerate(live) if e["kind"] == "decode_started")
    last = next(i for i, e in enumerate(live) if e["kind"] == "answer")
    replay = [e.to_dict() for e in manifest_events(run_dir / "manifest-0.json")]
    assert replay == live[first : last + 1]
    kinds = {e["kind"] for e in replay}
    assert {
        "stream_token",
        "readiness",
        "stream_rollback",
        "note_snapshot",
        "coverage",
        "gate",
        "timing",
    } <= kinds


def test_a_damaged_manifest_is_refused_with_its_field(tmp_path: Path) -> None:
    path = tmp_path / "manifest-0.json"
    path.write_text(json.dumps({"format": "pdt-manifest/1", "prompt": 3}), encoding="utf-8")
    with pytest.raises(ManifestError, match="manifest-0.json"):
        load_manifest(path)


def test_missing_stage_says_which_preset_to_run(world: dict[str, Path], tmp_path: Path) -> None:
    p = preset(world, sidecars={"preset": "stage3_missing"})
    run_dir = tmp_path / "run"
    assert run_job(p, run_dir, console=False) == 1
    error = [e for e in read_events(run_dir / "events.jsonl") if e.kind == "error"][0]
    assert "run the preset 'stage3_missing'" in error.message


def test_plan_names_label_the_planners_plan_and_a_damaged_file_is_a_message(
    world: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "sidecars"
    shutil.copytree(world["sidecars"], folder)
    (folder / "plan_items.json").write_text("{not json", encoding="utf-8")
    p = preset(world, sidecars={"path": str(folder)}, plan_items=None)
    assert run_job(p, tmp_path / "bad", console=False) == 1
    error = [e for e in read_events(tmp_path / "bad" / "events.jsonl") if e.kind == "error"][0]
    assert "plan_items.json" in error.message and "run the stage again" in error.message
    names = {str(i): f"item {i}" for i in range(SIDECARS.plan_vocab)}  # every plan id named
    (folder / "plan_items.json").write_text(json.dumps(names), encoding="utf-8")
    assert run_job(p, tmp_path / "ok", console=False) == 0
    manifest = load_manifest(tmp_path / "ok" / "manifest-0.json")
    assert manifest.plan["source"] == "planner"
    assert manifest.plan["slot_ids"]
    assert manifest.plan["items"][0] == [f"item {i}" for i in manifest.plan["slot_ids"]]


def test_a_damaged_item_vectors_file_is_a_warning_and_the_demo_embeds_instead(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """plan_item_vectors.safetensors only saves work: damaged, the demo warns (naming the file) and
    answers anyway; intact, the session holds its texts and vectors for the decoder."""
    folder = tmp_path / "sidecars"
    shutil.copytree(world["sidecars"], folder)
    (folder / "plan_item_vectors.safetensors").write_bytes(b"not a safetensors file")
    p = preset(world, sidecars={"path": str(folder)}, plan_items=None)
    assert run_job(p, tmp_path / "bad", console=False) == 0
    warnings = [
        e for e in read_events(tmp_path / "bad" / "events.jsonl") if e.kind == "log" and e.level == "warning"
    ]
    assert any("plan_item_vectors.safetensors" in e.message and "unreadable" in e.message for e in warnings)
    # intact: the session hands the file's texts and vectors to its decoder; for other sidecars
    # (another d_n) it is a warning again
    from pdt.infer.job import Session
    from pdt.infer.orchestrator import NOTE_TOKENS
    from pdt.jobs import JobContext
    from pdt.train.curriculum_data import write_item_vectors

    vectors = torch.randn(2, SIDECARS.d_notes)
    write_item_vectors(folder / "plan_item_vectors.safetensors", ["Moon", "Apollo"], vectors, NOTE_TOKENS)
    events: list = []
    session = Session(JobContext(preset=p, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=events.append), p)
    assert session.item_vectors is not None and session.item_vectors[0] == ["Moon", "Apollo"]
    torch.testing.assert_close(session._decoder()._item_table[:2], vectors)
    write_item_vectors(folder / "plan_item_vectors.safetensors", ["Moon"], torch.randn(1, 7), NOTE_TOKENS)
    events.clear()
    assert (
        Session(
            JobContext(preset=p, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=events.append), p
        ).item_vectors
        is None
    )
    assert any("d_n 7" in getattr(e, "message", "") for e in events)


def test_a_mismatched_counterfactual_is_a_message(world: dict[str, Path], tmp_path: Path) -> None:
    p = preset(world, counterfactual={"swap": [0, 7]})
    assert run_job(p, tmp_path / "run", console=False) == 1
    error = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e.kind == "error"][0]
    assert "counterfactual" in error.message and "7" in error.message


def _wait_for(path: Path, kind: str, count: int, proc: subprocess.Popen, timeout: float = 60.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = [e for e in read_events(path)] if path.exists() else []
        if sum(e.kind == kind for e in events) >= count:
            return events
        assert proc.poll() is None, f"the job exited early ({proc.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"no {count} {kind} events after {timeout} s")


def test_serving_answers_a_prompt_from_the_inbox_then_stops(world: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    data = json.loads(preset(world, baselines=[]).model_dump_json())
    path.write_text(json.dumps(data), encoding="utf-8")
    run_dir = tmp_path / "logs" / "demo"
    env = child_env(
        tmp_path, PDT_PRESET=str(path), PDT_RUN_DIR=str(run_dir), PDT_INFER_SERVE="1", PDT_HEADLESS="1"
    )
    proc = subprocess.Popen([PYTHON, MAIN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(run_dir / "events.jsonl", "answer", 1, proc)
        ask(run_dir, "What about Mars?")
        events = _wait_for(run_dir / "events.jsonl", "answer", 2, proc)
        started = [e for e in events if e.kind == "decode_started"]
        assert [e.prompt for e in started] == ["Tell me about the Moon.", "What about Mars?"]
        assert (run_dir / "manifest-1.json").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e.kind for e in read_events(run_dir / "events.jsonl")][-1] == "done"


def test_a_stage4_export_decodes_with_its_lora_and_the_baseline_without(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import save_file

    from pdt.model.trunk import load_trunk
    from pdt.presets.curriculum import LoraSettings
    from pdt.train.lora import attach_lora, lora_state_dict

    folder = tmp_path / "stage4"
    shutil.copytree(world["sidecars"], folder)
    trunk = load_trunk(world["trunk"])
    for p in attach_lora(trunk, LoraSettings(rank=4)):
        with torch.no_grad():
            p.normal_(0, 0.5)  # a LoRA that changes the trunk
    save_file(lora_state_dict(trunk), str(folder / "lora.safetensors"))
    training = json.loads((folder / "training.json").read_text())
    (folder / "training.json").write_text(json.dumps({**training, "lora": {"rank": 4}}))
    decode = {"max_new_tokens": 10, "temperature": 0.0, "max_retries": 0}
    runs = {}
    for name, path in (("plain", world["sidecars"]), ("lora", folder)):
        p = preset(world, sidecars={"path": str(path)}, decode=decode, baselines=["sequential"])
        assert run_job(p, tmp_path / name, console=False) == 0
        runs[name] = load_manifest(tmp_path / name / "manifest-0.json")
    assert [s.token_ids for s in runs["lora"].streams] != [s.token_ids for s in runs["plain"].streams]
    seq = {name: m.baselines["sequential"].token_ids for name, m in runs.items()}
    # The baseline is the trunk as pretrained: greedy, the same tokens; it writes as many as PDT
    # did, which the LoRA changes, so one is a prefix of the other.
    (a,), (b,) = seq["lora"], seq["plain"]
    n = min(len(a), len(b))
    assert n >= 10 and a[:n] == b[:n]


async def test_the_ui_replays_a_manifest(world: dict[str, Path], tmp_path: Path) -> None:
    """The runs screen's replay of a real manifest shows the answer as it was written."""
    from pdt.tui.app import PDTApp
    from pdt.tui.screens.run import RunScreen
    from pdt.tui.screens.runs import manifest_replay
    from tests.tui.conftest import screen_text, wait_until

    run_dir = tmp_path / "run"
    assert run_job(preset(world, baselines=["sequential"]), run_dir, console=False) == 0
    manifest = load_manifest(run_dir / "manifest-0.json")
    source = manifest_replay(run_dir / "manifest-0.json")
    assert [e.kind for e in source.events][:2] == ["run_started", "decode_started"]
    assert source.events[-1].kind == "done"
    app = PDTApp()
    async with app.run_test(size=(160, 48)) as pilot:
        app.open_source(source)
        await wait_until(  # the whole answer applied: every stream done and the baseline timed
            pilot,
            lambda: (
                isinstance(app.screen, RunScreen)
                and "finished" in screen_text(app)
                and app.screen.decode.speedup() is not None
                and all(s.done for s in app.screen.decode.streams)
            ),
            20,
        )
        view = app.screen.decode
        assert [s.committed for s in view.streams] == [s.text for s in manifest.streams]
        assert view.speedup() == pytest.approx(manifest.speedup["e2e_vs_sequential"])


def test_the_presets_decode_knobs_reach_the_decoder(world: dict[str, Path], tmp_path: Path) -> None:
    """`decode.own_snapshot0` (off by default) reaches the decoder's settings and the manifest's config."""
    from pdt.infer.job import Session
    from pdt.jobs import JobContext

    for own in (False, True):
        decode = {"max_new_tokens": 10, "own_snapshot0": own} if own else {"max_new_tokens": 10}
        p = preset(world, decode=decode)
        ctx = JobContext(preset=p, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=lambda e: None)
        session = Session(ctx, p)
        assert session.settings.own_snapshot0 is own
        assert session.settings.as_dict()["own_snapshot0"] is own
