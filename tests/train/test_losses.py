"""The curriculum losses: masking, KD direction, class balance, empty inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdt.train import losses as L


def test_lm_ce_ignores_masked_positions() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, L.IGNORE, 4, L.IGNORE, L.IGNORE], [L.IGNORE] * 5])
    mean, sums, counts = L.lm_ce(logits, labels)
    want = (
        F.cross_entropy(logits[0, 0], torch.tensor(3)) + F.cross_entropy(logits[0, 2], torch.tensor(4))
    ) / 2
    assert torch.allclose(mean, want) and counts.tolist() == [2, 0] and float(sums[1]) == 0.0
    # Changing a masked position's logits changes nothing.
    logits2 = logits.clone()
    logits2[0, 1] += 100.0
    assert torch.equal(L.lm_ce(logits2, labels)[0], mean)


def test_kd_is_forward_kl_teacher_to_student() -> None:
    student, teacher = torch.randn(7, 13), torch.randn(7, 13)
    p_t = teacher.softmax(-1)
    want = (p_t * (p_t.log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(L.kd_kl(student, teacher), want, atol=1e-6)
    assert not torch.allclose(L.kd_kl(teacher, student), want, atol=1e-3)  # the other direction differs
    assert float(L.kd_kl(teacher, teacher)) == 0.0


def test_readiness_weights_the_classes_equally() -> None:
    logits = torch.tensor([2.0, 2.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert torch.allclose(L.readiness_bce(logits, labels), 0.5 * per[:3].mean() + 0.5 * per[3])


def test_readiness_weights_each_source_equally() -> None:
    """Group 0 has 4 examples, group 1 has 2: each group weighs half, each class half of that."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.3, -0.2])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    g0 = 0.5 * per[:3].mean() + 0.5 * per[3]
    g1 = 0.5 * per[4] + 0.5 * per[5]
    assert torch.allclose(L.readiness_bce(logits, labels, groups), 0.5 * g0 + 0.5 * g1)
    assert not torch.allclose(L.readiness_bce(logits, labels), 0.5 * g0 + 0.5 * g1)


def test_coverage_bce_skips_padding_and_empty_inputs_give_zero() -> None:
    logits = torch.tensor([[0.3, float("nan")]])
    targets = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[True, False]])
    assert torch.allclose(
        L.coverage_bce(logits, targets, mask),
        F.binary_cross_entropy_with_logits(logits[:, :1], targets[:, :1]),
    )
    empty = torch.zeros(0, 4, requires_grad=True)
    for value in (
        L.note_mse(empty, empty),
        L.readiness_bce(torch.zeros(0), torch.zeros(0)),
        L.kd_kl(empty, empty),
    ):
        assert float(value.detach()) == 0.0 and torch.isfinite(value)
    assert float(L.plan_ce(torch.randn(2, 3, 5), torch.full((2, 3), L.IGNORE))) == 0.0
