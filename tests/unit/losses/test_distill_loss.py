"""Context-distillation KL against numbers worked by hand: values and gradient directions."""

import math

import pytest
import torch

from kilter.errors import ConfigError
from kilter.losses.distill import distill_kl, teacher_topk, token_kls

LN2 = math.log(2)


def _logits(probs):
    # log-probabilities are valid logits (softmax of log p is p)
    return torch.tensor([probs], dtype=torch.float64).log()


def test_forward_and_reverse_kl_by_hand():
    # p = (0.8, 0.1, 0.1), q = (0.4, 0.4, 0.2)
    # KL(p||q) = 0.8 ln2 + 0.1 ln(1/4) + 0.1 ln(1/2) = (0.8 - 0.2 - 0.1) ln2 = 0.5 ln2
    # KL(q||p) = 0.4 ln(1/2) + 0.4 ln4 + 0.2 ln2 = (-0.4 + 0.8 + 0.2) ln2 = 0.6 ln2
    teacher = teacher_topk(_logits([0.8, 0.1, 0.1]), None)[0]
    student = _logits([0.4, 0.4, 0.2]).requires_grad_(True)
    forward, reverse = token_kls(student, teacher)
    assert forward.item() == pytest.approx(0.5 * LN2)
    assert reverse.item() == pytest.approx(0.6 * LN2)
    assert distill_kl(student, teacher, direction="forward").item() == pytest.approx(0.5 * LN2)
    assert distill_kl(student, teacher, direction="reverse").item() == pytest.approx(0.6 * LN2)


def test_forward_gradient_is_q_minus_p():
    teacher = teacher_topk(_logits([0.8, 0.1, 0.1]), None)[0]
    student = _logits([0.4, 0.4, 0.2]).requires_grad_(True)
    distill_kl(student, teacher, direction="forward").sum().backward()
    # d KL(p||q) / dz = q - p = (-0.4, 0.3, 0.1): descent raises the teacher's favourite token
    assert torch.allclose(student.grad, torch.tensor([[-0.4, 0.3, 0.1]], dtype=torch.float64))


def test_reverse_gradient_by_hand():
    teacher = teacher_topk(_logits([0.8, 0.1, 0.1]), None)[0]
    student = _logits([0.4, 0.4, 0.2]).requires_grad_(True)
    distill_kl(student, teacher, direction="reverse").sum().backward()
    # d KL(q||p) / dz_v = q_v (d_v - KL), d = log q - log p = (-ln2, 2 ln2, ln2), KL = 0.6 ln2
    # -> (0.4 * -1.6, 0.4 * 1.4, 0.2 * 0.4) ln2 = (-0.64, 0.56, 0.08) ln2
    expected = torch.tensor([[-0.64, 0.56, 0.08]], dtype=torch.float64) * LN2
    assert torch.allclose(student.grad, expected)
    assert student.grad[0, 0] < 0 < student.grad[0, 1]  # towards the teacher's mode, away from its tail


def test_topk_renormalises_teacher_and_student_over_the_same_tokens():
    # p = (0.6, 0.3, 0.1), k = 2 -> kept tokens (0, 1), mass 0.9, p~ = (2/3, 1/3)
    logps, index, mass = teacher_topk(_logits([0.6, 0.3, 0.1]), 2)
    assert index.tolist() == [[0, 1]]
    assert mass.item() == pytest.approx(0.9)
    assert torch.allclose(logps.exp(), torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))
    # q = (0.2, 0.4, 0.4) -> q~ = (1/3, 2/3) over the same tokens; KL(p~||q~) = KL(q~||p~) = ln2 / 3
    student = _logits([0.2, 0.4, 0.4]).requires_grad_(True)
    forward, reverse = token_kls(student, logps, index)
    assert forward.item() == pytest.approx(LN2 / 3)
    assert reverse.item() == pytest.approx(LN2 / 3)
    forward.sum().backward()
    # gradient q~ - p~ on the kept tokens, exactly 0 on the token outside the top k
    assert torch.allclose(student.grad, torch.tensor([[-1 / 3, 1 / 3, 0.0]], dtype=torch.float64))


def test_topk_with_k_at_least_vocab_is_exact():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    full = distill_kl(student, teacher_topk(teacher, None)[0])
    logps, index, mass = teacher_topk(teacher, 7)
    assert index is None and torch.allclose(mass, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(distill_kl(student, logps, index), full)
    # and it is the textbook KL
    p, q = teacher.softmax(-1), student.softmax(-1)
    assert torch.allclose(full, (p * (p.log() - q.log())).sum(-1))


def test_identical_student_gives_zero_loss_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(4, 11)
    for k in (None, 3):
        logps, index, _ = teacher_topk(logits, k)
        student = logits.clone().requires_grad_(True)
        for direction in ("forward", "reverse"):
            loss = distill_kl(student, logps, index, direction)
            assert torch.allclose(loss, torch.zeros(4), atol=1e-6)
            loss.sum().backward()
            assert student.grad.abs().max() < 1e-6
            student.grad = None


def test_kl_is_nonnegative_and_bf16_logits_are_upcast():
    torch.manual_seed(2)
    teacher, student = torch.randn(6, 9), torch.randn(6, 9).to(torch.bfloat16)
    forward, reverse = token_kls(student, teacher_topk(teacher, 4)[0], teacher_topk(teacher, 4)[1])
    assert forward.dtype == torch.float32 and (forward >= -1e-6).all() and (reverse >= -1e-6).all()


def test_bad_arguments():
    logits = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="top_k"):
        teacher_topk(logits, 0)
    with pytest.raises(ConfigError, match="forward"):
        distill_kl(logits, logits, direction="sideways")
    with pytest.raises(ValueError, match="teacher_index"):
        token_kls(logits, torch.zeros(2, 2))
