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


#: A pretrain preset small enough for a test: 8 steps of 4 x 32 tokens on a 2-layer, d=32 trunk.
TINY_PRETRAIN = {
    "extends": "pretrain_tiny.json",
    "kind": "pretrain",
    "description": "test preset",
    "data": {"sources": [{"type": "wiki_vital", "limit": 300}]},
    "tokenizer": {"vocab_size": 1024},
    "trunk": {
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
    },
    "train": {
        "seq_len": 32,
        "micro_batch_size": 4,
        "token_budget": 8 * 32 * 4,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "sample_every": 100,
        "sample_tokens": 6,
    },
    "checkpoint": {"every_steps": 4, "every_minutes": 100.0},
}


#: Tiny configs (3 layers, d = 32) of every architecture in the instrumentation table.
TINY_ARCH_CONFIGS = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2},
    "qwen2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "mistral": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "sliding_window": 8,  # small, so decode tests cross it
    },
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 2},
    "gpt_neox": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
    },
    "gpt_oss": {
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
    },
}
