"""Losses against exact, hand-computed references (DESIGN.md sections 2 and 7.6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    LOSSES,
    compute_loss,
    masked_mean,
    reverse_kl_estimate,
    sampled_token_opd_loss,
    sft_loss,
    token_logprobs,
    topk_forward_kl_loss,
)

B, T, V = 2, 3, 5


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _mask():
    return torch.tensor([[True, True, False], [True, False, False]])


def _exact_fkl_per_token(teacher_logp, student_logits):
    """sum_v p (log p - log q) by explicit loops, teacher given as log-probs over its support."""
    out = torch.zeros(teacher_logp.shape[:2], dtype=torch.float64)
    for b in range(teacher_logp.shape[0]):
        for t in range(teacher_logp.shape[1]):
            log_q = torch.log_softmax(student_logits[b, t].double(), -1)
            for v in range(teacher_logp.shape[2]):
                p = math.exp(teacher_logp[b, t, v])
                out[b, t] += p * (teacher_logp[b, t, v] - log_q[v])
    return out


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


def test_sft_loss_is_cross_entropy(gen):
    logits = torch.randn(B, T, V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = _mask()
    ce_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    expected = F.cross_entropy(logits.reshape(-1, V), ce_targets.reshape(-1), ignore_index=-100)
    got = sft_loss(token_logprobs(logits, targets), mask)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_topk_fkl_full_vocab_equals_exact_kl(gen):
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    ids = torch.arange(V).expand(B, T, V)
    mask = _mask()
    got = topk_forward_kl_loss(student_logits, ids, teacher_logp, mask)

    per_token = F.kl_div(torch.log_softmax(student_logits, -1), teacher_logp, log_target=True,
                         reduction="none").sum(-1)
    assert got.item() == pytest.approx(per_token[mask].mean().item(), abs=1e-12)
    assert got.item() == pytest.approx(_exact_fkl_per_token(teacher_logp, student_logits)[mask].mean().item(),
                                       abs=1e-12)

    # Shuffled cache order and float16 teacher storage change nothing beyond fp16 rounding.
    perm = torch.randperm(V, generator=gen)
    shuffled = topk_forward_kl_loss(student_logits, ids[..., perm], teacher_logp[..., perm].half(), mask)
    assert shuffled.item() == pytest.approx(got.item(), abs=1e-3)


def test_topk_fkl_identical_distributions_is_zero(gen):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids = torch.arange(V).expand(B, T, V)
    got = topk_forward_kl_loss(logits, ids, torch.log_softmax(logits, -1), torch.ones(B, T, dtype=torch.bool))
    assert abs(got.item()) < 1e-12


def test_topk_fkl_partial_support_renormalises_teacher(gen):
    k = 2
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_full = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    top_logp, top_ids = teacher_full.topk(k, dim=-1)
    mask = _mask()
    got = topk_forward_kl_loss(student_logits, top_ids, top_logp, mask)

    expected = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = top_logp[b, t].exp() / top_logp[b, t].exp().sum()
            log_q = torch.log_softmax(student_logits[b, t], -1)[top_ids[b, t]]
            expected[b, t] = (p * (p.log() - log_q)).sum()
    assert got.item() == pytest.approx(expected[mask].mean().item(), abs=1e-12)

    # A -inf entry is the same as leaving that entry out.
    pad_ids = torch.cat([top_ids, torch.zeros_like(top_ids[..., :1])], -1)
    pad_logp = torch.cat([top_logp, torch.full_like(top_logp[..., :1], float("-inf"))], -1)
    assert topk_forward_kl_loss(student_logits, pad_ids, pad_logp, mask).item() == pytest.approx(got.item(),
                                                                                                  abs=1e-9)


def test_opd_gradient_matches_reinforce_by_hand(gen):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    teacher_lp = teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = _mask()

    student_lp = token_logprobs(logits, targets)
    loss = sampled_token_opd_loss(student_lp, student_lp.detach(), teacher_lp, mask, clip_eps=None)
    (grad,) = torch.autograd.grad(loss, logits)

    logpi = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    advantage = (teacher_lp - logpi).detach()
    by_hand = -(advantage * logpi)[mask].sum() / mask.sum()
    (expected,) = torch.autograd.grad(by_hand, logits)
    assert torch.allclose(grad, expected, atol=1e-12)
    # On-policy, the loss value itself is -mean(A): the reward, not the KL.
    assert loss.item() == pytest.approx(-advantage[mask].mean().item(), abs=1e-6)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_opd_expected_gradient_is_exact_reverse_kl_gradient(gen, clip_eps):
    """E_{y~pi}[grad surrogate(y)] == grad KL(pi || pi_T), enumerated exactly (one position, V=4)."""
    v = 4
    logits = torch.randn(1, 1, v, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 1, v, generator=gen, dtype=torch.float64), -1)
    mask = torch.ones(1, 1, dtype=torch.bool)

    expected_grad = torch.zeros_like(logits)
    pi = torch.softmax(logits, -1).detach()
    for y in range(v):
        target = torch.full((1, 1), y)
        student_lp = token_logprobs(logits, target)
        surrogate = sampled_token_opd_loss(student_lp, student_lp.detach(), teacher[..., y], mask, clip_eps=clip_eps)
        (g,) = torch.autograd.grad(surrogate, logits)
        expected_grad += pi[0, 0, y] * g

    log_pi = torch.log_softmax(logits, -1)
    reverse_kl = (log_pi.exp() * (log_pi - teacher)).sum()
    (exact,) = torch.autograd.grad(reverse_kl, logits)
    assert torch.allclose(expected_grad, exact, atol=1e-12)


def test_ppo_clip_value_and_zero_gradient_outside_trust_region():
    eps = 0.2
    # Four tokens: (log-ratio, advantage). Clipping bites (constant objective) in cases 0 and 1;
    # case 2 is pessimistic (min keeps the unclipped term); case 3 is inside the region.
    log_ratio = torch.tensor([[0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    student = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    old = student.detach() - log_ratio
    teacher = student.detach() + adv
    mask = torch.ones(1, 4, dtype=torch.bool)

    loss = sampled_token_opd_loss(student, old, teacher, mask, clip_eps=eps)
    rho = log_ratio.exp()
    by_hand = -(1.2 * 1.0 + 0.8 * -1.0 + rho[0, 2].item() * -1.0 + 1.0 * 2.0) / 4
    assert loss.item() == pytest.approx(by_hand, abs=1e-12)

    (grad,) = torch.autograd.grad(loss, student)
    assert grad[0, 0] == 0 and grad[0, 1] == 0
    assert grad[0, 2].item() == pytest.approx(-rho[0, 2].item() * -1.0 / 4, abs=1e-12)
    assert grad[0, 3].item() == pytest.approx(-2.0 / 4, abs=1e-12)


def _all_finite(*tensors):
    return all(torch.isfinite(t).all() for t in tensors)


def test_degenerate_inputs_stay_finite(gen):
    """-inf teacher log-probs, an empty row, garbage in padding, and a fully masked batch."""
    k = 3
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    targets = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1: zero-length response
    teacher_lp = torch.tensor([[float("-inf"), -1.0, float("nan")], [float("nan"), float("-inf"), 0.0]])
    old_lp = torch.tensor([[-1.0, -1.0, float("-inf")], [float("inf"), float("nan"), -1.0]])
    topk_ids = torch.randint(0, V, (B, T, k), generator=gen)
    topk_ids[1] = -1
    topk_lp = torch.log_softmax(torch.randn(B, T, k, generator=gen), -1)
    topk_lp[0, 0, 1:] = float("-inf")  # teacher is certain: only one entry survives
    topk_lp[0, 2] = float("nan")  # padding garbage
    topk_lp[1] = float("-inf")
    topk_lp = topk_lp.half()

    for m in (mask, torch.zeros_like(mask)):
        for clip_eps in (None, 0.2):
            out = compute_loss("opd+topk_fkl", student_logits=logits, targets=targets, mask=m,
                               old_logprobs=old_lp, teacher_logprobs=teacher_lp, teacher_topk_ids=topk_ids,
                               teacher_topk_logprobs=topk_lp, clip_eps=clip_eps, sft_weight=0.5)
            (grad,) = torch.autograd.grad(out["loss"], logits)
            assert _all_finite(grad, *out.values()), (m, clip_eps, out)
            if not m.any():
                assert out["loss"].item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_reverse_kl_estimate_is_detached(gen):
    student = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, float("-inf")]])
    est = reverse_kl_estimate(student, teacher, torch.tensor([[True, True, False]]))
    assert not est.requires_grad and est.dtype == torch.float32
    assert est.item() == pytest.approx(((-1.0 + 1.5) + (-2.0 + 1.0)) / 2)


def _compute_inputs(gen, k=2):
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen), -1)
    top_lp, top_ids = teacher.topk(k, -1)
    return dict(student_logits=logits, targets=targets, mask=_mask(),
                teacher_logprobs=teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp)


def test_compute_loss_dispatch_and_components(gen):
    inputs = _compute_inputs(gen)
    lp = token_logprobs(inputs["student_logits"], inputs["targets"])
    mask = inputs["mask"]
    sft = sft_loss(lp, mask)
    opd = sampled_token_opd_loss(lp, lp.detach(), inputs["teacher_logprobs"], mask)
    fkl = topk_forward_kl_loss(inputs["student_logits"], inputs["teacher_topk_ids"],
                               inputs["teacher_topk_logprobs"], mask)

    out = compute_loss("sft", **inputs)
    assert set(out) == {"loss", "sft", "reverse_kl"}
    assert torch.allclose(out["loss"], sft)

    out = compute_loss("opd", **inputs)
    assert set(out) == {"loss", "opd", "reverse_kl"}
    assert torch.allclose(out["loss"], opd)
    assert torch.allclose(out["reverse_kl"], reverse_kl_estimate(lp, inputs["teacher_logprobs"], mask))

    no_teacher_lp = {key: val for key, val in inputs.items() if key != "teacher_logprobs"}
    out = compute_loss("topk_fkl", **no_teacher_lp)
    assert set(out) == {"loss", "topk_fkl"}
    assert torch.allclose(out["loss"], fkl)

    out = compute_loss("opd+topk_fkl", **inputs, sft_weight=0.25)
    assert set(out) == {"loss", "opd", "topk_fkl", "sft", "reverse_kl"}
    assert torch.allclose(out["loss"], opd + fkl + 0.25 * sft)
    assert out["loss"].requires_grad
    assert not any(out[key].requires_grad for key in out if key != "loss")
    assert set(LOSSES) == {"sft", "opd", "topk_fkl", "opd+topk_fkl"}


def test_compute_loss_errors(gen):
    inputs = _compute_inputs(gen)
    with pytest.raises(ValueError, match="opd\\+topk_fkl"):
        compute_loss("kl", **inputs)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_loss("opd", **{**inputs, "teacher_logprobs": None})
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        compute_loss("opd+topk_fkl", **{**inputs, "teacher_topk_ids": None})
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        compute_loss("topk_fkl", **{**inputs, "teacher_topk_logprobs": None})
    with pytest.raises(ValueError, match="clip_eps"):
        compute_loss("opd", **inputs, clip_eps=0.0)
