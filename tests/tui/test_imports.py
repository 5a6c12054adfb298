"""The core never imports the TUI: each core module, imported alone in a fresh interpreter, must
leave `textual` and `questionary` out of `sys.modules`; `import pdt` loads neither torch nor textual."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALWAYS = ["pdt", "pdt.presets", "pdt.telemetry.events", "pdt.telemetry.sinks", "pdt.runs"]
#: Packages whose every module is checked (those that exist when the test runs).
DISCOVERED_PACKAGES = ["data", "train", "model", "presets", "telemetry", "infer", "bus"]
#: Single core modules checked when present (the job runner main.py uses unattended).
OPTIONAL = ["pdt.jobs", "pdt.pipeline"]


def _discover() -> list[str]:
    """Every module under pdt/data, pdt/train, pdt/model that exists now (never pdt.tui)."""
    names: list[str] = []
    for package in DISCOVERED_PACKAGES:
        folder = REPO / "pdt" / package
        if not folder.is_dir():
            continue
        if (folder / "__init__.py").is_file():
            names.append(f"pdt.{package}")
        for info in pkgutil.walk_packages([str(folder)], prefix=f"pdt.{package}."):
            names.append(info.name)
    names += [m for m in OPTIONAL if (REPO / (m.replace(".", "/") + ".py")).is_file()]
    return sorted({n for n in names if not n.startswith("pdt.tui")})


CORE_MODULES = ALWAYS + [m for m in _discover() if m not in ALWAYS]


def _loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-2000:]}"
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_does_not_import_the_ui(module: str) -> None:
    loaded = _roots(_loaded_after_import(module))
    assert "textual" not in loaded, f"{module} imports textual"
    assert "questionary" not in loaded, f"{module} imports questionary"


def test_import_pdt_is_light() -> None:
    loaded = _roots(_loaded_after_import("pdt"))
    assert "torch" not in loaded
    assert "textual" not in loaded


def test_discovery_finds_the_core() -> None:
    """Guard against a discovery that silently finds nothing (then the test above proves little)."""
    assert any(m.startswith("pdt.train.") for m in CORE_MODULES)
    assert any(m.startswith("pdt.model") for m in CORE_MODULES)


def test_the_tui_does_import_textual() -> None:
    """The check can fail: the same probe sees textual when the TUI is imported."""
    assert "textual" in _roots(_loaded_after_import("pdt.tui.app"))
