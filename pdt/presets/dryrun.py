"""Dry runs: a tiny variant of any preset that exercises the same code path in seconds.

What it is: per-kind rules that shrink a validated preset (trunk dims, sequence, batch, budget,
document count) while keeping its structure — sources, mixing, tokenizer kind, model type — so a
dry run catches a broken preset or a renamed API before hours are spent. What it is not: a
different code path; the dry variant runs through the ordinary job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdt.presets.loader import validate_preset
from pdt.presets.schema import PresetBase

# Tiny dimensions for each config key family (Llama-like and GPT-2-like names).
_TINY_TRUNK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 2,
    "n_inner": 128,
}


def _tiny_pretrain(data: dict[str, Any]) -> dict[str, Any]:
    trunk = data.setdefault("trunk", {})
    if trunk.get("source", "config") == "config":
        cfg = trunk.setdefault("config", {})
        for key in list(cfg):
            if key in _TINY_TRUNK:
                cfg[key] = _TINY_TRUNK[key]
        if not any(k in cfg for k in _TINY_TRUNK):
            cfg.update(
                {
                    k: _TINY_TRUNK[k]
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                    )
                }
            )
    tok = data.setdefault("tokenizer", {})
    if tok.get("type", "tiktoken") == "tiktoken":
        tok["vocab_size"] = min(int(tok.get("vocab_size") or 1024), 1024)
    for src in data.setdefault("data", {}).setdefault("sources", [{"type": "wiki_vital"}]):
        src["limit"] = min(int(src.get("limit") or 60), 60)
    data["data"]["num_workers"] = 0
    train = data.setdefault("train", {})
    train.update(
        {
            "seq_len": 32,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "token_budget": 128,
            "warmup_steps": 1,
            "eval_every": 1,
            "eval_batches": 1,
            "sample_every": 1,
            "sample_tokens": 4,
            "compile": False,
            "precision": "fp32",
            "log_every": 1,
        }
    )
    train["sample_prompts"] = list(train.get("sample_prompts") or ["The"])[:1]
    data.setdefault("checkpoint", {}).update({"every_steps": 1, "export": True})
    data.setdefault("distributed", {})["nproc_per_node"] = 1
    return data


#: Preset kind → shrinking rule. New kinds add one row.
def _tiny_dataset(data: dict[str, Any]) -> dict[str, Any]:
    for src in data.setdefault("data", {}).setdefault("sources", [{"type": "wiki_vital"}]):
        src["limit"] = min(int(src.get("limit") or 40), 40)
    data["max_documents"] = min(int(data.get("max_documents") or 40), 40)
    data["shard_size"] = min(int(data.get("shard_size") or 8), 8)
    tok = data.setdefault("tokenizer", {})
    if tok.get("type", "tiktoken") == "tiktoken":
        tok["vocab_size"] = min(int(tok.get("vocab_size") or 1024), 1024)
    return data


def _tiny_curriculum(data: dict[str, Any]) -> dict[str, Any]:
    train = data.setdefault("train", {})
    train.update(
        {
            "steps": 2,
            "token_budget": None,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "warmup_steps": 0,
            "eval_every": 1,
            "eval_batches": 1,
            "log_every": 1,
            "max_stream_tokens": 64,
            "note_tokens": 32,
            "precision": "fp32",
        }
    )
    if data.get("rollouts", {}).get("every"):
        data["rollouts"].update({"every": 1, "rows": 2})
    data.setdefault("checkpoint", {}).update({"every_steps": 1})
    data.setdefault("distributed", {})["nproc_per_node"] = 1
    return data


def _tiny_inference(data: dict[str, Any]) -> dict[str, Any]:
    decode = data.setdefault("decode", {})
    decode["max_new_tokens"] = min(int(decode.get("max_new_tokens") or 8), 8)
    decode["max_retries"] = min(int(decode.get("max_retries") or 0), 1)
    data["device"] = "cpu"
    return data


def _tiny_pipeline(data: dict[str, Any]) -> dict[str, Any]:
    return data  # each listed preset is shrunk by its own rule when the pipeline runs them


TINY_RULES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pretrain": _tiny_pretrain,
    "dataset": _tiny_dataset,
    "curriculum": _tiny_curriculum,
    "inference": _tiny_inference,
    "pipeline": _tiny_pipeline,
}


def tiny_variant(preset: PresetBase) -> PresetBase:
    """The same preset at toy size (validated again, so the shrunken one is legal too)."""
    data = preset.model_dump(mode="json")
    kind = data.get("kind", "")
    data = TINY_RULES[kind](data)
    data["name"] = f"{preset.name}-dryrun"
    return validate_preset(data, source=f"{preset.name} (dry-run variant)")
