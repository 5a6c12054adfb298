"""Score calibration: ROC, AUC and the thresholds the decoder uses (readiness γ, coverage).

What it is: pure functions over (score, label) arrays — the ROC curve, its area (the Mann–Whitney
statistic, ties counted half), the readiness threshold γ chosen by Youden's J, the coverage
threshold chosen by macro F1, and precision/recall/F1 at a threshold. What it is not: where the scores
come from (`pdt.train.curriculum`) nor where γ is stored (the checkpoint's state).

The rule for γ (SPEC §2 "calibrate γ on validation (ROC)"): among the ROC's operating points
that commit at least `min_tpr` of the good blocks (the curriculum's `readiness_min_tpr`, 0.9 by
default), take the one maximising J = TPR − FPR (Youden 1950), i.e. the point farthest above the
chance diagonal; on a tie, the highest threshold (commit less, roll back more: the safer side). A
block is committed when readiness ≥ γ. Why the floor: a rollback costs a block's tokens again, and
a weak head's unconstrained Youden point can sit where it rolls back most good blocks (seen: a
tiny-trunk head with AUC 0.59 whose γ rolled back every block of every answer). With min_tpr = 0 it
is plain Youden. With only one class present there is no ROC: γ = 0.5.

Then the cap from the decoder's own blocks (`capped_gamma`, the curriculum's
`readiness_max_rollback`, 0.01 by default): γ is lowered, if need be, until at most that share of
the blocks the decoder itself writes on validation prompts score below it
(`pdt.train.decode_calibration`; without them, the rollout blocks with no violation event). The
labelled set is half corruptions the decoder never writes, so its operating point says
little about how often γ rolls back at decode: on the 124M pipeline (2026-12-06) the TPR-0.9 point
rolled back 1.8 blocks an answer (15% of all blocks) while 0 of 48 own validation blocks had a
violation — every rollback re-decoded a good block (K = 3 step ratio 2.07× against 2.76× for
`independent`, which never rolls back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roc:
    fpr: np.ndarray  # [M] rising from 0 to 1
    tpr: np.ndarray  # [M]
    thresholds: np.ndarray  # [M] falling; point i = predict positive when score >= thresholds[i]


def _arrays(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s, (y >= 0.5).astype(np.float64)


def roc_curve(scores: object, labels: object) -> Roc:
    """The ROC of `scores` for binary `labels` (≥ 0.5 = positive), one point per distinct score."""
    s, y = _arrays(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.array([], dtype=int)
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(1.0 - y)[last_of_run]
    pos, neg = max(float(y.sum()), 1e-12), max(float((1.0 - y).sum()), 1e-12)
    return Roc(
        fpr=np.r_[0.0, fp / neg],
        tpr=np.r_[0.0, tp / pos],
        thresholds=np.r_[np.inf, s[last_of_run]],
    )


def roc_auc(scores: object, labels: object) -> float:
    """Area under the ROC = P(score of a random positive > that of a random negative), ties ½.

    NaN when only one class is present (no curve to measure).
    """
    s, y = _arrays(scores, labels)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    roc = roc_curve(s, y)
    return float(np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2.0))  # trapezoids


def youden_threshold(scores: object, labels: object, min_tpr: float = 0.0) -> float:
    """γ: the threshold of the ROC point maximising TPR − FPR among the points whose TPR (the share of
    good blocks committed) is at least `min_tpr`; ties → the highest threshold."""
    s, y = _arrays(scores, labels)
    if y.size == 0 or y.min() == y.max():
        return 0.5
    roc = roc_curve(s, y)
    j = np.where(roc.tpr >= min_tpr - 1e-12, roc.tpr - roc.fpr, -np.inf)  # the last point has TPR 1
    best = int(np.flatnonzero(j == j.max())[0])  # thresholds fall, so the first is the highest
    return float(min(1.0, roc.thresholds[best])) if np.isfinite(roc.thresholds[best]) else 1.0


def capped_gamma(gamma: float, own_good_scores: object, max_share: float) -> float:
    """γ, lowered if need be so that at most ⌊max_share · n⌋ of the n `own_good_scores` (readiness of
    the model's own blocks with no violation) fall below it (those would roll back). Unchanged with
    no such scores or max_share ≥ 1."""
    s = np.sort(np.asarray(own_good_scores, dtype=np.float64).reshape(-1))
    if s.size == 0 or max_share >= 1.0:
        return float(gamma)
    allowed = int(np.floor(max_share * s.size + 1e-9))  # blocks allowed below γ
    return float(min(gamma, s[allowed]))  # scores < s[allowed]: at most `allowed` of them


def _confusion(scores: object, labels: object, threshold: float) -> tuple[float, float, float, float]:
    """(tp, fp, fn, tn) when `score >= threshold` predicts positive."""
    s, y = _arrays(scores, labels)
    pred, pos = s >= threshold, y == 1
    return (
        float((pred & pos).sum()),
        float((pred & ~pos).sum()),
        float((~pred & pos).sum()),
        float((~pred & ~pos).sum()),
    )


def rates_at(scores: object, labels: object, threshold: float) -> dict[str, float]:
    """TPR and FPR when `score >= threshold` predicts positive (0 where a class is absent)."""
    tp, fp, fn, tn = _confusion(scores, labels, threshold)
    return {"tpr": tp / (tp + fn) if tp + fn else 0.0, "fpr": fp / (fp + tn) if fp + tn else 0.0}


def precision_recall_f1(scores: object, labels: object, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 when `score >= threshold` predicts positive (0 where undefined)."""
    tp, fp, fn, _ = _confusion(scores, labels, threshold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def best_macro_f1_threshold(scores: object, labels: object) -> float:
    """The coverage threshold: the distinct score maximising macro F1 — the mean of the F1 of the
    positive class ("covered") and of the negative class ("not yet covered") — ties → the highest;
    0.5 with only one class present.

    Why not the positive class's F1 alone: coverage labels are mostly positive at block ends (87% of
    the 124M pipeline's validation items, 2026-12-06), and there the F1 of "covered" peaks at the
    constant answer — a threshold below every score, every item covered from the first block (F1
    0.931 with precision = the base rate) — which says nothing. Macro F1 gives that constant 0 on
    the negative class, so the threshold must separate the classes to score."""
    s, y = _arrays(scores, labels)
    if y.size == 0 or y.min() == y.max():
        return 0.5
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # predict ≥ s[i] positive
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(1.0 - y)[last_of_run]
    pos, neg = float(y.sum()), float(y.size - y.sum())
    fn, tn = pos - tp, neg - fp
    f1_pos = 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12)
    f1_neg = 2 * tn / np.maximum(2 * tn + fn + fp, 1e-12)
    macro = (f1_pos + f1_neg) / 2
    best = int(np.flatnonzero(macro >= macro.max() - 1e-12)[0])  # thresholds fall: the first is highest
    return float(s[last_of_run][best])


def macro_f1(scores: object, labels: object, threshold: float) -> float:
    """Mean of the positive and the negative class's F1 when `score >= threshold` predicts positive."""
    tp, fp, fn, tn = _confusion(scores, labels, threshold)
    f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fn + fp else 0.0
    return (f1_pos + f1_neg) / 2
