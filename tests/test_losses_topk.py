"""The generalized JSD and the top-k divergence losses against exact full-vocabulary references."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TAILS
from pipeline.losses import generalized_jsd, topk_divergence_loss
from tests.conftest import B, T, V, ref_divergence

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
# Reverse KL against a teacher renormalised over its k is infinite (refused); every other pair is meaningful.
TAIL_BETAS = [(tail, beta) for tail in TAILS for beta in BETAS if not (tail == "renorm_teacher" and beta == 1)]


def test_generalized_jsd_endpoints_are_the_kl_forms_and_interior_is_trl_convention(gen):
    log_p = torch.log_softmax(torch.randn(4, V, generator=gen, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(4, V, generator=gen, dtype=torch.float64), -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || p)
    assert torch.allclose(generalized_jsd(log_p, log_q, 0.0), forward, atol=1e-14)
    assert torch.allclose(generalized_jsd(log_p, log_q, 1.0), reverse, atol=1e-14)
    for beta in (0.1, 0.5, 0.9):
        got = generalized_jsd(log_p, log_q, beta)
        assert torch.allclose(got, ref_divergence(log_p.exp(), log_q.exp(), beta), atol=1e-14)
        # m = beta p + (1 - beta) q is symmetric under (p, q, beta) -> (q, p, 1 - beta).
        assert torch.allclose(got, generalized_jsd(log_q, log_p, 1 - beta), atol=1e-14)
        assert torch.allclose(generalized_jsd(log_p, log_p, beta), torch.zeros(4, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(log_p, log_q, 1.5)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_with_k_equal_v_are_the_exact_divergence(gen, mask, tail, beta):
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    perm = torch.randperm(V, generator=gen)  # the cache's order is irrelevant
    ids = perm.expand(B, T, V)
    got = topk_divergence_loss(student_logits, ids, teacher_logp[..., perm], mask, beta=beta, tail=tail)

    log_q = torch.log_softmax(student_logits, -1)
    if beta == 0:
        exact = F.kl_div(log_q, teacher_logp, log_target=True, reduction="none").sum(-1)
    elif beta == 1:
        exact = F.kl_div(teacher_logp, log_q, log_target=True, reduction="none").sum(-1)
    else:
        exact = ref_divergence(teacher_logp.exp(), log_q.exp(), beta)
    assert got.item() == pytest.approx(exact[mask].mean().item(), abs=1e-12)

    # float16 storage of the teacher changes nothing beyond fp16 rounding. In rest_bucket the rounding
    # error of the top-k sum (~1e-3) lands in the rest bucket, against a student rest of ~0 here.
    half = topk_divergence_loss(student_logits, ids, teacher_logp[..., perm].half(), mask, beta=beta, tail=tail)
    assert half.item() == pytest.approx(got.item(), abs=1e-2 if tail == "rest_bucket" else 1e-3)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_on_a_partial_support_match_their_definition(gen, mask, make_teacher, tail, beta):
    k = 2
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    _, top_ids, top_lp = make_teacher(k)
    got = topk_divergence_loss(student_logits, top_ids, top_lp, mask, beta=beta, tail=tail)

    q_full = torch.softmax(student_logits, -1)
    q_top = q_full.gather(-1, top_ids)
    p_top = top_lp.exp()
    if tail == "renorm_teacher":  # the exact divergence, over all V, from the renormalised teacher to the student
        p = torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, top_ids, p_top / p_top.sum(-1, keepdim=True))
        q = q_full
    elif tail == "renorm_both":
        p, q = p_top / p_top.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)
    else:
        p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    assert got.item() == pytest.approx(ref_divergence(p, q, beta)[mask].mean().item(), abs=1e-12)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_entry_that_is_minus_inf_or_nan_is_left_out(gen, mask, make_teacher, tail, beta):
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    _, top_ids, top_lp = make_teacher(2)
    value = topk_divergence_loss(student_logits, top_ids, top_lp, mask, beta=beta, tail=tail)
    (grad,) = torch.autograd.grad(value, student_logits)

    # Two padded entries, one of them repeating a real id: neither may count.
    pad_ids = torch.cat([top_ids, top_ids[..., :1], torch.full_like(top_ids[..., :1], V - 1)], -1)
    pad_lp = torch.cat([top_lp, torch.full_like(top_lp[..., :1], float("-inf")),
                        torch.full_like(top_lp[..., :1], float("nan"))], -1)
    padded = topk_divergence_loss(student_logits, pad_ids, pad_lp, mask, beta=beta, tail=tail)
    (padded_grad,) = torch.autograd.grad(padded, student_logits)
    assert padded.item() == pytest.approx(value.item(), abs=1e-12)
    assert torch.allclose(padded_grad, grad, atol=1e-12)


def test_rest_bucket_scales_a_teacher_top_k_above_one_back_to_one(gen, mask):
    """float16 rounding can make the stored top-k sum exceed 1; the rest is then 0, not negative."""
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    ids = torch.arange(V).expand(B, T, V)
    for beta in BETAS:
        exact = topk_divergence_loss(logits, ids, teacher_logp, mask, beta=beta, tail="rest_bucket")
        inflated = topk_divergence_loss(logits, ids, teacher_logp + 0.01, mask, beta=beta, tail="rest_bucket")
        assert inflated.item() == pytest.approx(exact.item(), abs=1e-12)


@pytest.mark.parametrize("tail", TAILS)
def test_topk_losses_are_zero_for_identical_distributions(gen, tail):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids = torch.arange(V).expand(B, T, V)
    for beta in BETAS:
        if tail == "renorm_teacher" and beta == 1:
            continue
        got = topk_divergence_loss(logits, ids, torch.log_softmax(logits, -1), torch.ones(B, T, dtype=torch.bool),
                                   beta=beta, tail=tail)
        assert abs(got.item()) < 1e-12


def test_topk_reverse_kl_against_renormalised_teacher_is_refused(gen, mask, make_teacher):
    _, top_ids, top_lp = make_teacher()
    with pytest.raises(ValueError, match="renorm_both or rest_bucket"):
        topk_divergence_loss(torch.randn(B, T, V), top_ids, top_lp, mask, beta=1.0, tail="renorm_teacher")
    with pytest.raises(ValueError, match="rest_bucket"):
        topk_divergence_loss(torch.randn(B, T, V), top_ids, top_lp, mask, tail="rest")


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_gradcheck(gen, mask, make_teacher, tail, beta):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    _, top_ids, top_lp = make_teacher(3)
    assert torch.autograd.gradcheck(
        lambda x: topk_divergence_loss(x, top_ids, top_lp, mask, beta=beta, tail=tail), (logits,))


@pytest.mark.parametrize("tail", TAILS)
def test_topk_response_token_without_finite_entries_adds_zero(gen, mask, make_teacher, tail):
    """It still counts in the mean's denominator, as every response token does."""
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    _, top_ids, top_lp = make_teacher(2)
    emptied = top_lp.clone()
    emptied[0, 1] = float("-inf")
    others = mask.clone()
    others[0, 1] = False
    sum_others = topk_divergence_loss(logits, top_ids, top_lp, others, tail=tail) * others.sum()
    got = topk_divergence_loss(logits, top_ids, emptied, mask, tail=tail)
    assert got.item() == pytest.approx(sum_others.item() / mask.sum().item(), abs=1e-12)

