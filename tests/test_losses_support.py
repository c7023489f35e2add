"""Top-k losses on the union of supports (opd.topk_support union): the sampled token, the teacher's top-k and the
behaviour policy's top-k_s, each id once, plus one rest bucket, against exact references."""

import pytest
import torch

from pipeline.config import TAILS, ConfigError, OpdConfig
from pipeline.losses import compute_loss, union_support
from tests.conftest import B, T, V, ref_divergence

BETAS = (0.0, 0.5, 1.0)
TAIL_BETAS = [(tail, beta) for tail in TAILS for beta in BETAS if not (tail == "renorm_teacher" and beta == 1)]
NAMES = {0.0: "topk_fkl", 1.0: "topk_rkl", 0.5: "topk_jsd"}


def _union_loss(logits, teacher_full, targets, teacher_ids, behavior_ids, mask, beta, tail, **extra):
    """compute_loss on the union support, the teacher signals gathered from the full teacher log-probs."""
    return compute_loss(
        NAMES[beta], student_logits=logits, targets=targets, mask=mask, jsd_beta=beta, topk_tail=tail,
        topk_support="union", teacher_logprobs=teacher_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        teacher_topk_ids=teacher_ids, teacher_topk_logprobs=teacher_full.gather(-1, teacher_ids),
        behavior_topk_ids=behavior_ids, teacher_behavior_topk_logprobs=teacher_full.gather(-1, behavior_ids), **extra,
    )["loss"]


def _supports(gen, k=2, k_s=2):
    """Teacher full log-probs, student logits, targets, the teacher's top-k and a behaviour top-k_s of random ids."""
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    behavior = torch.randn(B, T, V, generator=gen).topk(k_s, -1).indices
    return teacher, logits, targets, teacher.topk(k, -1).indices, behavior


def test_union_support_keeps_each_id_once_and_its_first_finite_entry():
    ids = [torch.tensor([[3]]), torch.tensor([[1, 3, 4]]), torch.tensor([[4, 1, 0]])]
    lps = [torch.tensor([[-0.5]]), torch.tensor([[-1.0, -0.7, float("-inf")]]), torch.tensor([[-2.0, -1.2, -3.0]])]
    entries, logp = union_support(ids, lps)
    assert entries.tolist() == [[3, 1, 3, 4, 4, 1, 0]]
    # the second 3 and 1 are repeats; the first 4 is padding (-inf), so the behaviour top-k's 4 is the one kept
    assert logp.tolist() == [[-0.5, -1.0, float("-inf"), float("-inf"), -2.0, float("-inf"), -3.0]]


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_union_covering_the_vocabulary_is_the_exact_divergence(gen, mask, tail, beta):
    """Teacher top-3 and behaviour top-3 of V = 5, overlapping, plus the sampled token: all of V, every id once."""
    teacher, logits, targets, _, _ = _supports(gen)
    perm = torch.randperm(V, generator=gen)
    teacher_ids, behavior_ids = perm[:3].expand(B, T, 3), perm[2:].expand(B, T, 3)
    got = _union_loss(logits, teacher, targets, teacher_ids, behavior_ids, mask, beta, tail)
    exact = ref_divergence(teacher.exp(), torch.softmax(logits, -1), beta)
    assert got.item() == pytest.approx(exact[mask].mean().item(), abs=1e-12)
    # Without the behaviour ids the teacher's 3 miss two tokens: the union is what makes the value exact.
    teacher_only = compute_loss(NAMES[beta], student_logits=logits, targets=targets, mask=mask, jsd_beta=beta,
                                topk_tail=tail, teacher_topk_ids=teacher_ids,
                                teacher_topk_logprobs=teacher.gather(-1, teacher_ids))["loss"]
    assert abs(teacher_only.item() - exact[mask].mean().item()) > 1e-6


@pytest.mark.parametrize("tail, beta", TAIL_BETAS)
def test_union_on_a_partial_support_matches_its_definition(gen, mask, tail, beta):
    """The reference builds each position's set of ids in Python and its buckets from probabilities."""
    teacher, logits, targets, teacher_ids, behavior_ids = _supports(gen)
    got = _union_loss(logits, teacher, targets, teacher_ids, behavior_ids, mask, beta, tail)
    p_full, q_full = teacher.exp(), torch.softmax(logits, -1)
    values = []
    for b, t in mask.nonzero().tolist():
        support = sorted({targets[b, t].item(), *teacher_ids[b, t].tolist(), *behavior_ids[b, t].tolist()})
        p, q = p_full[b, t, support], q_full[b, t, support]
        if tail == "renorm_teacher":  # the renormalised teacher against the full student
            p = torch.zeros(V, dtype=p.dtype).index_put((torch.tensor(support),), p / p.sum())
            q = q_full[b, t]
        elif tail == "renorm_both":
            p, q = p / p.sum(), q / q.sum()
        else:
            # a set that covers V leaves a rest of 0 (up to rounding: clamped, as the library floors it)
            p, q = (torch.cat([x, (1 - x.sum(-1, keepdim=True)).clamp_min(0)]) for x in (p, q))
        values.append(ref_divergence(p, q, beta))
    assert got.item() == pytest.approx(torch.stack(values).mean().item(), abs=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_union_losses_gradcheck(gen, mask, beta):
    teacher, logits, targets, teacher_ids, behavior_ids = _supports(gen)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: _union_loss(x, teacher, targets, teacher_ids, behavior_ids, mask, beta, "rest_bucket"), (logits,))


def test_union_needs_the_behaviour_signals_and_a_term_that_reads_the_top_k(gen, mask):
    teacher, logits, targets, teacher_ids, _ = _supports(gen)
    with pytest.raises(ValueError, match="needs behavior_topk_ids"):
        compute_loss("topk_rkl", student_logits=logits, targets=targets, mask=mask, topk_tail="rest_bucket",
                     topk_support="union", teacher_logprobs=teacher[..., 0], teacher_topk_ids=teacher_ids,
                     teacher_topk_logprobs=teacher.gather(-1, teacher_ids))
    with pytest.raises(ConfigError, match="topk_support acts on the top-k terms"):
        OpdConfig(loss="opd", topk_support="union")
    with pytest.raises(ConfigError, match="topk_support must be one of"):
        OpdConfig(loss="topk_fkl", topk_support="student")
    assert OpdConfig(loss="opd", vopd=True, topk_support="union").topk_support == "union"


def test_union_of_identical_distributions_is_zero(gen, mask):
    teacher, _, targets, teacher_ids, behavior_ids = _supports(gen)
    for beta in BETAS:
        got = _union_loss(teacher.clone(), teacher, targets, teacher_ids, behavior_ids, mask, beta, "rest_bucket")
        assert abs(got.item()) < 1e-12
