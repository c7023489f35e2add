"""Losses against exact, hand-computed references (DESIGN.md sections 2 and 7.6)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TAILS, ConfigError, OpdConfig, from_dict
from pipeline.losses import (
    LOSSES,
    compute_loss,
    generalized_jsd,
    masked_mean,
    reverse_kl_estimate,
    sampled_token_opd_loss,
    select_tokens,
    sft_loss,
    student_entropy,
    token_logprobs,
    topk_divergence_loss,
)

B, T, V = 2, 3, 5
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
# Reverse KL against a teacher renormalised over its k is infinite (refused); every other pair is meaningful.
TAIL_BETAS = [(tail, beta) for tail in TAILS for beta in BETAS if not (tail == "renorm_teacher" and beta == 1)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _mask():
    return torch.tensor([[True, True, False], [True, False, False]])


def _ref_divergence(p, q, beta):
    """Generalized JSD over the last dim from probabilities (0 log 0 = 0), written independently of the library."""
    def kl(a, b):
        return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _rest_bucket_reverse_kl(student_logits, top_ids, top_logp):
    """KL(q || p) per position on (k cached ids, rest), both sides' rest = 1 - sum of their top-k."""
    q = torch.softmax(student_logits.double(), -1).gather(-1, top_ids)
    p = top_logp.double().exp()
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    return _ref_divergence(p, q, 1.0)


def _teacher(gen, k=2, dtype=torch.float64):
    full = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=dtype), -1)
    top_lp, top_ids = full.topk(k, -1)
    return full, top_ids, top_lp


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


# --- generalized JSD and the top-k losses -------------------------------------------------------


def test_generalized_jsd_endpoints_are_the_kl_forms_and_interior_is_trl_convention(gen):
    log_p = torch.log_softmax(torch.randn(4, V, generator=gen, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(4, V, generator=gen, dtype=torch.float64), -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || p)
    assert torch.allclose(generalized_jsd(log_p, log_q, 0.0), forward, atol=1e-14)
    assert torch.allclose(generalized_jsd(log_p, log_q, 1.0), reverse, atol=1e-14)
    for beta in (0.1, 0.5, 0.9):
        got = generalized_jsd(log_p, log_q, beta)
        assert torch.allclose(got, _ref_divergence(log_p.exp(), log_q.exp(), beta), atol=1e-14)
        # m = beta p + (1 - beta) q is symmetric under (p, q, beta) -> (q, p, 1 - beta).
        assert torch.allclose(got, generalized_jsd(log_q, log_p, 1 - beta), atol=1e-14)
        assert torch.allclose(generalized_jsd(log_p, log_p, beta), torch.zeros(4, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(log_p, log_q, 1.5)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_with_k_equal_v_are_the_exact_divergence(gen, tail, beta):
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    perm = torch.randperm(V, generator=gen)  # the cache's order is irrelevant
    ids = perm.expand(B, T, V)
    mask = _mask()
    got = topk_divergence_loss(student_logits, ids, teacher_logp[..., perm], mask, beta=beta, tail=tail)

    log_q = torch.log_softmax(student_logits, -1)
    if beta == 0:
        exact = F.kl_div(log_q, teacher_logp, log_target=True, reduction="none").sum(-1)
    elif beta == 1:
        exact = F.kl_div(teacher_logp, log_q, log_target=True, reduction="none").sum(-1)
    else:
        exact = _ref_divergence(teacher_logp.exp(), log_q.exp(), beta)
    assert got.item() == pytest.approx(exact[mask].mean().item(), abs=1e-12)

    # float16 storage of the teacher changes nothing beyond fp16 rounding. In rest_bucket the rounding
    # error of the top-k sum (~1e-3) lands in the rest bucket, against a student rest of ~0 here.
    half = topk_divergence_loss(student_logits, ids, teacher_logp[..., perm].half(), mask, beta=beta, tail=tail)
    assert half.item() == pytest.approx(got.item(), abs=1e-2 if tail == "rest_bucket" else 1e-3)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_on_a_partial_support_match_their_definition(gen, tail, beta):
    k = 2
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    _, top_ids, top_lp = _teacher(gen, k)
    mask = _mask()
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
    assert got.item() == pytest.approx(_ref_divergence(p, q, beta)[mask].mean().item(), abs=1e-12)


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_entry_that_is_minus_inf_or_nan_is_left_out(gen, tail, beta):
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    _, top_ids, top_lp = _teacher(gen, 2)
    mask = _mask()
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


def test_rest_bucket_scales_a_teacher_top_k_above_one_back_to_one(gen):
    """float16 rounding can make the stored top-k sum exceed 1; the rest is then 0, not negative."""
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    ids = torch.arange(V).expand(B, T, V)
    for beta in BETAS:
        exact = topk_divergence_loss(logits, ids, teacher_logp, _mask(), beta=beta, tail="rest_bucket")
        inflated = topk_divergence_loss(logits, ids, teacher_logp + 0.01, _mask(), beta=beta, tail="rest_bucket")
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


def test_topk_reverse_kl_against_renormalised_teacher_is_refused(gen):
    _, top_ids, top_lp = _teacher(gen)
    with pytest.raises(ValueError, match="renorm_both or rest_bucket"):
        topk_divergence_loss(torch.randn(B, T, V), top_ids, top_lp, _mask(), beta=1.0, tail="renorm_teacher")
    with pytest.raises(ValueError, match="rest_bucket"):
        topk_divergence_loss(torch.randn(B, T, V), top_ids, top_lp, _mask(), tail="rest")


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_topk_losses_gradcheck(gen, tail, beta):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    _, top_ids, top_lp = _teacher(gen, 3)
    mask = _mask()
    assert torch.autograd.gradcheck(
        lambda x: topk_divergence_loss(x, top_ids, top_lp, mask, beta=beta, tail=tail), (logits,))


@pytest.mark.parametrize("name", ["sft", "topk_fkl", "topk_rkl", "topk_jsd"])
def test_compute_loss_gradcheck_with_temperature_and_sft_mix(gen, name):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    _, top_ids, top_lp = _teacher(gen, 3)
    mask = _mask()

    def loss(x):
        return compute_loss(name, student_logits=x, targets=targets, mask=mask, teacher_topk_ids=top_ids,
                            teacher_topk_logprobs=top_lp, topk_tail="rest_bucket", jsd_beta=0.3, temperature=0.7,
                            sft_weight=0.5)["loss"]

    assert torch.autograd.gradcheck(loss, (logits,))


# --- sampled-token OPD --------------------------------------------------------------------------


def test_opd_reinforce_value_and_gradient_by_hand(gen):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    teacher_lp = teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = _mask()

    student_lp = token_logprobs(logits, targets)
    loss, clip_fraction = sampled_token_opd_loss(student_lp, teacher_lp, mask, clip_eps=None)
    (grad,) = torch.autograd.grad(loss, logits)

    logpi = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    advantage = (teacher_lp - logpi).detach()
    by_hand = -(advantage * logpi)[mask].sum() / mask.sum()
    (expected,) = torch.autograd.grad(by_hand, logits)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-12)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert clip_fraction.item() == 0.0

    # The on-policy PPO surrogate has the same gradient; its value is -mean(A), the reward.
    ppo, ppo_clip_fraction = sampled_token_opd_loss(token_logprobs(logits, targets), teacher_lp, mask)
    (ppo_grad,) = torch.autograd.grad(ppo, logits)
    assert torch.allclose(ppo_grad, expected, atol=1e-12)
    assert ppo.item() == pytest.approx(-advantage[mask].mean().item(), abs=1e-12)
    assert ppo_clip_fraction.item() == 0.0


def _enumerate_expected_grad(logits, teacher, sampler, **options):
    """sum_y sampler(y) * grad of compute_loss("opd") on the one-token sequence y (one position, V = len)."""
    v = logits.shape[-1]
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = torch.zeros_like(logits)
    for y in range(v):
        out = compute_loss("opd", student_logits=logits, targets=torch.full((1, 1), y), mask=mask,
                           teacher_logprobs=teacher[..., y], teacher_topk_ids=torch.arange(v).expand(1, 1, v),
                           teacher_topk_logprobs=teacher, behavior_logprobs=sampler.log()[..., y], **options)
        (g,) = torch.autograd.grad(out["loss"], logits)
        expected += sampler[0, 0, y] * g
    return expected


def _exact_reverse_kl_grad(logits, teacher):
    log_pi = torch.log_softmax(logits, -1)
    (grad,) = torch.autograd.grad((log_pi.exp() * (log_pi - teacher)).sum(), logits)
    return grad


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("vopd", [False, True])
def test_opd_expected_gradient_is_exact_reverse_kl_gradient(gen, clip_eps, vopd):
    """E_{y~pi}[grad surrogate(y)] == grad KL(pi || pi_T), enumerated exactly (one position, V=4).

    With k = V the vOPD baseline is the exact KL_t, a function of the prefix only: still unbiased.
    """
    logits = torch.randn(1, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 1, 4, generator=gen, dtype=torch.float64), -1)
    pi = torch.softmax(logits, -1).detach()
    expected = _enumerate_expected_grad(logits, teacher, pi, clip_eps=clip_eps, vopd=vopd)
    assert torch.allclose(expected, _exact_reverse_kl_grad(logits, teacher), atol=1e-12)


def test_truncated_importance_weight_corrects_off_policy_samples(gen):
    """y ~ mu != pi: min(pi/mu, c) with c above every ratio recovers the exact gradient; a low c clips the weight."""
    logits = torch.randn(1, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 1, 4, generator=gen, dtype=torch.float64), -1)
    mu = torch.softmax(torch.randn(1, 1, 4, generator=gen, dtype=torch.float64), -1)
    exact = _exact_reverse_kl_grad(logits, teacher)
    assert torch.allclose(_enumerate_expected_grad(logits, teacher, mu, importance_cap=1e6), exact, atol=1e-12)
    assert not torch.allclose(_enumerate_expected_grad(logits, teacher, mu), exact, atol=1e-3)

    pi = torch.softmax(logits, -1).detach()
    cap = 1.0
    by_hand = torch.zeros_like(logits)
    for y in range(4):
        log_pi_y = torch.log_softmax(logits, -1)[0, 0, y]
        weight = min((pi[0, 0, y] / mu[0, 0, y]).item(), cap)
        (g,) = torch.autograd.grad(-weight * (teacher[0, 0, y] - log_pi_y.detach()) * log_pi_y, logits)
        by_hand += mu[0, 0, y] * g
    got = _enumerate_expected_grad(logits, teacher, mu, importance_cap=cap)
    assert torch.allclose(got, by_hand, atol=1e-12)
    assert (pi / mu).max() > cap and (pi / mu).min() < cap  # the cap bites for some y, not all


def test_vopd_adds_the_topk_reverse_kl_to_the_advantage(gen):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = _teacher(gen, 2)
    teacher_lp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = _mask()
    baseline = _rest_bucket_reverse_kl(logits.detach(), top_ids, top_lp)
    assert (baseline[mask] > 0).all()

    got = compute_loss("opd", student_logits=logits, targets=targets, mask=mask, teacher_logprobs=teacher_lp,
                       teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, clip_eps=None, vopd=True)["loss"]
    log_pi = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    by_hand = -((teacher_lp - log_pi + baseline).detach() * log_pi)[mask].mean()
    assert got.item() == pytest.approx(by_hand.item(), abs=1e-12)
    (grad,) = torch.autograd.grad(got, logits)
    (expected_grad,) = torch.autograd.grad(by_hand, logits)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


def test_vopd_centres_the_advantage(gen):
    """With k = V, E_{y~pi}[log pi_T - log pi + KL_t] = 0; the on-policy PPO value is -A, so its mean is 0."""
    logits = torch.randn(1, 1, 4, generator=gen, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(1, 1, 4, generator=gen, dtype=torch.float64), -1)
    pi = torch.softmax(logits, -1)
    for vopd, expected in ((False, (pi * (pi.log() - teacher)).sum().item()), (True, 0.0)):
        mean = sum(pi[0, 0, y] * compute_loss(
            "opd", student_logits=logits, targets=torch.full((1, 1), y), mask=torch.ones(1, 1, dtype=torch.bool),
            teacher_logprobs=teacher[..., y], teacher_topk_ids=torch.arange(4).expand(1, 1, 4),
            teacher_topk_logprobs=teacher, vopd=vopd)["loss"] for y in range(4))
        assert mean.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("variant", ["reinforce", "ppo", "importance_weight", "ppo_importance_weight_baseline"])
def test_opd_gradcheck_with_detached_terms_held_fixed(gen, variant):
    """The surrogate's backward against finite differences, with A, w and the baseline held at their values.

    A = teacher - log pi is kept fixed by passing teacher = A0 + log pi (detached), and w = pi/mu by
    passing mu = pi (detached) / w0: finite differences then see the same constants that autograd
    treats as detached, so a gradient leaking through A, w or the baseline would fail the check.
    (On-policy PPO is no candidate: its value, -mean(A), is constant in theta by construction; its
    gradient is checked by hand above.)
    """
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = _mask()
    advantage = torch.randn(B, T, generator=gen, dtype=torch.float64)
    log_w = torch.tensor([[0.5, -0.7, 0.0], [0.2, 0.0, 0.0]], dtype=torch.float64)
    # Log-ratios to pi_old away from the clip's kinks at log(0.8) and log(1.2): two clipped, one inside.
    log_ratio = torch.tensor([[0.4, -0.05, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    clip_eps = None if variant in ("reinforce", "importance_weight") else 0.2
    weighted = "importance_weight" in variant
    baseline = torch.rand(B, T, generator=gen, dtype=torch.float64) if "baseline" in variant else None
    old_lp = token_logprobs(logits.detach(), targets) - log_ratio if clip_eps else None

    def loss(x):
        lp = token_logprobs(x, targets)
        return sampled_token_opd_loss(lp, advantage + lp.detach(), mask, clip_eps=clip_eps, old_logprobs=old_lp,
                                      behavior_logprobs=lp.detach() - log_w, importance_cap=1.5 if weighted else None,
                                      baseline=baseline)[0]

    assert torch.autograd.gradcheck(loss, (logits,))


def test_ppo_clip_value_zero_gradient_and_clip_fraction():
    eps = 0.2
    # Four tokens: (log-ratio, advantage). Clipping bites (constant objective) in cases 0 and 1;
    # case 2 is pessimistic (min keeps the unclipped term); case 3 is inside the region.
    log_ratio = torch.tensor([[0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    student = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    old = student.detach() - log_ratio
    teacher = student.detach() + adv
    mask = torch.ones(1, 4, dtype=torch.bool)

    loss, clip_fraction = sampled_token_opd_loss(student, teacher, mask, clip_eps=eps, old_logprobs=old)
    rho = log_ratio.exp()
    by_hand = -(1.2 * 1.0 + 0.8 * -1.0 + rho[0, 2].item() * -1.0 + 1.0 * 2.0) / 4
    assert loss.item() == pytest.approx(by_hand, abs=1e-12)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert not clip_fraction.requires_grad

    (grad,) = torch.autograd.grad(loss, student)
    assert grad[0, 0] == 0 and grad[0, 1] == 0
    assert grad[0, 2].item() == pytest.approx(-rho[0, 2].item() * -1.0 / 4, abs=1e-12)
    assert grad[0, 3].item() == pytest.approx(-2.0 / 4, abs=1e-12)

    # A masked clipped token counts in neither the loss nor the clip fraction.
    _, fraction = sampled_token_opd_loss(student, teacher, torch.tensor([[True, False, True, True]]),
                                         clip_eps=eps, old_logprobs=old)
    assert fraction.item() == pytest.approx(1 / 3)


# --- token selection and temperature ------------------------------------------------------------


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


@pytest.mark.parametrize("token_select", ["entropy", "divergence"])
def test_token_selection_narrows_the_distillation_terms_only(gen, token_select):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = _teacher(gen, 2)
    teacher_lp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    inputs = dict(student_logits=logits, targets=targets, mask=mask, teacher_logprobs=teacher_lp,
                  teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, sft_weight=0.5)
    out = compute_loss("opd+topk_fkl", **inputs, token_fraction=0.4, token_select=token_select)
    everything = compute_loss("opd+topk_fkl", **inputs)

    scores = student_entropy(logits) if token_select == "entropy" else _rest_bucket_reverse_kl(logits, top_ids, top_lp)
    kept = select_tokens(scores, mask, 0.4)
    assert kept.sum() == 2
    lp = token_logprobs(logits, targets)
    opd, _ = sampled_token_opd_loss(lp, teacher_lp, kept)
    fkl = topk_divergence_loss(logits, top_ids, top_lp, kept)
    assert out["opd"].item() == pytest.approx(opd.item(), abs=1e-12)
    assert out["topk_fkl"].item() == pytest.approx(fkl.item(), abs=1e-12)
    assert out["topk_fkl"].item() != pytest.approx(everything["topk_fkl"].item(), abs=1e-6)
    for key in ("sft", "entropy", "reverse_kl"):  # every response token
        assert out[key].item() == pytest.approx(everything[key].item(), abs=1e-12)
    assert out["entropy"].item() == pytest.approx(student_entropy(logits)[mask].mean().item(), abs=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_temperature_divides_the_student_logits_only(gen, name):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = _teacher(gen, 2)
    inputs = dict(targets=targets, mask=_mask(), teacher_logprobs=full.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                  teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, topk_tail="renorm_both")
    hot = compute_loss(name, student_logits=logits, temperature=2.0, **inputs)
    scaled = compute_loss(name, student_logits=logits / 2.0, **inputs)
    plain = compute_loss(name, student_logits=logits, **inputs)
    assert hot.keys() == scaled.keys()
    for key in hot:
        assert hot[key].item() == pytest.approx(scaled[key].item(), abs=1e-12), key
    assert hot["entropy"].item() > plain["entropy"].item()


# --- masks and degenerate inputs ----------------------------------------------------------------


def _all_finite(*tensors):
    return all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("name, tail", [(name, tail) for name in LOSSES for tail in TAILS
                                         if not (tail == "renorm_teacher" and name.endswith("topk_rkl"))])
def test_degenerate_inputs_stay_finite(gen, name, tail):
    """-inf teacher log-probs, NaN/inf padding, a truncated response (mask to the last position),
    a zero-length response, and a fully masked batch: no NaN or inf in the loss, the logged values
    or the gradient, and a fully masked batch gives exactly 0."""
    k = 3
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    mask = torch.tensor([[False, True, True], [False, False, False]])  # row 0: prompt + truncated response
    teacher_lp = torch.tensor([[float("nan"), float("-inf"), -1.0], [float("nan"), float("-inf"), 0.0]])
    behavior_lp = torch.tensor([[float("inf"), -1.0, float("-inf")], [float("nan"), float("inf"), -1.0]])
    topk_ids = torch.randint(0, V, (B, T, k), generator=gen)
    topk_ids[1] = -1
    topk_lp = torch.log_softmax(torch.randn(B, T, k, generator=gen), -1)
    topk_lp[0, 0] = float("nan")  # prompt position: garbage
    topk_lp[0, 1] = float("-inf")  # a response token whose cached entries are all -inf
    topk_lp[0, 2, 1:] = float("-inf")  # the teacher is certain: one entry survives
    topk_lp[1] = float("-inf")
    topk_lp = topk_lp.half()

    opd = name.startswith("opd")
    for m in (mask, torch.zeros_like(mask)):
        for options in (dict(clip_eps=None), dict(clip_eps=0.2, token_fraction=0.5, token_select="divergence"),
                        dict(importance_cap=2.0, vopd=True) if opd else dict(token_fraction=0.5)):
            out = compute_loss(name, student_logits=logits, targets=targets, mask=m, behavior_logprobs=behavior_lp,
                               teacher_logprobs=teacher_lp, teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_lp,
                               topk_tail=tail, jsd_beta=0.5, sft_weight=0.5, **options)
            (grad,) = torch.autograd.grad(out["loss"], logits)
            assert _all_finite(grad, *out.values()), (m, options, out)
            if not m.any():
                assert out["loss"].item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("tail", TAILS)
def test_topk_response_token_without_finite_entries_adds_zero(gen, tail):
    """It still counts in the mean's denominator, as every response token does."""
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    _, top_ids, top_lp = _teacher(gen, 2)
    mask = _mask()
    emptied = top_lp.clone()
    emptied[0, 1] = float("-inf")
    others = mask.clone()
    others[0, 1] = False
    sum_others = topk_divergence_loss(logits, top_ids, top_lp, others, tail=tail) * others.sum()
    got = topk_divergence_loss(logits, top_ids, emptied, mask, tail=tail)
    assert got.item() == pytest.approx(sum_others.item() / mask.sum().item(), abs=1e-12)


def test_reverse_kl_estimate_is_detached(gen):
    student = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, float("-inf")]])
    est = reverse_kl_estimate(student, teacher, torch.tensor([[True, True, False]]))
    assert not est.requires_grad and est.dtype == torch.float32
    assert est.item() == pytest.approx(((-1.0 + 1.5) + (-2.0 + 1.0)) / 2)


# --- compute_loss dispatch and configuration ----------------------------------------------------


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
    logits, mask = inputs["student_logits"], inputs["mask"]
    lp = token_logprobs(logits, inputs["targets"])
    sft = sft_loss(lp, mask)
    opd, _ = sampled_token_opd_loss(lp, inputs["teacher_logprobs"], mask)
    topk = {name: topk_divergence_loss(logits, inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"], mask,
                                       beta=beta, tail="rest_bucket")
            for name, beta in (("topk_fkl", 0.0), ("topk_rkl", 1.0), ("topk_jsd", 0.3))}
    terms = {"sft": sft, "opd": opd, **topk}
    diagnostics = {"entropy", "reverse_kl"}

    assert set(LOSSES) == {"sft", "opd", "topk_fkl", "topk_rkl", "topk_jsd", "opd+topk_fkl", "opd+topk_rkl",
                           "opd+topk_jsd"}
    for name in LOSSES:
        out = compute_loss(name, **inputs, topk_tail="rest_bucket", jsd_beta=0.3, sft_weight=0.25)
        parts = name.split("+")
        expected_keys = {"loss", *parts, "sft", *diagnostics} | ({"clip_fraction"} if "opd" in parts else set())
        assert set(out) == expected_keys, name
        expected = sum(terms[part] for part in parts) + (0.25 * sft if name != "sft" else 0)
        assert torch.allclose(out["loss"], expected), name
        for part in parts:
            assert torch.allclose(out[part], terms[part]), (name, part)
        assert out["loss"].requires_grad
        assert not any(out[key].requires_grad for key in out if key != "loss")

    no_teacher_lp = {key: val for key, val in inputs.items() if key != "teacher_logprobs"}
    assert set(compute_loss("topk_fkl", **no_teacher_lp)) == {"loss", "topk_fkl", "entropy"}


def test_compute_loss_errors(gen):
    inputs = _compute_inputs(gen)
    with pytest.raises(ValueError, match="opd\\+topk_jsd"):
        compute_loss("kl", **inputs)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_loss("opd", **{**inputs, "teacher_logprobs": None})
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        compute_loss("opd+topk_fkl", **{**inputs, "teacher_topk_ids": None})
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        compute_loss("topk_jsd", **{**inputs, "teacher_topk_logprobs": None})
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        compute_loss("opd", **{**inputs, "teacher_topk_ids": None}, vopd=True)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        compute_loss("opd", **{**inputs, "teacher_topk_ids": None}, token_fraction=0.5, token_select="divergence")
    with pytest.raises(ValueError, match="vopd"):
        compute_loss("topk_fkl", **inputs, vopd=True)
    with pytest.raises(ValueError, match="behavior_logprobs"):
        compute_loss("opd", **inputs, importance_cap=2.0)
    with pytest.raises(ValueError, match="clip_eps"):
        compute_loss("opd", **inputs, clip_eps=0.0)
    with pytest.raises(ValueError, match="needs clip_eps"):
        compute_loss("opd", **inputs, clip_eps=None, old_logprobs=inputs["teacher_logprobs"])
    with pytest.raises(ValueError, match="renorm_both or rest_bucket"):
        compute_loss("topk_rkl", **inputs)
    with pytest.raises(ValueError, match="divergence"):
        compute_loss("opd", **inputs, token_select="surprise")
    with pytest.raises(ValueError, match="temperature"):
        compute_loss("opd", **inputs, temperature=0.0)
    head = dict(hidden=torch.zeros(B, T, 2), lm_head_weight=torch.zeros(V, 2))
    with pytest.raises(ValueError, match="not both"):
        compute_loss("opd", **inputs, **head)
    with pytest.raises(ValueError, match="not both"):
        compute_loss("opd", **{**inputs, "student_logits": None})
    with pytest.raises(ValueError, match="chunk_size"):
        compute_loss("opd", **{**inputs, "student_logits": None}, **head, chunk_size=0)


def test_opd_config_validates_every_loss_option():
    for name in LOSSES:
        cfg = from_dict(OpdConfig, {"loss": name, "topk_tail": "rest_bucket"}, "opd")
        assert cfg.loss == name
    bad = [
        ({"loss": "kl"}, r"opd.loss must be one of \('sft', 'opd'"),
        ({"topk_tail": "rest"}, r"opd.topk_tail must be one of \('renorm_teacher', 'renorm_both', 'rest_bucket'\)"),
        ({"token_select": "random"}, r"opd.token_select must be one of \('entropy', 'divergence'\)"),
        ({"clip_eps": 0}, r"opd.clip_eps must be > 0 or null"),
        ({"importance_cap": -1}, r"opd.importance_cap must be > 0 or null"),
        ({"jsd_beta": 1.5}, r"opd.jsd_beta must be in \[0, 1\]"),
        ({"token_fraction": 0}, r"opd.token_fraction must be in \(0, 1\]"),
        ({"temperature": 0}, r"opd.temperature must be > 0"),
        ({"sft_weight": -1}, r"opd.sft_weight must be >= 0"),
        ({"loss_chunk_tokens": -1}, r"loss_chunk_tokens must be >= 0"),
        ({"loss": "topk_fkl", "vopd": True}, r"opd.vopd and opd.importance_cap act on the opd term"),
        ({"loss": "opd+topk_rkl"}, r"opd.topk_tail renorm_teacher .* use renorm_both or rest_bucket"),
        ({"loss": "topk_jsd", "jsd_beta": 1}, r"opd.topk_tail renorm_teacher"),
        ({"clip_against": "mu"}, r"opd.clip_against must be one of \('current', 'behavior'\)"),
        ({"clip_against": "behavior", "clip_eps": None}, r"clip_against behavior .* needs clip_eps"),
        ({"clip_against": "behavior", "importance_cap": 2.0}, r"excludes importance_cap"),
        ({"strategy": "fsdp_cpu_offload"}, r"the FSDP strategy here is fsdp"),
        ({"strategy": "fsdp", "refresh_every": 1}, r"fsdp keeps sharded"),
    ]
    for params, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(OpdConfig, params, "opd")
    assert from_dict(OpdConfig, {"strategy": "fsdp"}, "opd").loss_chunk_tokens == 1024  # FSDP with the chunked loss


# --- from hidden states: the logits a chunk of positions at a time -------------------------------

H, T_LONG = 4, 5
CHUNK_OPTIONS = {
    "plain": {},
    "entropy_selection": dict(token_fraction=0.5, temperature=0.7, sft_weight=0.3, topk_tail="rest_bucket"),
    "divergence_selection": dict(token_fraction=0.6, token_select="divergence", topk_tail="renorm_both", jsd_beta=0.3,
                                 clip_eps=None),
    "opd_options": dict(vopd=True, importance_cap=1.5, topk_tail="rest_bucket"),  # and old_logprobs
}
CHUNK_CASES = [(name, variant) for name in LOSSES for variant in CHUNK_OPTIONS
               if variant != "opd_options" or "opd" in name.split("+")]


def _hidden_inputs(gen, k=3, dtype=torch.float64):
    """Hidden states, an LM head with bias (leaves needing gradients) and the per-position signals: 7 response
    tokens over two rows, prompt positions with padding ids."""
    hidden = torch.randn(B, T_LONG, H, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T_LONG), generator=gen)
    targets[:, 0] = -100
    mask = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])
    teacher = torch.log_softmax(torch.randn(B, T_LONG, V, generator=gen, dtype=dtype), -1)
    top_lp, top_ids = teacher.topk(k, -1)
    teacher_lp = teacher.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    signals = dict(targets=targets, mask=mask, teacher_logprobs=teacher_lp,
                   behavior_logprobs=teacher_lp + torch.randn(B, T_LONG, generator=gen, dtype=dtype),
                   teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp)
    return hidden, weight, bias, signals


@pytest.mark.parametrize("name, variant", CHUNK_CASES)
def test_chunked_loss_equals_the_full_logits_loss(gen, name, variant):
    """Values and gradients (hidden, head weight, bias) for chunk sizes that do and do not divide the 7 tokens."""
    hidden, weight, bias, signals = _hidden_inputs(gen)
    options = dict(CHUNK_OPTIONS[variant])
    if variant == "opd_options":
        options["old_logprobs"] = signals["teacher_logprobs"] + 0.3 * torch.randn(B, T_LONG, generator=gen,
                                                                                   dtype=torch.float64)
    if name.endswith("topk_rkl") and "topk_tail" not in options:
        options["topk_tail"] = "rest_bucket"
    full = compute_loss(name, student_logits=F.linear(hidden, weight, bias), **signals, **options)
    expected = torch.autograd.grad(full["loss"], (hidden, weight, bias))
    for chunk_size in (1, 2, 3, 7, 64):
        out = compute_loss(name, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias, chunk_size=chunk_size,
                           **signals, **options)
        assert list(out) == list(full), chunk_size
        for key in full:
            assert torch.allclose(out[key], full[key], rtol=0, atol=1e-12), (chunk_size, key)
        assert out["loss"].requires_grad and not any(out[key].requires_grad for key in out if key != "loss")
        grads = torch.autograd.grad(out["loss"], (hidden, weight, bias))
        for got, want, of in zip(grads, expected, ("hidden", "weight", "bias")):
            assert torch.allclose(got, want, rtol=0, atol=1e-12), (chunk_size, of)


def test_chunked_loss_without_bias_under_no_grad_and_scaled(gen):
    hidden, weight, _, signals = _hidden_inputs(gen)
    full = compute_loss("opd+topk_jsd", student_logits=F.linear(hidden, weight), **signals, sft_weight=0.5)
    expected = torch.autograd.grad(3 * full["loss"], (hidden, weight))
    with torch.no_grad():
        untracked = compute_loss("opd+topk_jsd", hidden=hidden, lm_head_weight=weight, chunk_size=2, **signals,
                                 sft_weight=0.5)
    assert not untracked["loss"].requires_grad
    assert untracked["loss"].item() == pytest.approx(full["loss"].item(), abs=1e-12)
    # The backward pass scales the gradients taken in the forward pass by the loss's incoming gradient.
    out = compute_loss("opd+topk_jsd", hidden=hidden, lm_head_weight=weight, chunk_size=2, **signals, sft_weight=0.5)
    grads = torch.autograd.grad(3 * out["loss"], (hidden, weight), retain_graph=True)
    assert all(torch.allclose(got, want, rtol=0, atol=1e-12) for got, want in zip(grads, expected))
    with pytest.raises(RuntimeError, match="earlier backward"):
        out["loss"].backward()


def test_chunked_loss_on_an_empty_mask_is_zero_with_zero_gradients(gen):
    hidden, weight, bias, signals = _hidden_inputs(gen)
    signals["mask"] = torch.zeros_like(signals["mask"])
    for name in LOSSES:
        options = dict(topk_tail="rest_bucket", token_fraction=0.5, sft_weight=0.5)
        full = compute_loss(name, student_logits=F.linear(hidden, weight, bias), **signals, **options)
        out = compute_loss(name, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias, chunk_size=2, **signals,
                           **options)
        assert list(out) == list(full) and all(value.item() == 0.0 for value in out.values()), name
        grads = torch.autograd.grad(out["loss"], (hidden, weight, bias))
        assert all(not grad.any() for grad in grads), name


def test_chunked_loss_under_bf16_autocast_matches_to_bf16_rounding(gen):
    """The path Lightning's bf16-mixed takes: float32 hidden states and head, bfloat16 logits."""
    hidden, weight, _, signals = _hidden_inputs(gen, dtype=torch.float32)
    signals["teacher_topk_logprobs"] = signals["teacher_topk_logprobs"].half()
    with torch.autocast("cpu", torch.bfloat16):
        full = compute_loss("topk_fkl", student_logits=F.linear(hidden, weight), **signals, sft_weight=0.5)
        out = compute_loss("topk_fkl", hidden=hidden, lm_head_weight=weight, chunk_size=3, **signals, sft_weight=0.5)
    for key in full:
        assert out[key].dtype == full[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(full[key].item(), rel=1e-5), key
    expected = torch.autograd.grad(full["loss"], (hidden, weight))
    for got, want in zip(torch.autograd.grad(out["loss"], (hidden, weight)), expected):
        # Each chunk's bfloat16 product is summed into float32, the full one's once: bfloat16 rounding apart.
        assert got.dtype == want.dtype == torch.float32
        assert torch.allclose(got, want, rtol=0, atol=1e-2 * want.abs().max().item())


def test_training_step_from_hidden_states_matches_full_logits():
    """DistillModule with loss_chunk_tokens > 0 (the default) and 0: the same loss and parameter gradients,
    for an OPD config and for the SFT stages' TrainConfig."""
    import numpy as np

    from pipeline import data, models, toy_task
    from pipeline.config import ToyModelConfig, TrainConfig
    from pipeline.training import DistillModule

    tokenizer = toy_task.build_tokenizer()
    model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0).double()
    rng = np.random.default_rng(0)
    vocab, k = len(tokenizer), 4
    rows = [{"prompt_ids": rng.integers(3, vocab, 5), "response_ids": rng.integers(3, vocab, r),
             "behavior_logprobs": -rng.random(r).astype(np.float32),
             "teacher_logprobs": -rng.random(r).astype(np.float32),
             "teacher_topk_ids": rng.integers(0, vocab, (r, k)).astype(np.int32),
             "teacher_topk_logprobs": np.sort(-rng.exponential(1.0, (r, k)), axis=1)[:, ::-1].astype(np.float16)}
            for r in (1, 5, 3, 4)]
    batch = next(iter(data.in_memory(rows, 4, tokenizer.pad_token_id, 0).train_dataloader()))
    opd = dict(loss="opd+topk_fkl", token_fraction=0.5, vopd=True, sft_weight=0.2)
    for make, loss in ((lambda chunk: OpdConfig(**opd, loss_chunk_tokens=chunk), opd["loss"]),
                       (lambda chunk: TrainConfig(loss_chunk_tokens=chunk), "sft")):
        results = []
        for chunk in (0, 3):
            model.zero_grad()
            value = DistillModule(model, make(chunk), loss).training_step(batch, 0)
            value.backward()
            results.append((value.item(), [p.grad.clone() for p in model.parameters()]))
        (full, full_grads), (chunked, chunked_grads) = results
        assert chunked == pytest.approx(full, abs=1e-12), loss
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(chunked_grads, full_grads)), loss
