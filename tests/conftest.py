"""Shared fixtures: every test runs with its own logs/checkpoints folders and a quiet environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Jobs write under tmp_path, never into the checkout's logs/ or checkpoints/."""
    monkeypatch.setenv("PDT_LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("PDT_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("PDT_PRESET", raising=False)
    monkeypatch.delenv("PDT_RUN_DIR", raising=False)
    return tmp_path


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a `python main.py` child: isolated outputs, single-threaded, unbuffered."""
    env = dict(os.environ)
    env.update(
        {
            "PDT_LOGS_DIR": str(tmp_path / "logs"),
            "PDT_CHECKPOINTS_DIR": str(tmp_path / "checkpoints"),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


PYTHON = sys.executable
MAIN = str(REPO / "main.py")
