"""pdt.train.checkpoint: round trip, rotation, SIGKILL mid-save, damaged slots, disk faults."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pdt.train import checkpoint as ck
from pdt.train.checkpoint import SLOTS, CheckpointError, CheckpointManager

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("ckpt_child.py")


class TiedLM(nn.Module):
    """Embedding and LM head share one weight, as in GPT-2 / nanoGPT."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(self.emb(ids))))


def _save(manager: CheckpointManager, step: int) -> Path:
    return manager.save(
        step=step,
        tensors={"model": {"w": torch.full((8, 8), float(step))}},
        objects={"optimizer": {"step": torch.tensor(step)}},
        state={"tokens_seen": 10 * step},
    )


def _slot_steps(root: Path) -> dict[str, int | None]:
    """Step of each slot as the user sees it, read through the symlink."""
    out: dict[str, int | None] = {}
    for slot in SLOTS:
        state = root / slot / "state.json"
        out[slot] = json.loads(state.read_text())["step"] if state.exists() else None
    return out


def _folder(root: Path, slot: str) -> Path:
    return root / os.readlink(root / slot)


# --------------------------------------------------------------------------- round trip


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }


def test_round_trip_tensors_objects_state_and_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    base = torch.randn(4, 5)
    extra = {
        "bf16": torch.randn(3, 7).to(torch.bfloat16),
        "ids": torch.arange(9, dtype=torch.int64),
        "transposed": torch.randn(5, 3).t(),
        "base": base,
        "row_of_base": base[1],
    }
    assert not extra["transposed"].is_contiguous()
    rng = _rng_states()
    expect_torch, expect_py, expect_np = torch.rand(3), random.random(), np.random.rand()
    state = {"tokens_seen": 1234, "data": [{"cursor": 5}], "stage": "pretrain"}
    manager = CheckpointManager(tmp_path / "ck")
    path = manager.save(
        step=7,
        tensors={"model": model.state_dict(), "extra": extra},
        objects={"optimizer": opt.state_dict(), "rng": rng},
        state=state,
    )

    assert path.name.startswith("ckpt-00000007-") and path.is_dir()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["aliases"]["model.safetensors"] == {"head.weight": "emb.weight"}
    assert set(manifest["files"]) == {
        "model.safetensors",
        "extra.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    }
    loaded = CheckpointManager(tmp_path / "ck").load()
    assert loaded is not None and loaded.slot == "current" and loaded.warnings == []
    assert loaded.path.resolve() == path.resolve()
    assert loaded.state == {**state, "step": 7}

    for name, t in extra.items():
        got = loaded.tensors["extra"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    sd = loaded.tensors["model"]
    assert sd["head.weight"] is sd["emb.weight"]
    fresh = TiedLM()
    fresh.load_state_dict(sd, strict=True)
    assert fresh.head.weight is fresh.emb.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(loaded.objects["optimizer"])
    _assert_same_optimizer(fresh_opt.state_dict(), opt.state_dict())
    _restore_rng(loaded.objects["rng"])
    assert torch.equal(torch.rand(3), expect_torch)
    assert random.random() == expect_py and np.random.rand() == expect_np


def _assert_same_optimizer(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"]) and want["state"]
    for key, st in want["state"].items():
        for field_name, value in st.items():
            assert torch.equal(got["state"][key][field_name], value), (key, field_name)


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    keys = rng["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, rng["numpy"]["pos"], 0, 0.0))


def test_object_that_weights_only_load_would_refuse_is_rejected_at_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="weights_only"):
        manager.save(step=1, tensors={}, objects={"rng": {"numpy": np.zeros(3)}}, state={})
    assert list(tmp_path.iterdir()) == []
    assert manager.load() is None


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "never-created")
    assert manager.load() is None and manager.current_state() is None


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_three_and_deletes_the_oldest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    folders = [_save(manager, step) for step in (1, 2, 3, 4)]
    assert _slot_steps(tmp_path) == {"current": 4, "prev": 3, "prev2": 2}
    for slot in SLOTS:
        assert (tmp_path / slot).is_symlink() and not os.path.isabs(os.readlink(tmp_path / slot))
    assert not folders[0].exists() and all(f.is_dir() for f in folders[1:])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")) == sorted(
        f.name for f in folders[1:]
    )
    assert not list(tmp_path.glob(".tmp-*"))
    assert manager.current_state() == {"tokens_seen": 40, "step": 4}


# --------------------------------------------------------------------------- crash safety


def test_sigkill_mid_save_leaves_previous_current_loadable(tmp_path: Path) -> None:
    root, hold = tmp_path / "ck", tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(root), str(hold), "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not hold.exists():
            assert child.poll() is None, f"child exited early: {child.communicate()[1].decode()[-2000:]}"
            assert time.monotonic() < deadline, "child never reached the save hold"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    partial = list(root.glob(".tmp-ckpt-00000003-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / "manifest.json").exists()

    warnings: list[str] = []
    manager = CheckpointManager(root, warn=warnings.append)
    loaded = manager.load()
    assert loaded is not None and loaded.slot == "current" and loaded.state["step"] == 2
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((64, 64), 2.0))
    assert loaded.warnings == [] and warnings == []
    _save(manager, 3)
    assert not list(root.glob(".tmp-*")) and not partial[0].exists()
    assert _slot_steps(root) == {"current": 3, "prev": 2, "prev2": 1}


# --------------------------------------------------------------------------- damaged slots


def _truncate(folder: Path) -> str:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    return "model.safetensors has"


def _bad_manifest(folder: Path) -> str:
    (folder / "manifest.json").write_text('{"format_version": 1, "files": {')
    return "manifest.json is not valid JSON"


def _flip_byte(folder: Path) -> str:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: same size, still a loadable safetensors file
    f.write_bytes(bytes(data))
    return "sha256 mismatch in model.safetensors"


def _no_manifest(folder: Path) -> str:
    (folder / "manifest.json").unlink()
    return "manifest.json is missing"


DAMAGE = {
    "truncated": _truncate,
    "bad-manifest": _bad_manifest,
    "flipped-byte": _flip_byte,
    "no-manifest": _no_manifest,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_current_falls_back_to_prev_and_is_kept_aside(tmp_path: Path, kind: str) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step)
    damaged = _folder(tmp_path, "current")
    expected = DAMAGE[kind](damaged)
    warnings: list[str] = []
    loaded = CheckpointManager(tmp_path, warn=warnings.append).load()

    assert loaded is not None and loaded.slot == "prev" and loaded.state["step"] == 2
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((8, 8), 2.0))
    assert len(loaded.warnings) == 1 and warnings == loaded.warnings
    message = warnings[0]
    assert "'current'" in message and damaged.name in message and expected in message
    assert "loaded 'prev' (step 2)" in message
    aside = list(tmp_path.glob(f"damaged-{damaged.name}-*"))
    assert len(aside) == 1 and str(aside[0]) in message and not damaged.exists()
    assert (aside[0] / "model.safetensors").exists()
    assert _slot_steps(tmp_path) == {"current": 2, "prev": 1, "prev2": None}

    loaded_folder = loaded.path.resolve()
    _save(manager, 4)
    assert _slot_steps(tmp_path) == {"current": 4, "prev": 2, "prev2": 1}
    assert _folder(tmp_path, "prev").resolve() == loaded_folder
    assert aside[0].is_dir(), "a save must never delete a damaged folder"
    again = CheckpointManager(tmp_path).load()
    assert again is not None and again.state["step"] == 4 and again.warnings == []


def test_damaged_current_and_prev_fall_back_to_prev2(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step)
    _flip_byte(_folder(tmp_path, "current"))
    _truncate(_folder(tmp_path, "prev"))
    loaded = manager.load()
    assert loaded is not None and loaded.slot == "prev2" and loaded.state["step"] == 1
    assert [w.split(" (")[0] for w in loaded.warnings] == ["checkpoint 'current'", "checkpoint 'prev'"]
    _save(manager, 4)
    assert _slot_steps(tmp_path) == {"current": 4, "prev": 1, "prev2": None}
    assert len(list(tmp_path.glob("damaged-*"))) == 2


def test_all_slots_damaged_raises_and_keeps_every_folder(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step)
    reasons = [
        _flip_byte(_folder(tmp_path, "current")),
        _bad_manifest(_folder(tmp_path, "prev")),
        _truncate(_folder(tmp_path, "prev2")),
    ]
    with pytest.raises(CheckpointError) as info:
        manager.load()
    message = str(info.value)
    for slot, reason in zip(SLOTS, reasons, strict=True):
        assert f"'{slot}'" in message and reason in message
    assert "kept" in message
    assert len(list(tmp_path.glob("damaged-ckpt-*"))) == 3
    with pytest.raises(CheckpointError, match="moved aside as damaged"):
        manager.load()  # still refuses: a job must not silently start over the damaged folders


# --------------------------------------------------------------------------- disk faults


def _assert_untouched(root: Path, before: dict[str, str]) -> None:
    assert {s: os.readlink(root / s) for s in SLOTS if (root / s).is_symlink()} == before
    assert not list(root.glob(".tmp-*"))
    assert not list(root.glob("ckpt-00000003-*"))
    loaded = CheckpointManager(root).load()
    assert loaded is not None and loaded.state["step"] == 2 and loaded.warnings == []


@pytest.mark.parametrize("where", ["writing", "switching"])
def test_disk_full_removes_partial_save_and_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    _save(manager, 2)
    before = {s: os.readlink(tmp_path / s) for s in SLOTS if (tmp_path / s).is_symlink()}
    real_write = ck._write_file
    calls: list[Path] = []

    def full_disk(path: Path, *args: object) -> None:
        calls.append(Path(path))
        if where == "writing" and len(calls) == 1:
            return real_write(path, *args)  # first file lands, the second hits a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "writing":
        monkeypatch.setattr(ck, "_write_file", full_disk)
    else:
        monkeypatch.setattr(os, "symlink", full_disk)
    with pytest.raises(CheckpointError) as info:
        _save(manager, 3)
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message
    assert f"Free space on the filesystem holding {tmp_path}" in message
    assert str(calls[-1]) in message
    _assert_untouched(tmp_path, before)
    _save(manager, 3)
    assert _slot_steps(tmp_path) == {"current": 3, "prev": 2, "prev2": 1}


def test_permission_denied_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    _save(manager, 2)
    before = {s: os.readlink(tmp_path / s) for s in SLOTS if (tmp_path / s).is_symlink()}
    tmp_path.chmod(0o555)
    try:
        try:  # as root, chmod does not stop writes: fall back to a monkeypatched EACCES
            (tmp_path / "probe").touch()
            (tmp_path / "probe").unlink()
            chmod_works = False
        except PermissionError:
            chmod_works = True
        if not chmod_works:

            def denied(path: Path, *args: object) -> None:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

            monkeypatch.setattr(ck, "_write_file", denied)
        with pytest.raises(CheckpointError) as info:
            _save(manager, 3)
    finally:
        tmp_path.chmod(0o755)
        monkeypatch.undo()
    message = str(info.value)
    assert "Permission denied" in message and f"Check permissions of {tmp_path}" in message
    _assert_untouched(tmp_path, before)


@pytest.mark.parametrize("failing_replace", [1, 2, 3])
def test_switch_interrupted_at_any_replace_keeps_old_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_replace: int
) -> None:
    """prev2, prev, then current: until the last os.replace, `current` and its `prev` are the old ones."""
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step)
    real_replace, calls = os.replace, []

    def replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == failing_replace:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(manager, 4)
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == list(reversed(SLOTS))[:failing_replace]
    steps = _slot_steps(tmp_path)
    assert steps["current"] == 3 and steps["prev"] in (2, 3)
    assert not list(tmp_path.glob("ckpt-00000004-*")) and not list(tmp_path.glob(".tmp-*"))
    loaded = manager.load()
    assert loaded is not None and loaded.state["step"] == 3 and loaded.warnings == []
    _save(manager, 4)
    assert _slot_steps(tmp_path)["current"] == 4 and _slot_steps(tmp_path)["prev"] == 3
