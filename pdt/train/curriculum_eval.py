"""Curriculum evaluation, calibration and the per-run report.

What it is: `evaluate` (every loss on validation batches with no gradient, per-stream LM CE of the
model and of the frozen trunk on the same sections, the LM CE with another example's notes (what
the notes are worth), coverage precision / recall / F1, readiness AUC), `calibrate` (γ by Youden's
J and the coverage threshold by macro F1 over the whole validation split; rules in
`pdt.train.calibration`), and `write_report` (the JSON a run leaves behind).
What it is not: the training loop (`pdt.train.curriculum`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdt.data.build.notes import CORRUPTIONS
from pdt.train import calibration as C
from pdt.train import runtime as R
from pdt.train.decode_calibration import TEMPERATURE, TOP_P, decoded_readiness

#: Readiness example sources (`curriculum_step._readiness`): dataset corruptions, speculation notes
#: (own vs a sibling's), own rollouts.
READINESS_KINDS = {0: "dataset", 1: "speculation", 2: "rollouts", 3: "copies"}

# Fixed seed for evaluation batches: no randomness is used with evaluate=True, but keep it explicit.
_EVAL_SEED = 0


@torch.no_grad()
def _collect(st: Any, batch_fn: Callable, step_fn: Callable, max_batches: int | None) -> dict[str, Any]:
    """Run evaluate-mode steps over validation batches and gather every number the metrics need."""
    records = st.ds.splits.get("validation") or []
    size = st.preset.train.micro_batch_size
    starts = list(range(0, len(records), size))[: max_batches or None]
    k = st.preset.sidecars.num_streams
    acc: dict[str, Any] = {
        "parts": {},
        "n": 0,
        "ce": torch.zeros(k),
        "base": torch.zeros(k),
        "foreign": {},  # which → CE sums per stream with another example's notes / bus
        "foreign_own": torch.zeros(k),  # the real bus's CE on those same rows
        "foreign_ul": {},  # (term, which) → a sibling term's sum over batches under that bus
        "foreign_ul_own": {},  # term → the real bus's on those same batches
        "foreign_ul_n": 0,
        "foreign_tok": torch.zeros(k),
        "tok": torch.zeros(k),
    }
    scores: dict[str, list[torch.Tensor]] = {}
    was_training = st.model.training
    st.model.eval()
    try:
        for start in starts:
            batch = batch_fn(st, "validation", list(range(start, min(start + size, len(records)))))
            rollout = _eval_rollouts(st, records[start : start + size], start)
            with R.autocast(st.autocast_dtype, st.dist.device):
                res = step_fn(
                    st.model,
                    batch,
                    st.plan,
                    torch.Generator().manual_seed(_EVAL_SEED),
                    evaluate=True,
                    rollout_fn=rollout,
                )
            acc["n"] += 1
            for name, value in res.parts.items():
                acc["parts"][name] = acc["parts"].get(name, 0.0) + float(value)
            streams = batch.row_stream.cpu()
            acc["ce"].index_add_(0, streams, res.row_ce.float().cpu())
            acc["tok"].index_add_(0, streams, res.row_tokens.float().cpu())
            if res.base_row_ce is not None:
                acc["base"].index_add_(0, streams, res.base_row_ce.float().cpu())
            if res.foreign_row_ce:
                for which, ce in res.foreign_row_ce.items():
                    acc["foreign"].setdefault(which, torch.zeros(k)).index_add_(0, streams, ce.float().cpu())
                acc["foreign_own"].index_add_(0, streams, res.row_ce.float().cpu())
            for which, terms in res.foreign_sibling.items():
                for term, value in terms.items():
                    acc["foreign_ul"][term, which] = acc["foreign_ul"].get((term, which), 0.0) + float(value)
            if res.foreign_sibling:
                for term in next(iter(res.foreign_sibling.values())):
                    acc["foreign_ul_own"][term] = acc["foreign_ul_own"].get(term, 0.0) + float(
                        res.parts[term]
                    )
                acc["foreign_ul_n"] += 1
                acc["foreign_tok"].index_add_(0, streams, res.row_tokens.float().cpu())
            for name, value in res.scores.items():
                scores.setdefault(name, []).append(value.float().cpu())
    finally:
        st.model.train(was_training)
    acc["scores"] = {name: torch.cat(v).numpy() for name, v in scores.items()}
    return acc


def _eval_rollouts(st: Any, records: list[dict[str, Any]], start: int) -> Callable | None:
    """Readiness examples from the model's own blocks on a validation batch (the training rollouts'
    sampler and labels, `rollouts.eval_rows` blocks, a fixed seed per batch), when the stage trains
    readiness with rollouts; None otherwise."""
    cfg = st.preset.rollouts
    if not (cfg.every and cfg.eval_rows and st.plan.wants("readiness")):
        return None
    from pdt.train.rollouts import rollout_fn

    gen = torch.Generator().manual_seed(_EVAL_SEED + 1 + start)
    return rollout_fn(records, st.tokenizer, cfg.eval_rows, cfg.temperature, gen, cfg.copy_share)


def readiness_metrics(sc: dict[str, Any]) -> dict[str, float]:
    """Readiness AUC over every example, per source (`READINESS_KINDS`), per corruption of the
    dataset's notes (each against the real notes alone: `readiness_auc_dataset_<corruption>`), and
    the share of the model's own rollout blocks with a violation. `sc`: the evaluation's score
    arrays (scores, labels, kinds and, where known, each corrupted note's CORRUPTIONS index)."""
    out: dict[str, float] = {}
    out["readiness_auc"] = C.roc_auc(sc["readiness_scores"], sc["readiness_labels"])
    for kind, name in READINESS_KINDS.items():  # each source of examples on its own
        keep = sc["readiness_kinds"] == kind
        labels = sc["readiness_labels"][keep]
        if 0 < labels.sum() < len(labels):
            out[f"readiness_auc_{name}"] = C.roc_auc(sc["readiness_scores"][keep], labels)
        if kind == 0 and "readiness_corruptions" in sc:  # real notes against each corruption alone
            corruption = sc["readiness_corruptions"][keep]
            for c, cname in enumerate(CORRUPTIONS):
                pick = (labels >= 0.5) | (corruption == c)
                if 0 < labels[pick].sum() < pick.sum():
                    out[f"readiness_auc_dataset_{cname}"] = C.roc_auc(
                        sc["readiness_scores"][keep][pick], labels[pick]
                    )
        if kind == 2 and len(labels):  # how often the model's own blocks break ownership / repeat
            out["rollout_blocks"] = float(len(labels))
            out["rollout_violation_rate"] = float(1.0 - labels.mean())
        if kind == 3 and len(labels):  # copied blocks against the model's own good blocks
            out["rollout_copies"] = float(len(labels))
            out["rollout_copy_violation_rate"] = float(1.0 - labels.mean())
            good = (sc["readiness_kinds"] == 2) & (sc["readiness_labels"] >= 0.5)
            pick = good | (keep & (sc["readiness_labels"] < 0.5))
            if good.any() and pick.sum() > good.sum():
                out["readiness_auc_copies"] = C.roc_auc(
                    sc["readiness_scores"][pick], sc["readiness_labels"][pick]
                )
    if "rollout_repeats" in sc:  # [repeats, sampled tokens] a batch: rollout tokens that repeat a sibling
        counts = sc["rollout_repeats"].reshape(-1, 2).sum(axis=0)
        out["rollout_repeat_rate"] = float(counts[0] / max(counts[1], 1.0))
    return out


def evaluate(st: Any, batch_fn: Callable, step_fn: Callable) -> dict[str, float]:
    acc = _collect(st, batch_fn, step_fn, st.preset.train.eval_batches)
    if acc["n"] == 0:
        return {}
    out = {name: value / acc["n"] for name, value in acc["parts"].items()}
    tok = acc["tok"].clamp_min(1)
    for k in range(len(tok)):
        out[f"lm_ce_stream{k}"] = float(acc["ce"][k] / tok[k])
        out[f"trunk_ce_stream{k}"] = float(acc["base"][k] / tok[k])
    out["lm_ce"] = float(acc["ce"].sum() / tok.sum())
    out["trunk_ce"] = float(acc["base"].sum() / tok.sum())
    n = acc["foreign_tok"].sum()  # (batches of one example have no other example to read)
    for which, ce in acc["foreign"].items():
        out[f"lm_ce_foreign_{which}"] = float(ce.sum() / n)
        # nats/token the real notes (bus) are worth over another text's, on the same rows (~0: unused)
        out[f"{which}_gain"] = float((ce.sum() - acc["foreign_own"].sum()) / n)
    for (term, which), ul in acc["foreign_ul"].items():  # ~0: what siblings wrote is avoided (or not) blind
        out[f"{term}_{which}_gain"] = (ul - acc["foreign_ul_own"][term]) / acc["foreign_ul_n"]
    sc = acc["scores"]
    if "coverage_scores" in sc:
        threshold = (st.calibration or {}).get("coverage", {}).get("threshold", 0.5)
        prf = C.precision_recall_f1(sc["coverage_scores"], sc["coverage_labels"], threshold)
        out.update({f"coverage_{k}": v for k, v in prf.items()})
        out["coverage_auc"] = C.roc_auc(sc["coverage_scores"], sc["coverage_labels"])
    if "readiness_scores" in sc:
        out.update(readiness_metrics(sc))
    return out


def calibrate(st: Any, batch_fn: Callable, step_fn: Callable) -> dict[str, Any]:
    """γ and the coverage threshold from the whole validation split."""
    sc = _collect(st, batch_fn, step_fn, None)["scores"]
    ready_s, ready_y = sc.get("readiness_scores"), sc.get("readiness_labels")
    cov_s, cov_y = sc.get("coverage_scores"), sc.get("coverage_labels")
    out: dict[str, Any] = {"split": "validation"}
    if ready_s is not None:
        min_tpr, cap = st.preset.readiness_min_tpr, st.preset.readiness_max_rollback
        youden = C.youden_threshold(ready_s, ready_y, min_tpr)
        own = sc["readiness_kinds"] == 2  # the model's own blocks (rollouts), good or violating
        good, bad = ready_s[own & (ready_y >= 0.5)], ready_s[own & (ready_y < 0.5)]
        # the cap's blocks: those the decoder itself writes (reading its own notes), else the rollouts'
        decoded = _decoded_or_none(st) if st.preset.rollouts.every > 0 else []
        capped_on = np.asarray([x for answer in decoded for x in answer], dtype=np.float64)
        if not len(capped_on):
            capped_on = good
        gamma = C.capped_gamma(youden, capped_on, cap)
        out["readiness"] = {
            "gamma": gamma,
            "gamma_youden": youden,
            "auc": C.roc_auc(ready_s, ready_y),
            **C.rates_at(ready_s, ready_y, gamma),
            "n": int(len(ready_y)),
            "positives": int(ready_y.sum()),
            "own_blocks": int(own.sum()),
            "own_violations": len(bad),
            # at γ: the share of own good blocks rolled back, and of own violating blocks caught
            "own_good_rollback_rate": float((good < gamma).mean()) if len(good) else None,
            "own_violation_recall": float((bad < gamma).mean()) if len(bad) else None,
            # where the cap put γ: the own good blocks' scores beside the labelled good blocks'
            "own_good_quantiles": _quantiles(good),
            "labelled_good_quantiles": _quantiles(ready_s[~own & (ready_y >= 0.5)]),
            # every own block's score (ascending), so another cap can be judged without retraining,
            # and the γ that a looser cap would keep (`readiness_max_rollback` at each share)
            "own_good_scores": sorted(float(x) for x in good),
            "own_violation_scores": sorted(float(x) for x in bad),
            # the decoder's own answers (γ = 0): each block's readiness, per prompt, and where γ falls
            "decoded_prompts": len(decoded),
            "decoded_blocks": sum(len(a) for a in decoded),
            "decoded_scores": decoded,
            "decoded_quantiles": _quantiles(capped_on) if decoded else None,
            "decoded_rollback_rate": float((capped_on < gamma).mean()) if decoded else None,
            "decoded_rollback_rate_at_youden": float((capped_on < youden).mean()) if decoded else None,
            "gamma_by_max_rollback": {
                f"{share:g}": C.capped_gamma(youden, capped_on, share) for share in GAMMA_SHARES
            }
            if len(capped_on)
            else None,
            "rule": f"max Youden J = TPR - FPR over the ROC points with TPR >= {min_tpr:g}; "
            "ties -> highest threshold; then lowered until at most "
            + (
                f"{cap:g} of the blocks the decoder itself writes on {len(decoded)} validation prompts "
                f"(gamma 0, temperature {TEMPERATURE:g}, top-p {TOP_P:g}) score below it; "
                if decoded
                else f"{cap:g} of the model's own rollout blocks with no violation score below it; "
            )
            + "commit if readiness >= gamma",
        }
    if cov_s is not None:
        threshold = C.best_macro_f1_threshold(cov_s, cov_y)
        base_rate = float(cov_y.mean()) if len(cov_y) else 0.0
        out["coverage"] = {
            "threshold": threshold,
            **C.precision_recall_f1(cov_s, cov_y, threshold),
            "macro_f1": C.macro_f1(cov_s, cov_y, threshold),
            "auc": C.roc_auc(cov_s, cov_y),
            "n": int(len(cov_y)),
            "base_rate": base_rate,
            # the constant "every item covered": the F1 a head must beat to say anything
            "f1_all_covered": 2 * base_rate / (1 + base_rate) if base_rate else 0.0,
            "rule": "max macro F1 (mean of the covered and the not-covered class's F1) over the "
            "distinct scores; ties -> highest threshold; covered if score >= threshold",
        }
    return out


def _decoded_or_none(st: Any) -> list[list[float]]:
    """`decoded_readiness`, or [] with a warning when decoding fails at the end of a run (the cap
    then falls back to the rollout blocks; the trained sidecars are saved either way)."""
    try:
        return decoded_readiness(st)
    except (RuntimeError, ValueError) as exc:  # CUDA OOM included: a long run must not end here
        st.ctx.log(
            f"the calibration could not decode validation prompts ({exc}); γ is capped on the rollout "
            "blocks instead (set rollouts.calibration_prompts to 0 to skip the decode)",
            level="warning",
        )
        return []


#: The own-block shares `calibration.json` lists the capped γ for (beside the preset's own).
GAMMA_SHARES = (0.01, 0.02, 0.05, 0.1)


def _quantiles(scores: Any) -> dict[str, float] | None:
    """min / 10% / median / 90% of a score array; None when empty."""
    if len(scores) == 0:
        return None
    q = np.quantile(np.asarray(scores, dtype=np.float64), [0.0, 0.1, 0.5, 0.9])
    return {"min": float(q[0]), "p10": float(q[1]), "p50": float(q[2]), "p90": float(q[3])}


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf → None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_report(st: Any, paths: list[Path]) -> None:
    """The per-run report: stage, budget, parameters, final metrics, calibration and the loss history."""
    if not st.dist.is_main:
        return
    from pdt.telemetry.memory import sample_memory

    mem = sample_memory()
    train_rows = [h for h in st.history if "loss" in h]
    report = {
        "preset": st.preset.name,
        "stage": st.preset.stage,
        "trained_groups": sorted(st.plan.groups),
        "steps": st.step,
        "tokens_seen": st.tokens,
        "elapsed_s": st.elapsed_s,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in train_rows) / len(train_rows))
        if train_rows
        else None,
        "started_from": st.started_from,
        "dataset": st.ds.name,
        "parameters": st.model.parameter_report(),
        "gates": dict(zip([f"layer{i}" for i in st.model.layer_ids], st.model.gate_values(), strict=True)),
        "final_eval": st.last_eval,
        "calibration": st.calibration,
        "memory": {
            "rss_bytes": mem.rss_bytes,
            "gpu_peak_bytes": mem.gpu_peak_bytes,
        },
        "history": st.history,
    }
    text = json.dumps(_clean(report), indent=2) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
