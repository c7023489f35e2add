"""The shared pieces of every loss: token log-probs, masked means, cross-entropy, entropy, token selection and the
reverse-KL estimate, against exact references."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import masked_mean, reverse_kl_estimate, select_tokens, sft_loss, student_entropy, token_logprobs
from tests.conftest import B, T, V


def test_token_logprobs_matches_loop(gen):
    logits = torch.randn(B, T, V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    for b in range(B):
        for t in range(T):
            expected = logits[b, t, targets[b, t]] - torch.logsumexp(logits[b, t].double(), -1)
            assert got[b, t].item() == pytest.approx(expected.item(), abs=1e-6)


def test_token_logprobs_low_precision_and_padding_ids(gen):
    logits = torch.randn(B, T, V, generator=gen)
    targets = torch.tensor([[1, -100, 4], [V, 0, -1]])  # padding sentinels must not crash
    got = token_logprobs(logits.bfloat16(), targets)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = torch.log_softmax(logits.bfloat16().float(), -1)
    assert torch.allclose(got[0, 0], ref[0, 0, 1], atol=1e-5)


def test_masked_mean_and_empty_mask(gen):
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    empty = masked_mean(values, torch.zeros_like(mask))
    assert empty.item() == 0.0
    (grad,) = torch.autograd.grad(empty, values)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_sft_loss_is_cross_entropy(gen, mask):
    logits = torch.randn(B, T, V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    ce_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    expected = F.cross_entropy(logits.reshape(-1, V), ce_targets.reshape(-1), ignore_index=-100)
    got = sft_loss(token_logprobs(logits, targets), mask)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_student_entropy_is_minus_sum_p_log_p(gen):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True) * 3
    got = student_entropy(logits)
    log_p = torch.log_softmax(logits, -1)
    assert torch.allclose(got, -(log_p.exp() * log_p).sum(-1), atol=1e-12)
    assert not got.requires_grad
    low = student_entropy(logits.detach().bfloat16())
    assert low.dtype == torch.float32 and torch.allclose(low, got.float(), atol=0.05)


def test_student_entropy_stays_float32_under_autocast(gen):
    """Under bf16 autocast (Lightning's bf16-mixed) the entropy must not drop to a bf16 matmul."""
    logits = torch.randn(4, 8, 1000, generator=gen) * 3
    exact = student_entropy(logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = student_entropy(logits)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, atol=1e-4)


def test_select_tokens_keeps_the_top_fraction_of_masked_positions():
    scores = torch.tensor([[0.1, 0.9, float("nan"), 0.5], [0.7, 5.0, 0.3, 0.7]])
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])  # 6 tokens; 5.0 and NaN masked
    assert select_tokens(scores, mask, 0.67).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert select_tokens(scores, mask, 0.5).tolist() == [[False, True, False, False], [True, False, False, True]]
    # Ties keep the earlier position; a tiny fraction still keeps one token; 1.0 keeps the mask.
    assert select_tokens(scores, mask, 0.34).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert select_tokens(scores, mask, 0.01).sum() == 1
    assert torch.equal(select_tokens(scores, mask, 1.0), mask)
    assert not select_tokens(scores, torch.zeros_like(mask), 0.5).any()
    with pytest.raises(ValueError, match="fraction"):
        select_tokens(scores, mask, 0.0)



def test_reverse_kl_estimate_is_detached(gen):
    student = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, float("-inf")]])
    est = reverse_kl_estimate(student, teacher, torch.tensor([[True, True, False]]))
    assert not est.requires_grad and est.dtype == torch.float32
    assert est.item() == pytest.approx(((-1.0 + 1.5) + (-2.0 + 1.0)) / 2)

