"""Preset validation: shipped presets load; every kind of bad preset gets a precise message."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pdt.presets import PresetError, find_preset, list_presets, load_preset_file
from pdt.presets.dryrun import tiny_variant
from pdt.presets.loader import SHIPPED_DIR
from tests.conftest import MAIN, PYTHON, child_env

SHIPPED = sorted(SHIPPED_DIR.glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_preset_validates(path: Path) -> None:
    preset = load_preset_file(path)
    assert preset.name == path.stem
    assert preset.description, "every shipped preset needs a description for the home screen"
    tiny = tiny_variant(preset)
    assert tiny.name == f"{path.stem}-dryrun"


def test_required_shipped_presets_exist() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"pretrain_tiny", "pretrain_124m"} <= names
    assert all(info.error is None for info in list_presets(SHIPPED_DIR))


def _write(tmp: Path, name: str, data: object | str) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


BAD = {
    "malformed": ('{"name": "malformed", "kind": "pretrain",,}', ["invalid JSON", "line 1"]),
    "unknown_key": (
        {"name": "unknown_key", "kind": "pretrain", "train": {"lrr": 0.1}},
        ["train.lrr", "unknown key", 'did you mean "lr"'],
    ),
    "wrong_type": (
        {"name": "wrong_type", "kind": "pretrain", "train": {"seq_len": "long"}},
        ["train.seq_len", "integer", '"long"'],
    ),
    "impossible": (
        {
            "name": "impossible",
            "kind": "pretrain",
            "trunk": {"config": {"hidden_size": 100, "num_attention_heads": 3}},
        },
        ["hidden_size = 100", "not divisible", "num_attention_heads = 3"],
    ),
    "missing_parent": (
        {"name": "missing_parent", "extends": "no_such_preset.json", "kind": "pretrain"},
        ["extends", "no_such_preset", "not found"],
    ),
    "nested_source": (
        {
            "name": "nested_source",
            "kind": "pretrain",
            "data": {"sources": [{"type": "text_dir", "path": "x", "extnsions": [".txt"]}]},
        },
        ["data.sources[0].extnsions", 'did you mean "extensions"'],
    ),
    "bad_kind": ({"name": "bad_kind", "kind": "pretrian"}, ["unknown kind", 'did you mean "pretrain"']),
    "calibration_tokens_zero": (
        {"name": "calibration_tokens_zero", "extends": "stage3.json", "rollouts": {"calibration_tokens": 0}},
        ["rollouts.calibration_tokens", "greater than or equal to 1", "(got 0)"],
    ),
    "negative_sibling_term": (
        {"name": "negative_sibling_term", "extends": "stage3.json", "losses": {"sibling_next": -1}},
        ["losses.sibling_next", "greater than or equal to 0", "(got -1)"],
    ),
    "sibling_rollout_without_rollouts": (
        {"name": "no_rollouts", "extends": "stage2.json", "losses": {"sibling_rollout": 1}},
        ["losses.sibling_rollout", "rollouts.every > 0"],
    ),
    "sibling_rollout_without_the_snc": (
        {
            "name": "no_snc",
            "extends": "stage3.json",
            "groups": ["agreement", "coverage", "speculation"],
            "losses": {"sibling_rollout": 1},
        },
        ["losses.sibling_rollout", "needs the SNC to train"],
    ),
    "copy_share_above_one": (
        {"name": "copy_share_above_one", "extends": "stage3.json", "rollouts": {"copy_share": 1.5}},
        ["rollouts.copy_share", "less than or equal to 1", "(got 1.5)"],
    ),
    "plan_mixing_without_the_snc": (
        {"name": "plan_mixing_without_the_snc", "extends": "stage0.json", "plan_mix_prob": 0.5},
        ["plan_mix_prob", "needs the SNC to train"],
    ),
    "unknown_fast_path": (
        {"name": "unknown_fast_path", "extends": "demo_tiny.json", "decode": {"fast_path": "statc"}},
        ["decode.fast_path", "'static'", '(got "statc")'],
    ),
    "trunk_tokenizer_without_folder": (
        {"name": "trunk_tokenizer_without_folder", "kind": "pretrain", "tokenizer": {"type": "trunk"}},
        ['tokenizer.type "trunk" needs a folder with a tokenizer', "tokenizer.path"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preset_message(tmp_path: Path, case: str) -> None:
    data, needles = BAD[case]
    path = _write(tmp_path, case, data)
    with pytest.raises(PresetError) as info:
        load_preset_file(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_extends_merges_and_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "child", {"extends": "pretrain_tiny.json", "name": "child", "train": {"lr": 0.01}}
    )
    child = load_preset_file(path)
    parent = load_preset_file(SHIPPED_DIR / "pretrain_tiny.json")
    assert child.train.lr == 0.01
    assert child.train.seq_len == parent.train.seq_len  # inherited, not reset to the default
    assert child.trunk == parent.trunk


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "a", {"extends": "b.json", "name": "a", "kind": "pretrain"})
    _write(tmp_path, "b", {"extends": "a.json", "name": "b", "kind": "pretrain"})
    with pytest.raises(PresetError, match="cycle"):
        load_preset_file(tmp_path / "a.json")


def test_name_must_match_file(tmp_path: Path) -> None:
    _write(tmp_path, "mine", {"extends": "pretrain_tiny.json"})  # inherits name pretrain_tiny
    with pytest.raises(PresetError, match="does not match the file name"):
        find_preset("mine", folder=tmp_path)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(PresetError) as info:
        find_preset("pretrain_tinyy", folder=SHIPPED_DIR)
    assert 'did you mean "pretrain_tiny"' in str(info.value)
    assert "pretrain_124m" in str(info.value)


@pytest.mark.parametrize("case", ["malformed", "unknown_key", "impossible"])
def test_bad_preset_in_main_exits_cleanly(tmp_path: Path, case: str) -> None:
    data, needles = BAD[case]
    path = _write(tmp_path, case, data)
    proc = subprocess.run(
        [PYTHON, MAIN],
        env=child_env(tmp_path, PDT_PRESET=str(path)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert needles[0] in proc.stderr


def test_unknown_preset_in_main(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, MAIN],
        env=child_env(tmp_path, PDT_PRESET="no_such"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown preset" in proc.stderr and "pretrain_tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
