"""Sampled-token OPD: values and gradients by hand, the expected gradient enumerated exactly, importance weights,
vOPD and the PPO clip."""

import pytest
import torch

from pipeline.losses import compute_loss, sampled_token_opd_loss, token_logprobs
from tests.conftest import B, T, V, rest_bucket_reverse_kl


def test_opd_reinforce_value_and_gradient_by_hand(gen, mask):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    teacher_lp = teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

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


def test_vopd_adds_the_topk_reverse_kl_to_the_advantage(gen, mask, make_teacher):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = make_teacher(2)
    teacher_lp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    baseline = rest_bucket_reverse_kl(logits.detach(), top_ids, top_lp)
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
def test_opd_gradcheck_with_detached_terms_held_fixed(gen, mask, variant):
    """The surrogate's backward against finite differences, with A, w and the baseline held at their values.

    A = teacher - log pi is kept fixed by passing teacher = A0 + log pi (detached), and w = pi/mu by
    passing mu = pi (detached) / w0: finite differences then see the same constants that autograd
    treats as detached, so a gradient leaking through A, w or the baseline would fail the check.
    (On-policy PPO is no candidate: its value, -mean(A), is constant in theta by construction; its
    gradient is checked by hand above.)
    """
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
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

