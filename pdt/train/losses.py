"""The curriculum's losses, each a small pure function of tensors (SPEC §2 "Curriculum", §2b.6/8).

What it is: plan CE, note regression (notes and speculation heads), the shifted and masked LM CE
(overall and per stream), the KD term, coverage BCE and readiness BCE, and the stream classifier
CE. Each reduces to a scalar mean over the valid entries and is 0 (not NaN) when there are none.
What it is not: where the inputs come from (`pdt.train.curriculum_step`) or the loss weights.

KD direction: forward KL, KL(p_trunk ‖ p_student) = Σ_v p_trunk(v) (log p_trunk(v) − log p_student(v)),
with p_trunk the frozen trunk with sidecars off (gate 0; SPEC §2b.8). Forward KL is mass-covering:
it penalises the student for dropping tokens the trunk finds likely, which keeps the sidecars from
trading the trunk's fluency for the section objective. It is exactly 0 while the sidecars are an
identity and grows as soon as they move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.sum() * 0.0  # keeps the graph (and device) without contributing


def plan_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V_p], targets [B, S] (IGNORE for inactive slots) → mean CE over active slots (0 if none).

    Sum / count instead of a check for "any active": no host read-back (a GPU sync) per step."""
    flat = targets.flatten()
    per = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=IGNORE, reduction="none")
    return per.sum() / (flat != IGNORE).sum().clamp_min(1)


def note_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred/target [M, d_n] → mean over notes of the squared L2 distance (targets are unit vectors:
    the sum over d_n keeps the loss O(1) whatever d_n is, where a per-element mean would be ~1/d_n)."""
    if pred.shape[0] == 0:
        return _zero(pred)
    return (pred.float() - target.float()).pow(2).sum(dim=-1).mean()


def lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted, masked LM CE. labels [R, T] (labels[:, t] is the token after t; IGNORE off the
    section); logits [R, T, V], or [N, V] at exactly the labelled positions in row-major order (what
    `PDTModel.forward_teacher(logits_at=labels != IGNORE)` returns).
    Returns (mean CE over labelled tokens, per-row CE sum [R] (detached), per-row token count [R])."""
    labelled = labels != IGNORE  # [R, T]
    if logits.dim() == 3:
        logits = logits[labelled]  # [R, T, V] → [N, V]
    targets = labels[labelled]  # [N]
    rows = labelled.nonzero()[:, 0]  # [N] row of each labelled token
    counts = labelled.sum(dim=1)  # [R]
    if targets.numel() == 0:
        return _zero(logits), torch.zeros(labels.shape[0], device=labels.device), counts
    per = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
    sums = torch.zeros(labels.shape[0], device=per.device).index_add_(0, rows, per.detach())  # [R]
    return per.mean(), sums, counts


def lm_ce_at(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lm_ce` from logits (or log-probabilities) [N, V] at the labelled positions given as indices:
    targets [N], rows [N], counts [R] (from the batch, built on the host). No device sync."""
    if log_probs:
        per = -logits.gather(1, targets[:, None]).squeeze(1)  # [N]
    else:
        per = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
    sums = torch.zeros(counts.shape[0], device=per.device).index_add_(0, rows, per.detach())  # [R]
    return per.sum() / counts.sum().clamp_min(1), sums, counts


def kd_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_teacher ‖ p_student), mean over positions. student/teacher logits [N, V] (N = the
    labelled positions only); fp32 log-softmax on both."""
    if student.shape[0] == 0:
        return _zero(student)
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / student.shape[0]


def sibling_unlikelihood(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood: logp [N, C] the student's log-probabilities at the negative ids
    [N, C] (-1: padding) → the mean over positions of Σ −log(1 − p) over each position's negatives
    (0 where there are none). p is capped just under 1 so a certain token costs a finite loss."""
    if logp.shape[0] == 0:
        return _zero(logp)
    p = logp.float().exp().clamp(max=1.0 - 1e-6)
    per = -torch.log1p(-p) * (ids >= 0)  # [N, C]
    return per.sum() / logp.shape[0]


def coverage_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits/targets [M, P] (targets in [0, 1]), mask [M, P] bool (real items) → mean BCE over real items."""
    real = mask.bool()
    logits = torch.where(real, logits.float(), 0.0)  # padding may hold anything (PAD_LOGIT, NaN)
    per = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    return torch.where(real, per, 0.0).sum() / real.sum().clamp_min(1)


#: Readiness example sources weighted equally in the loss (`groups` ids 0..READINESS_GROUPS-1).
READINESS_GROUPS = 3


def readiness_bce(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [N], labels [N] in {0, 1}, groups [N] (source of each example, default all 0) → BCE
    where each present group weighs the same and, within it, the two classes weigh the same (the
    data has several real blocks per corrupted one; unweighted, a constant "ready" would look
    good). Computed without reading anything back from the device."""
    if logits.shape[0] == 0:
        return _zero(logits)
    labels = labels.float()
    per = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")  # [N]
    if groups is None:
        groups = torch.zeros_like(labels)
    onehot = F.one_hot(groups.long(), READINESS_GROUPS).float()  # [N, G]
    pos = (onehot * labels[:, None]).sum(dim=0)  # [G]
    neg = (onehot * (1 - labels[:, None])).sum(dim=0)
    # Each present class gets half its group's weight (all of it when the other class is absent).
    share_pos = torch.where(neg > 0, 0.5, 1.0) / pos.clamp_min(1)
    share_neg = torch.where(pos > 0, 0.5, 1.0) / neg.clamp_min(1)
    present = ((pos + neg) > 0).float().sum()
    weight = (onehot * torch.where(labels[:, None] > 0.5, share_pos, share_neg)).sum(dim=1) / present  # [N]
    return (per * weight).sum()


def stream_ce(logits: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """logits [R, K], streams [R] → mean CE (which stream wrote this row)."""
    if logits.shape[0] == 0:
        return _zero(logits)
    return F.cross_entropy(logits.float(), streams.long())
