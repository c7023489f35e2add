"""Distillation losses as pure tensor functions (DESIGN.md section 2).

Shapes: B sequences, T positions, V vocabulary, k cached teacher entries per position.
``logits[:, t]`` scores ``targets[:, t]``: callers shift, these functions do not.
Masks are bool ``[B, T]``; every loss is a token-level mean over the whole batch.

Padding and masked positions may hold any value (-100 ids, -inf or NaN log-probs).
They are neutralised with ``torch.where`` *before* any arithmetic, never by multiplying
with the mask: ``inf * 0`` is NaN, and a NaN in the unselected branch of a ``where`` still
turns into a NaN gradient (0 * inf in the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import LOSSES  # the names compute_loss accepts, declared with the configs that choose one

TEACHER_LOGPROB_FLOOR = -1e4
"""Stand-in for a teacher log-prob of -inf (token outside the teacher's processed support).
Far below anything finite logits produce, yet finite, so advantages and gradients stay finite."""


def _f32(x: Tensor) -> Tensor:
    """Upcast half/bf16 to float32; float64 stays float64 (exact reference tests use it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_normalizer(logits: Tensor) -> Tensor:
    """log sum_v exp(logits) in (at least) float32, ``[B, T]``.

    Gathering a few logits and subtracting this avoids materialising (and saving for
    backward) a full ``[B, T, V]`` log-softmax output.
    """
    return torch.logsumexp(_f32(logits), dim=-1)


def _gather_logprobs(logits: Tensor, ids: Tensor, log_z: Tensor) -> Tensor:
    """log_softmax(logits) at ``ids`` (``[B, T]`` or ``[B, T, k]``), at least float32."""
    # Padding ids (-100, vocab-sized sentinels) would make gather fail; the mask drops them.
    safe_ids = ids.long().clamp(0, logits.shape[-1] - 1)
    squeeze = safe_ids.dim() == logits.dim() - 1
    if squeeze:
        safe_ids = safe_ids.unsqueeze(-1)
    picked = _f32(logits.gather(-1, safe_ids))
    if squeeze:
        return picked.squeeze(-1) - log_z
    return picked - log_z.unsqueeze(-1)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of each target token: ``[B, T, V], [B, T] -> [B, T]`` float32 (float64 if given)."""
    return _gather_logprobs(logits, targets, _log_normalizer(logits))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask == True`` entries; 0 (still differentiable) if none."""
    mask = mask.to(torch.bool)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    # clamp keeps an empty mask at 0/1 = 0 rather than 0/0 = NaN, and the graph stays attached.
    return total / mask.sum().clamp_min(1).to(total.dtype)


def sft_loss(student_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-level cross-entropy on the given targets."""
    return masked_mean(-student_logprobs, mask)


def _finite_teacher(teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Teacher token log-probs with -inf floored and masked positions zeroed (float32)."""
    teacher = _f32(teacher_logprobs).clamp_min(TEACHER_LOGPROB_FLOOR)
    return torch.where(mask, teacher, torch.zeros_like(teacher))


def sampled_token_opd_loss(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> Tensor:
    """Sampled-token OPD surrogate (the paper's loss).

    A = log pi_T - log pi_theta (detached), rho = pi_theta / pi_old;
    loss = -mean(rho * A), or the PPO-clipped ``-mean(min(rho*A, clip(rho)*A))``.
    With ``old_logprobs = student_logprobs.detach()`` rho is 1 with gradient grad log pi, so
    the gradient is the single-sample estimate of grad KL(pi_theta || pi_T).
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    mask = mask.to(torch.bool)
    student = _f32(student_logprobs)
    teacher = _finite_teacher(teacher_logprobs, mask)
    advantage = torch.where(mask, teacher - student, torch.zeros_like(student)).detach()
    # Masked log-ratio is set to 0 before exp so padded old log-probs cannot overflow rho.
    log_ratio = torch.where(mask, student - old_logprobs.detach().to(student.dtype), torch.zeros_like(student))
    rho = torch.exp(log_ratio)
    objective = rho * advantage
    if clip_eps is not None:
        clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
        objective = torch.minimum(objective, clipped)
    return -masked_mean(objective, mask)


def _topk_forward_kl(
    student_logits: Tensor,
    log_z: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
) -> Tensor:
    mask = mask.to(torch.bool)
    teacher = _f32(teacher_topk_logprobs)
    # Masked rows may be all -inf/NaN (softmax -> NaN); give them a harmless uniform instead.
    teacher = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    teacher_logp = torch.log_softmax(teacher, dim=-1)  # renormalised over the k cached entries
    teacher_p = teacher_logp.exp()
    student_logq = _gather_logprobs(student_logits, teacher_topk_ids, log_z)
    # xlogy gives 0 where p = 0 (teacher -inf entries) instead of 0 * -inf = NaN.
    per_token = (torch.special.xlogy(teacher_p, teacher_p) - teacher_p * student_logq).sum(-1)
    return masked_mean(per_token, mask)


def topk_forward_kl_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
) -> Tensor:
    """Forward KL(p_T || p_S) on the teacher's top-k support, teacher renormalised over its k.

    Per token: sum_k p_k (log p_k - log q_k), p = softmax(teacher top-k log-probs),
    q = student softmax over the full vocabulary. Equals the exact KL when k = V.
    """
    log_z = _log_normalizer(student_logits)
    return _topk_forward_kl(student_logits, log_z, teacher_topk_ids, teacher_topk_logprobs, mask)


@torch.no_grad()
def reverse_kl_estimate(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Diagnostic single-sample estimate of KL(pi_theta || pi_T): mean(log pi - log pi_T)."""
    mask = mask.to(torch.bool)
    teacher = _finite_teacher(teacher_logprobs, mask)
    return masked_mean(_f32(student_logprobs) - teacher, mask).detach()


def compute_loss(
    name: str,
    *,
    student_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    clip_eps: float | None = 0.2,
    sft_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Dispatch a loss by name; returns ``{"loss": total, <component>: value, ...}``.

    Only ``"loss"`` carries a graph; components (and ``"reverse_kl"``, present whenever
    ``teacher_logprobs`` is given) are detached, for logging.
    ``old_logprobs=None`` means on-policy: the current student log-probs, detached (rho = 1).
    ``sft_weight > 0`` adds ``sft_weight * sft`` to a distillation loss; it is ignored for ``"sft"``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    mask = mask.to(torch.bool)
    uses_opd = name in ("opd", "opd+topk_fkl")
    uses_topk = name in ("topk_fkl", "opd+topk_fkl")
    uses_sft = name == "sft" or sft_weight > 0
    if uses_opd and teacher_logprobs is None:
        raise ValueError(f"loss {name!r} needs teacher_logprobs")
    if uses_topk:
        for arg, value in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
            if value is None:
                raise ValueError(f"loss {name!r} needs {arg}")

    # One normaliser shared by every component: the float32 cast of bf16 logits is then
    # made (and saved for backward) once, not once per loss.
    log_z = _log_normalizer(student_logits)
    student_lp = None
    if uses_opd or uses_sft or teacher_logprobs is not None:
        student_lp = _gather_logprobs(student_logits, targets, log_z)

    total = student_logits.new_zeros((), dtype=torch.float32)
    out: dict[str, Tensor] = {}
    if uses_opd:
        old = student_lp.detach() if old_logprobs is None else old_logprobs
        opd = sampled_token_opd_loss(student_lp, old, teacher_logprobs, mask, clip_eps=clip_eps)
        total = total + opd
        out["opd"] = opd.detach()
    if uses_topk:
        fkl = _topk_forward_kl(student_logits, log_z, teacher_topk_ids, teacher_topk_logprobs, mask)
        total = total + fkl
        out["topk_fkl"] = fkl.detach()
    if uses_sft:
        sft = sft_loss(student_lp, mask)
        total = total + (sft if name == "sft" else sft_weight * sft)
        out["sft"] = sft.detach()
    if teacher_logprobs is not None:
        out["reverse_kl"] = reverse_kl_estimate(student_lp, teacher_logprobs, mask)
    return {"loss": total, **out}
