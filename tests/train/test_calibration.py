"""ROC, AUC and the calibrated thresholds against cases with a known answer and a brute-force AUC."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pdt.train import calibration as C


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return sum(wins) / len(wins)


def test_known_roc() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    roc = C.roc_curve(scores, labels)
    assert roc.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert roc.thresholds[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    assert C.roc_auc(scores, labels) == pytest.approx(0.75)
    # J = 0.5 at 0.8 (TPR .5, FPR 0) and at 0.35 (TPR 1, FPR .5): the tie goes to the higher γ.
    assert C.youden_threshold(scores, labels) == pytest.approx(0.8)


def test_gamma_with_a_floor_on_the_share_of_good_blocks_committed() -> None:
    # ROC points (threshold: TPR, FPR): 0.9: .25, 0 | 0.8: .5, 0 | 0.7: .5, .25 | 0.6: .75, .25 |
    # 0.5: .75, .5 | 0.4: .75, .75 | 0.3: 1, .75 | 0.2: 1, 1.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    labels = [1, 1, 0, 1, 0, 0, 1, 0]
    assert C.youden_threshold(scores, labels) == pytest.approx(0.8)  # J = .5 at 0.8 and 0.6: higher
    assert C.youden_threshold(scores, labels, min_tpr=0.7) == pytest.approx(0.6)  # J .5 with TPR .75
    assert C.youden_threshold(scores, labels, min_tpr=0.9) == pytest.approx(0.3)  # only TPR 1: J .25
    assert C.rates_at(scores, labels, 0.3) == {"tpr": 1.0, "fpr": 0.75}
    assert C.rates_at(scores, labels, 0.8) == {"tpr": 0.5, "fpr": 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes ties
    assert C.roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels))


def test_separable_and_degenerate_cases() -> None:
    assert C.roc_auc([0.1, 0.2, 0.9, 0.95], [0, 0, 1, 1]) == 1.0
    assert C.youden_threshold([0.1, 0.2, 0.9, 0.95], [0, 0, 1, 1]) == pytest.approx(0.9)
    assert C.roc_auc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)
    assert math.isnan(C.roc_auc([0.2, 0.3], [1, 1]))
    assert C.youden_threshold([0.2, 0.3], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        C.roc_auc([float("nan"), 0.1], [0, 1])


def test_f1_threshold_and_prf() -> None:
    scores, labels = [0.9, 0.8, 0.3, 0.2, 0.1], [1, 1, 0, 1, 0]
    assert C.precision_recall_f1(scores, labels, 0.5) == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8}
    )
    # macro F1 (mean of both classes' F1): 0.5 → (0.8 + 0.8) / 2 = 0.8; 0.2 → (6/7 + 2/3) / 2 ≈ 0.762
    assert C.macro_f1(scores, labels, 0.5) == pytest.approx(0.8)
    assert C.macro_f1(scores, labels, 0.2) == pytest.approx((6 / 7 + 2 / 3) / 2)
    # among the distinct scores: 0.8 → 0.8 (as 0.5), 0.3 → (2/3 + 1/2) / 2: the highest score of the max
    assert C.best_macro_f1_threshold(scores, labels) == pytest.approx(0.8)


def test_coverage_threshold_is_not_the_constant_answer_on_mostly_positive_labels() -> None:
    """Nine covered items in ten: the positive class's F1 alone peaks at a threshold under every
    score (all covered, F1 = 2·0.9 / 1.9 ≈ 0.947); macro F1 takes the threshold that separates."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(900), np.zeros(100)]
    scores = np.where(labels == 1, rng.uniform(0.3, 1.0, 1000), rng.uniform(0.0, 0.45, 1000))
    everything = float(scores.min())
    assert C.precision_recall_f1(scores, labels, everything)["f1"] == pytest.approx(2 * 0.9 / 1.9)
    t = C.best_macro_f1_threshold(scores, labels)
    assert 0.3 < t <= 0.45  # inside the overlap of the two classes, not at the bottom
    assert C.macro_f1(scores, labels, t) > 0.85 > 0.5 > C.macro_f1(scores, labels, everything)
    # the vectorised search equals a brute force over the distinct scores (first max = highest)
    brute = max(np.unique(scores)[::-1], key=lambda x: C.macro_f1(scores, labels, float(x)))
    assert t == pytest.approx(float(brute))
    assert C.best_macro_f1_threshold([0.2, 0.7], [1, 1]) == 0.5


def test_gamma_capped_by_the_share_of_own_good_blocks_rolled_back() -> None:
    own_good = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # share 0: γ may roll back none of them → at most the lowest score
    assert C.capped_gamma(0.45, own_good, 0.0) == pytest.approx(0.05)
    # share 0.2 of 10 blocks: two may fall below γ → at most the third-lowest
    assert C.capped_gamma(0.45, own_good, 0.2) == pytest.approx(0.2)
    assert sum(s < C.capped_gamma(0.45, own_good, 0.2) for s in own_good) == 2
    # a γ already low enough, no own blocks, or no cap: unchanged
    assert C.capped_gamma(0.15, own_good, 0.2) == pytest.approx(0.15)
    assert C.capped_gamma(0.45, [], 0.0) == pytest.approx(0.45)
    assert C.capped_gamma(0.45, own_good, 1.0) == pytest.approx(0.45)


def test_readiness_metrics_split_by_source_and_by_corruption() -> None:
    from pdt.train.curriculum_eval import readiness_metrics

    # kind 0: 4 real notes (label 1) and one corrupted note of each kind; kind 1: 2 + 2; kind 2: 3 own
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.65, 0.1, 0.95, 0.7, 0.3, 0.4, 0.8, 0.9, 0.2, 0.6])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0], dtype=float)
    kinds = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2], dtype=float)
    corr = np.array([-1, -1, -1, -1, 0, 1, 2, -1, -1, -1, -1, -1, -1, -1], dtype=float)
    out = readiness_metrics(
        {
            "readiness_scores": scores,
            "readiness_labels": labels,
            "readiness_kinds": kinds,
            "readiness_corruptions": corr,
        }
    )
    # entity swap (0.65) sits below 3 of the 4 real notes, dropped fact below all, wrong owner above all
    assert out["readiness_auc_dataset_entity_swap"] == pytest.approx(0.75)
    assert out["readiness_auc_dataset_dropped_fact"] == pytest.approx(1.0)
    assert out["readiness_auc_dataset_wrong_owner"] == pytest.approx(0.0)
    assert out["readiness_auc_dataset"] == pytest.approx(7 / 12)
    assert out["readiness_auc_speculation"] == pytest.approx(0.25)  # 0.7, 0.3 against 0.4, 0.8
    assert out["rollout_blocks"] == 3 and out["rollout_violation_rate"] == pytest.approx(1 / 3)
    assert out["readiness_auc"] == pytest.approx(C.roc_auc(scores, labels))
    # without the corruption kinds (older callers) the split is simply absent
    del_corr = readiness_metrics(
        {"readiness_scores": scores, "readiness_labels": labels, "readiness_kinds": kinds}
    )
    assert not any(k.startswith("readiness_auc_dataset_") for k in del_corr)


def test_a_lowered_gamma_is_said_with_the_scores_that_lowered_it() -> None:
    from pdt.train.curriculum import _gamma_capped_note

    ready = {
        "gamma": 0.342,
        "gamma_youden": 0.342,
        "own_blocks": 48,
        "own_violations": 0,
        "own_good_quantiles": {"min": 1e-6, "p10": 0.2, "p50": 0.5, "p90": 0.8},
        "labelled_good_quantiles": {"min": 0.01, "p10": 0.3, "p50": 0.6, "p90": 0.9},
        "gamma_by_max_rollback": {"0.01": 1.1e-6, "0.02": 0.031, "0.05": 0.2, "0.1": 0.342},
    }
    assert _gamma_capped_note(ready, 0.01) is None  # the ROC's γ kept: nothing to say
    note = _gamma_capped_note({**ready, "gamma": 1.1e-6}, 0.01)
    assert note is not None
    assert "0.342" in note and "1.1e-06" in note and "own 48 rollout blocks" in note
    assert "min 1e-06" in note and "hardly ever roll back" in note and "readiness_max_rollback" in note
    # what each looser cap would keep, and not the cap that was used
    assert "0.02: γ 0.031" in note and "0.05: γ 0.2" in note and "0.1: γ 0.342" in note
    assert "0.01: γ" not in note and "decode.gamma" in note
    mild = _gamma_capped_note({**ready, "gamma": 0.25}, 0.01)  # lowered, still a working γ
    assert mild is not None and "0.25" in mild and "hardly ever" not in mild
    decoded = {  # capped on the decoder's own answers: the note names those blocks and their scores
        **ready,
        "gamma": 0.36,
        "gamma_youden": 0.431,
        "decoded_blocks": 60,
        "decoded_prompts": 10,
        "decoded_quantiles": {"min": 0.355, "p10": 0.41, "p50": 0.641, "p90": 0.9},
    }
    note = _gamma_capped_note(decoded, 0.01)
    assert note is not None and "the 60 blocks the decoder wrote on 10 validation prompts" in note
    assert "min 0.355, median 0.641" in note and "rollout blocks" not in note
