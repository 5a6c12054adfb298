"""The pretrain job end to end, in real child processes: unattended run, exact resume after
SIGKILL, graceful stop, damaged-checkpoint fallback, torchrun with two processes, dry runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pdt.jobs import run_job
from pdt.presets.dryrun import tiny_variant
from pdt.presets.loader import SHIPPED_DIR, load_preset_file
from pdt.telemetry.events import Event, Metric
from tests.conftest import MAIN, PYTHON, TINY_ARCH_CONFIGS, TINY_PRETRAIN, child_env

TINY = TINY_PRETRAIN


def write_preset(tmp: Path, name: str, **overrides: object) -> Path:
    data = json.loads(json.dumps(TINY))
    data["name"] = name
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value)  # type: ignore[union-attr]
    path = tmp / "presets" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def run_main(tmp: Path, preset: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, MAIN],
        env=child_env(tmp, PDT_PRESET=str(preset), **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events_of(tmp: Path, preset_name: str) -> list[list[dict]]:
    """Events of every run of a preset, oldest run first."""
    runs = sorted((tmp / "logs").glob(f"{preset_name}-*"), key=lambda p: p.stat().st_mtime)
    out = []
    for run in runs:
        lines = (run / "events.jsonl").read_text().splitlines()
        out.append([json.loads(line) for line in lines if line.strip()])
    return out


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["value"] for e in events if e["kind"] == "metric" and e["name"] == "train/loss"}


def test_unattended_run_completes_and_exports(tmp_path: Path) -> None:
    preset = write_preset(tmp_path, "tiny_a")
    proc = run_main(tmp_path, preset)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 8/8" in proc.stdout
    (events,) = events_of(tmp_path, "tiny_a")
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "done" and events[-1]["status"] == "finished"
    assert {"progress", "metric", "checkpoint", "sample", "memory", "log"} <= set(kinds)
    assert all("t" in e for e in events)
    assert any(e["kind"] == "metric" and e["name"] == "eval/ppl" for e in events)
    ckpt = tmp_path / "checkpoints" / "tiny_a"
    state = json.loads((ckpt / "current" / "state.json").read_text())
    assert state["step"] == 8 and state["finished"] is True
    assert state["tokenizer"]["vocab_size"] == 1025
    export = ckpt / "export"
    assert (export / "config.json").is_file() and (export / "pdt_tokenizer.json").is_file()
    assert list(export.glob("*.safetensors"))
    # The export is a standard HF folder with the trained weights.
    from safetensors.torch import load_file

    from pdt.model.trunk import load_trunk

    model = load_trunk(export)
    trained = load_file(str(ckpt / "current" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[key], trained[key])
    # Running again after it finished does nothing and says so.
    again = run_main(tmp_path, preset)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_loss_falls(tmp_path: Path) -> None:
    preset = write_preset(tmp_path, "tiny_fall", train={"token_budget": 40 * 32 * 4, "lr": 0.01})
    proc = run_main(tmp_path, preset)
    assert proc.returncode == 0, proc.stderr
    curve = losses(events_of(tmp_path, "tiny_fall")[0])
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (38, 39, 40)) / 3
    assert last < first - 1.0, (first, last)


def _wait_for_checkpoint(
    tmp: Path, name: str, step: int, proc: subprocess.Popen, timeout: float = 240
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list((tmp / "logs").glob(f"{name}-*/events.jsonl"))
        if runs and any(
            '"kind": "checkpoint", "t"' in line and f'"step": {step},' in line
            for line in runs[0].read_text().splitlines()
        ):
            return
        assert proc.poll() is None, "the job ended before the checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step}")


def test_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    # 200 steps, so the child is still training when the kill lands, whatever the machine's speed.
    budget = {"token_budget": 200 * 32 * 4, "eval_every": 1000}
    straight = write_preset(tmp_path, "tiny_straight", train=budget)
    assert run_main(tmp_path, straight).returncode == 0
    reference = losses(events_of(tmp_path, "tiny_straight")[0])
    assert sorted(reference) == list(range(1, 201))

    killed = write_preset(tmp_path, "tiny_killed", train=budget)
    child = subprocess.Popen(
        [PYTHON, MAIN],
        env=child_env(tmp_path, PDT_PRESET=str(killed)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(tmp_path, "tiny_killed", 4, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    resumed = run_main(tmp_path, killed)
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resuming from step (\d+)", resumed.stdout)
    assert match, resumed.stdout[-2000:]
    start = int(match.group(1))
    assert 4 <= start < 200 and start % 4 == 0  # the last checkpoint before the kill
    first, second = events_of(tmp_path, "tiny_killed")
    after = losses(second)
    assert sorted(after) == list(range(start + 1, 201))
    for step, value in losses(first).items():
        assert value == reference[step]
    for step in range(start + 1, 201):
        assert after[step] == reference[step], (step, after[step], reference[step])


def test_sigint_checkpoints_then_exits(tmp_path: Path) -> None:
    preset = write_preset(
        tmp_path, "tiny_stop", train={"token_budget": 400 * 32 * 4}, checkpoint={"every_steps": 1000}
    )
    child = subprocess.Popen(
        [PYTHON, MAIN],
        env=child_env(tmp_path, PDT_PRESET=str(preset)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = list((tmp_path / "logs").glob("tiny_stop-*/events.jsonl"))
        if runs and '"name": "train/loss"' in runs[0].read_text():
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    (events,) = events_of(tmp_path, "tiny_stop")
    assert events[-1] == {**events[-1], "kind": "done", "status": "stopped"}
    saved = [e for e in events if e["kind"] == "checkpoint"]
    assert len(saved) == 1 and 0 < saved[0]["step"] < 400
    state = json.loads((tmp_path / "checkpoints" / "tiny_stop" / "current" / "state.json").read_text())
    assert state["step"] == saved[0]["step"] and state["finished"] is False


def test_damaged_current_falls_back_to_prev(tmp_path: Path) -> None:
    preset = write_preset(tmp_path, "tiny_damage")
    assert run_main(tmp_path, preset).returncode == 0
    ckpt = tmp_path / "checkpoints" / "tiny_damage"
    weights = ckpt / "current" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated file
    more = write_preset(tmp_path, "tiny_damage", train={"token_budget": 12 * 32 * 4})
    proc = run_main(tmp_path, more)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step 4" in proc.stdout  # prev held step 4; current (8) was damaged
    warnings = [
        e["message"]
        for e in events_of(tmp_path, "tiny_damage")[1]
        if e["kind"] == "log" and e["level"] == "warning"
    ]
    assert any("damaged" in w for w in warnings), warnings
    assert list(ckpt.glob("damaged-*")), "the damaged folder must be kept aside"


@pytest.mark.timeout(400)
def test_torchrun_two_processes(tmp_path: Path) -> None:
    preset = write_preset(tmp_path, "tiny_ddp")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", MAIN]
    proc = subprocess.run(
        cmd,
        env=child_env(tmp_path, PDT_PRESET=str(preset), PDT_DEVICE="cpu"),  # gloo on CPU, even on a GPU box
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "logs").glob("tiny_ddp-*"))
    assert len(runs) == 1, runs
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["tiny_ddp"]
    state = json.loads((tmp_path / "checkpoints" / "tiny_ddp" / "current" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2 and state["finished"]
    # 2 ranks x 4 blocks x 32 tokens per step: the budget is reached in half the steps.
    assert state["step"] == 4
    (events,) = events_of(tmp_path, "tiny_ddp")
    assert sum(1 for e in events if e["kind"] == "run_started") == 1


PRETRAIN_PRESETS = [
    p for p in sorted(SHIPPED_DIR.glob("*.json")) if json.loads(p.read_text()).get("kind") == "pretrain"
]


@pytest.mark.parametrize("path", PRETRAIN_PRESETS, ids=[p.stem for p in PRETRAIN_PRESETS])
def test_shipped_preset_dry_run(tmp_path: Path, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Event] = []
    tiny = tiny_variant(load_preset_file(path))
    code = run_job(tiny, tmp_path / "run", console=False, extra_sinks=[seen.append])
    assert code == 0, [e for e in seen if e.kind == "error"]
    assert any(isinstance(e, Metric) and e.name == "train/loss" for e in seen)
    assert (tmp_path / "checkpoints" / tiny.name / "export" / "config.json").is_file()


@pytest.mark.timeout(400)
def test_torchrun_stop_is_agreed_across_ranks(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches torchrun and both workers; they stop at the same step, save once."""
    preset = write_preset(
        tmp_path, "tiny_ddp_stop", train={"token_budget": 4000 * 32 * 4}, checkpoint={"every_steps": 100000}
    )
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", MAIN]
    env = child_env(tmp_path, PDT_PRESET=str(preset), PDT_DEVICE="cpu")
    child = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = list((tmp_path / "logs").glob("tiny_ddp_stop-*/events.jsonl"))
        if runs and '"name": "train/loss"' in runs[0].read_text():
            break
        assert child.poll() is None, child.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
    out, _ = child.communicate(timeout=120)
    (events,) = events_of(tmp_path, "tiny_ddp_stop")
    assert events[-1]["kind"] == "done" and events[-1]["status"] == "stopped", out[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "tiny_ddp_stop" / "current" / "state.json").read_text())
    assert len(state["data"]) == 2 and state["finished"] is False and 0 < state["step"] < 4000


def test_resume_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    preset = write_preset(tmp_path, "tiny_tok")
    assert run_main(tmp_path, preset).returncode == 0
    changed = write_preset(
        tmp_path, "tiny_tok", tokenizer={"vocab_size": 2048}, train={"token_budget": 12 * 32 * 4}
    )
    proc = run_main(tmp_path, changed)
    assert proc.returncode == 1
    assert "another tokenizer" in proc.stdout and "vocab_size" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


ARCHITECTURES = {k: v for k, v in TINY_ARCH_CONFIGS.items() if k != "gpt_oss"}  # gpt_oss: see tests/model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_any_transformers_model_type_trains(tmp_path: Path, model_type: str) -> None:
    from pdt.presets.loader import validate_preset

    data = json.loads(json.dumps(TINY))
    data.pop("extends")
    data.update(
        {
            "name": f"arch_{model_type}",
            "trunk": {"model_type": model_type, "config": ARCHITECTURES[model_type]},
        }
    )
    data["train"]["token_budget"] = 3 * 32 * 4
    seen: list[Event] = []
    assert run_job(validate_preset(data), tmp_path / "run", console=False, extra_sinks=[seen.append]) == 0
    assert len([e for e in seen if isinstance(e, Metric) and e.name == "train/loss"]) == 3
    from pdt.model.trunk import load_trunk

    export = load_trunk(tmp_path / "checkpoints" / f"arch_{model_type}" / "export")
    assert export.config.model_type == model_type


def test_oom_message_names_the_keys_to_lower() -> None:
    from pdt.jobs import user_message

    message = user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert message is not None
    assert "train.micro_batch_size" in message and "train.grad_accum" in message
    assert "resumes from the last checkpoint" in message


def test_disk_full_during_a_save_stops_with_a_message_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pdt.train.checkpoint as ck
    from pdt.telemetry.events import Error

    preset = load_preset_file(write_preset(tmp_path, "tiny_full_disk"))  # `extends` resolved by the loader
    real_write, saves = ck._write_file, []

    def disk_fills_up(path: Path, *args: object) -> None:
        if Path(path).name == "state.json":
            saves.append(path)
        if len(saves) >= 2:  # the first checkpoint lands; the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, *args)

    monkeypatch.setattr(ck, "_write_file", disk_fills_up)
    seen: list[Event] = []
    code = run_job(preset, tmp_path / "run", console=False, extra_sinks=[seen.append])
    assert code == 1
    errors = [e.message for e in seen if isinstance(e, Error)]
    assert errors and "No space left on device" in errors[0] and "Free space" in errors[0]
    assert "Traceback" not in errors[0]
    state = json.loads((tmp_path / "checkpoints" / "tiny_full_disk" / "current" / "state.json").read_text())
    assert state["step"] == 4  # the last good checkpoint is intact


def test_continue_pretraining_from_an_exported_folder(tmp_path: Path) -> None:
    """trunk.source = folder + tokenizer.type = trunk: the export of one run is the start of another."""
    first = write_preset(tmp_path, "tiny_first")
    assert run_main(tmp_path, first).returncode == 0
    export = tmp_path / "checkpoints" / "tiny_first" / "export"
    data = json.loads(first.read_text())
    data.update(
        {
            "name": "tiny_second",
            "trunk": {"source": "folder", "path": str(export)},
            "tokenizer": {"type": "trunk"},
        }
    )
    second = tmp_path / "presets" / "tiny_second.json"
    second.write_text(json.dumps(data))
    proc = run_main(tmp_path, second)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first_losses = losses(events_of(tmp_path, "tiny_first")[0])
    second_losses = losses(events_of(tmp_path, "tiny_second")[0])
    assert second_losses[1] < first_losses[1] - 0.2  # it starts from trained weights, not from scratch


def test_bad_pdt_device_is_named_without_a_traceback(tmp_path: Path) -> None:
    proc = run_main(tmp_path, write_preset(tmp_path, "tiny_device"), timeout=120, PDT_DEVICE="tpu")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "PDT_DEVICE='tpu'" in out and '"cpu", "cuda"' in out
    assert "Traceback" not in out


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdt.train import distributed as D

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("PDT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(D.DistributedSetupError, match="needs GPU 1, but only 1 GPU"):
        D.setup()
