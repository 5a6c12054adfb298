"""Parameter budget (SPEC §2b.5): default sidecars stay ≤ 5% of the trunk — measured on a ~124M
Llama-style trunk and, from the configuration alone (meta device, no weights), on GPT-OSS-20B."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pdt.model.pdt_model import PDTModel
from pdt.presets.schema import SidecarConfig

ROOT = Path(__file__).resolve().parents[2]

# Published dimensions of openai/gpt-oss-20b (its config.json on the Hugging Face Hub).
GPT_OSS_20B = {
    "hidden_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 2880,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
}


def _report(model_type: str, config: dict) -> dict:
    cfg = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        trunk = AutoModelForCausalLM.from_config(cfg)
        model = PDTModel(trunk, SidecarConfig())
    return model.parameter_report()


def test_124m_llama_budget() -> None:
    preset = json.loads((ROOT / "presets" / "pretrain_124m.json").read_text())
    config = dict(preset["trunk"]["config"], vocab_size=preset["tokenizer"]["vocab_size"] + 1)
    report = _report("llama", config)
    assert 110e6 < report["trunk"] < 140e6, report["trunk"]
    assert report["percent_of_trunk"] <= 5.0, report
    assert report["groups"]["planner"] < 0.02 * report["trunk"]


def test_gpt_oss_20b_budget_from_config_alone() -> None:
    report = _report("gpt_oss", GPT_OSS_20B)
    assert 20e9 < report["trunk"] < 22.5e9, report["trunk"]  # the published ~21B total
    assert report["percent_of_trunk"] <= 5.0, report
    # A dense d x S*V_p planner head would be 2880 * 16 * 65536 ≈ 3.0B parameters; ours is O(V_p * d_plan).
    assert report["groups"]["planner"] < 5e6
