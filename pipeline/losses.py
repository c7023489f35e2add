"""Distillation losses as pure tensor functions, and the Objective that combines them (docs/design.md, "The method").

Shapes: B sequences, T positions, V vocabulary, k cached teacher entries per position.
``logits[:, t]`` scores ``targets[:, t]``: callers shift, these functions do not.
Masks are bool ``[B, T]``; every loss is a token-level mean over the whole batch.

An Objective is the loss of one pipeline.config.ObjectiveConfig (its name and options, all checked there), built
once; it takes the student's logits, or (to keep a ``[B, T, V]`` logits tensor from ever existing) its final hidden
states and LM head, whose logits it computes a chunk of response positions at a time. compute_loss builds one and
calls it.

The cached teacher log-probs (sampled token and top-k) are the teacher's raw log-probs, at
temperature 1; the option ``temperature`` divides the student's logits only.

Padding and masked positions may hold any value (-100 ids, -inf or NaN log-probs).
They are neutralised with ``torch.where`` *before* any arithmetic, never by multiplying
with the mask: ``inf * 0`` is NaN, and a NaN in the unselected branch of a ``where`` still
turns into a NaN gradient (0 * inf in the backward pass).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# The objective's names and options are declared, and checked, with the configs that choose them.
from pipeline.config import LOSSES, TAILS, ObjectiveConfig  # noqa: F401 (LOSSES: the loss names, for callers)

TEACHER_LOGPROB_FLOOR = -1e4
"""Stand-in for a teacher log-prob of -inf (token outside the teacher's processed support).
Far below anything finite logits produce, yet finite, so advantages and gradients stay finite."""

LOG_ZERO = -1e30
"""log 0 for top-k buckets outside the support. exp gives exactly 0, and unlike -inf no difference,
logsumexp or softmax of such entries is NaN, in values or in gradients."""


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


@torch.no_grad()
def student_entropy(logits: Tensor, log_z: Tensor | None = None) -> Tensor:
    """Entropy of softmax(logits) over the full vocabulary, ``[B, T]``; no graph (a diagnostic and a score).

    H = log Z - sum_v p_v z_v: one ``[B, T, V]`` probability tensor (plus the float32 copy of
    half-precision logits), freed on return. Elementwise in float32, not a matmul: autocast would run
    that in bf16, and at B*T*V beyond 2^31 cuBLAS refuses it (seen on an H200 at T = 16,384).
    """
    logits = _f32(logits)
    log_z = _log_normalizer(logits) if log_z is None else log_z.detach()
    probs = (logits - log_z.unsqueeze(-1)).exp_()
    return log_z - probs.mul_(logits).sum(-1)


def masked_mean(values: Tensor, mask: Tensor, count: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over ``mask == True`` entries; 0 (still differentiable) if none.

    ``count`` replaces ``mask.sum()`` as the denominator: a chunk of a batch passes the batch's count,
    so that the chunks' results add up to the batch's mean.
    """
    mask = mask.to(torch.bool)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum() if count is None else count
    # clamp keeps an empty mask at 0/1 = 0 rather than 0/0 = NaN, and the graph stays attached.
    return total / count.clamp_min(1).to(total.dtype)


def select_tokens(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """The masked positions with the highest ``scores``: ``round(fraction * n)`` of the n, at least one.

    Per batch, not per sequence. Scores at unmasked positions are ignored; ties keep the earlier
    position. Returns a bool mask, a subset of ``mask``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mask, scores = mask.to(torch.bool), _f32(scores)
    n_keep = torch.round(mask.sum() * fraction).clamp_min(1)
    ranked = torch.where(mask, scores, torch.full_like(scores, -math.inf)).flatten()
    order = ranked.argsort(descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank < n_keep).view_as(mask) & mask


def sft_loss(student_logprobs: Tensor, mask: Tensor, count: Tensor | None = None) -> Tensor:
    """Token-level cross-entropy on the given targets (``count``: masked_mean's)."""
    return masked_mean(-student_logprobs, mask, count)


def _finite_teacher(teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Teacher token log-probs with -inf floored and masked positions zeroed (float32)."""
    teacher = _f32(teacher_logprobs).clamp_min(TEACHER_LOGPROB_FLOOR)
    return torch.where(mask, teacher, torch.zeros_like(teacher))


def sampled_token_opd_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
    old_logprobs: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    importance_cap: float | None = None,
    baseline: Tensor | None = None,
    count: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled-token OPD (the paper's loss); returns ``(loss, clip_fraction)``.

    Advantage A = w * (log pi_T(y) - log pi_theta(y) + baseline), detached, where
    w = min(pi_theta(y) / mu(y), importance_cap) is the truncated importance weight against the
    behaviour policy mu that sampled y (``behavior_logprobs``); ``importance_cap=None``: w = 1.
    ``baseline`` (vOPD: the per-token KL_t(pi_theta || pi_T)) depends on the prefix only, so it
    leaves the expected gradient unchanged.

    ``clip_eps=None``, REINFORCE: loss = -mean(A * log pi_theta).
    ``clip_eps > 0``, PPO: rho = pi_theta / pi_old, loss = -mean(min(rho * A, clip(rho, 1 +- eps) * A)).
    ``old_logprobs=None`` takes pi_old = pi_theta detached (one update per batch): rho = 1 with
    gradient grad log pi, so both forms have the gradient -mean(A * grad log pi), the single-sample
    estimate of grad KL(pi_theta || pi_T) when y ~ pi_theta, and the clip never bites.
    ``clip_fraction``: the fraction of masked tokens whose clipped term is the minimum (zero gradient).
    ``count``: both means' denominator (masked_mean's).
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    if clip_eps is None and old_logprobs is not None:
        raise ValueError("old_logprobs is the PPO ratio's denominator: it needs clip_eps")
    if importance_cap is not None and importance_cap <= 0:
        raise ValueError(f"importance_cap must be > 0 or None, got {importance_cap}")
    if importance_cap is not None and behavior_logprobs is None:
        raise ValueError("importance_cap needs behavior_logprobs")
    mask = mask.to(torch.bool)
    zeros = torch.zeros_like(_f32(student_logprobs))
    student = torch.where(mask, _f32(student_logprobs), zeros)
    advantage = _finite_teacher(teacher_logprobs, mask) - student
    if baseline is not None:
        advantage = advantage + baseline.to(student.dtype)
    if importance_cap is not None:
        # Masked log-ratios are set to 0 before exp so padded log-probs cannot overflow it.
        log_w = torch.where(mask, student - behavior_logprobs.to(student.dtype), zeros)
        advantage = advantage * log_w.exp().clamp_max(importance_cap)
    advantage = torch.where(mask, advantage, zeros).detach()
    if clip_eps is None:
        return -masked_mean(advantage * student, mask, count), zeros.sum()
    old = student.detach() if old_logprobs is None else old_logprobs.detach().to(student.dtype)
    rho = torch.exp(torch.where(mask, student - old, zeros))
    unclipped = rho * advantage
    clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    clip_fraction = masked_mean((clipped < unclipped).to(student.dtype), mask, count).detach()
    return -masked_mean(torch.minimum(unclipped, clipped), mask, count), clip_fraction


def generalized_jsd(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    """Generalized Jensen-Shannon divergence over the last dimension, in TRL GKD's convention.

    With p the teacher, q the student and m = beta * p + (1 - beta) * q:
    JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m); beta = 0 is defined as the forward
    KL(p || q) and beta = 1 as the reverse KL(q || p) (the interior tends to 0 at both ends).
    Inputs are log-probabilities; write log 0 as LOG_ZERO, not -inf.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return _kl(teacher_logp, student_logp)
    if beta == 1:
        return _kl(student_logp, teacher_logp)
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension; entries with p = 0 (LOG_ZERO) add exactly 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_rest(log_probs: Tensor) -> Tensor:
    """log(1 - sum exp(log_probs)) over the last dimension (kept): the mass outside the top-k.

    Floored at the dtype's eps: 1 - sum is only known to about eps, and the floor keeps a top-k that
    holds all the mass up to rounding (k = V, or a certain model) at a finite log and gradient.
    """
    rest = -torch.expm1(torch.logsumexp(log_probs, dim=-1, keepdim=True))
    return rest.clamp_min(torch.finfo(rest.dtype).eps).log()


def _topk_buckets(
    student_logits: Tensor,
    log_z: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    tail: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher and student log-probs on k + 1 buckets, the cached ids then the rest: ``[B, T, k + 1]`` each,
    and the ``[B, T]`` positions with a non-empty support.

    Entries whose teacher log-prob is -inf or NaN (a padded cache entry is the same as no entry),
    and every entry at masked positions, are outside the support: LOG_ZERO on both sides.
    """
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; valid: {', '.join(TAILS)}")
    teacher = _f32(teacher_topk_logprobs)
    keep = torch.isfinite(teacher) & mask.unsqueeze(-1)
    log_zero = torch.full_like(teacher, LOG_ZERO)
    teacher = torch.where(keep, teacher, log_zero)
    student = torch.where(keep, _gather_logprobs(student_logits, teacher_topk_ids, log_z), log_zero)
    empty = log_zero[..., :1]
    if tail == "rest_bucket":
        # float16 storage can push the cached mass a little above 1: scale it back so the rest is >= 0.
        teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True).clamp_min(0)
        teacher_rest = _log_rest(teacher)
    else:
        teacher, teacher_rest = torch.log_softmax(teacher, -1), empty
    if tail == "renorm_both":
        student, student_rest = torch.log_softmax(student, -1), empty
    else:
        student_rest = _log_rest(student)
    return torch.cat([teacher, teacher_rest], -1), torch.cat([student, student_rest], -1), keep.any(-1)


def _topk_divergence(
    student_logits: Tensor,
    log_z: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    tail: str,
) -> Tensor:
    """Per-token generalized JSD on the top-k buckets, ``[B, T]`` (topk_divergence_loss); 0 without support."""
    if tail == "renorm_teacher" and beta == 1:
        raise ValueError(
            "reverse KL against a teacher renormalised over its k is infinite once the student has mass "
            "outside them; use tail renorm_both or rest_bucket"
        )
    teacher, student, support = _topk_buckets(student_logits, log_z, teacher_topk_ids, teacher_topk_logprobs, mask,
                                              tail)
    # All-LOG_ZERO rows are finite but meaningless (renormalised, they turn uniform): count them as 0.
    per_token = generalized_jsd(teacher, student, beta)
    return torch.where(support, per_token, torch.zeros_like(per_token))


def union_support(ids: list[Tensor], teacher_logprobs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Cached entries of several supports as one, each id once: ``[..., k_i]`` ids and teacher log-probs
    concatenated along the last dimension, in the order given, with every repeat of an id (and so its
    student probability, which the buckets gather again) left out by setting its teacher log-prob to -inf,
    as for a padded entry. The first finite entry of an id is the one kept, so list the most precise
    source first (the float32 sampled token before the float16 top-k's). The sampled token, the
    teacher's top-k and the behaviour policy's top-k_s give ``k + k_s + 1`` entries; duplicates are
    found by one stable sort of the ids, not by comparing all pairs.
    """
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in teacher_logprobs), torch.float32)
    logp = torch.cat([x.to(dtype) for x in teacher_logprobs], -1)
    entries = torch.cat([x.long() for x in ids], -1)
    # Entries outside the support (-inf, NaN) get ids of their own (negative, never a token's) so that they
    # cannot stand for a finite entry of the same id.
    slot = torch.arange(entries.shape[-1], device=entries.device)
    keyed = torch.where(torch.isfinite(logp), entries, -1 - slot)
    order = keyed.argsort(dim=-1, stable=True)
    ranked = keyed.gather(-1, order)
    repeat = torch.cat([torch.zeros_like(ranked[..., :1], dtype=torch.bool), ranked[..., 1:] == ranked[..., :-1]], -1)
    repeat = torch.zeros_like(repeat).scatter(-1, order, repeat)
    return entries, logp.masked_fill(repeat, -math.inf)


def topk_divergence_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.0,
    tail: str = "renorm_teacher",
) -> Tensor:
    """Generalized JSD(beta) on the teacher's top-k support (0: forward KL, 1: reverse KL; generalized_jsd).

    q is the student's softmax over the full vocabulary, p the cached teacher top-k. ``tail`` says
    what happens to the mass outside the k:

    * ``renorm_teacher``: p renormalised over its k, zero elsewhere; q untouched (its mass outside
      the k is one bucket, which loses nothing: p is 0 there). The exact divergence between these
      two full distributions; reverse KL (beta = 1) is infinite and refused.
    * ``renorm_both``: p and q both renormalised over the teacher's k ids.
    * ``rest_bucket``: a (k+1)-th bucket on each side holds 1 - sum of its top-k probabilities.

    Every mode equals the exact full-vocabulary divergence when k = V. A position whose cached
    entries are all -inf (or NaN) adds 0.
    """
    mask = mask.to(torch.bool)
    per_token = _topk_divergence(student_logits, _log_normalizer(student_logits), teacher_topk_ids,
                                 teacher_topk_logprobs, mask, beta, tail)
    return masked_mean(per_token, mask)


@torch.no_grad()
def reverse_kl_estimate(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor,
                        count: Tensor | None = None) -> Tensor:
    """Diagnostic single-sample estimate of KL(pi_theta || pi_T): mean(log pi - log pi_T) (``count``: masked_mean's)."""
    mask = mask.to(torch.bool)
    teacher = _finite_teacher(teacher_logprobs, mask)
    return masked_mean(_f32(student_logprobs) - teacher, mask, count).detach()


class _Student(NamedTuple):
    """The student at a set of positions, all from its logits (divided by the temperature)."""

    logits: Tensor
    log_z: Tensor
    logprobs: Tensor
    """Of the targets, with a graph."""
    entropy: Tensor
    """Detached."""
    topk_kl: Tensor | None
    """Detached reverse KL on the teacher's top-k + rest bucket, where vopd or divergence selection needs it."""


class Objective:
    """The loss of ObjectiveConfig ``options`` (which checks its rules when made), built once and called on each batch:
    ``objective(student_logits=... or hidden=..., targets=..., mask=..., <teacher signals>)``. Both of its paths,
    full logits and chunks of them, share the per-token math below."""

    def __init__(self, options: ObjectiveConfig):
        self.options = options

    def __repr__(self) -> str:
        return f"Objective({self.options!r})"

    @property
    def selects(self) -> bool:
        return self.options.token_fraction < 1

    @property
    def needs_topk_kl(self) -> bool:
        return self.options.vopd or (self.selects and self.options.token_select == "divergence")

    def __call__(
        self,
        *,
        student_logits: Tensor | None = None,
        hidden: Tensor | None = None,
        lm_head_weight: Tensor | None = None,
        lm_head_bias: Tensor | None = None,
        chunk_size: int = 1024,
        targets: Tensor,
        mask: Tensor,
        old_logprobs: Tensor | None = None,
        behavior_logprobs: Tensor | None = None,
        teacher_logprobs: Tensor | None = None,
        teacher_topk_ids: Tensor | None = None,
        teacher_topk_logprobs: Tensor | None = None,
        behavior_topk_ids: Tensor | None = None,
        teacher_behavior_topk_logprobs: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The loss with its options, at the batch's positions.

        The student comes as ``student_logits`` ``[B, T, V]``, or as its final ``hidden`` states ``[B, T, H]``
        and LM head (``lm_head_weight`` ``[V, H]``, optional ``lm_head_bias`` ``[V]``): then the logits of
        ``chunk_size`` response (mask) positions at a time are computed, used and freed, and only the masked
        positions' ever exist; their gradient is taken chunk by chunk during this call (_ChunkedLinearLoss),
        so peak memory is about ``chunk_size * V``, whatever B * T. Same values and gradients (first order,
        one backward pass per call).

        Returns ``{"loss": total, <term>: value, ..., "entropy": ..., ...}``; only ``"loss"`` carries a
        graph, the rest are detached, for logging: each term, ``"clip_fraction"`` (with the opd term),
        ``"entropy"`` (student, mean over response tokens) and ``"reverse_kl"`` (the sampled-token
        estimate of KL(pi_theta || pi_T), whenever ``teacher_logprobs`` is given).

        * ``temperature`` divides the student logits in every term; the teacher log-probs stay raw.
        * ``top_k`` keeps the first k cached teacher entries.
        * ``topk_support`` union: wherever the top-k is read (topk terms, vopd, divergence selection) its entries are
          union_support of the sampled token (``targets``, ``teacher_logprobs``), the teacher's top-k and the
          behaviour policy's top-k_s (``behavior_topk_ids`` ``[B, T, k_s]``, ``teacher_behavior_topk_logprobs``).
        * opd term: sampled_token_opd_loss with ``clip_eps``, ``old_logprobs`` (None: on-policy; ``clip_against``
          behavior: ``behavior_logprobs``), ``importance_cap`` against ``behavior_logprobs``, and with ``vopd``
          the detached per-token reverse KL on the cached top-k (``rest_bucket`` view) as baseline.
        * topk terms: topk_divergence_loss with ``topk_tail``; ``jsd_beta`` for topk_jsd.
        * ``token_fraction < 1``: the distillation terms train on that fraction of the response tokens
          (select_tokens) with the highest student entropy or (``token_select="divergence"``) top-k
          reverse KL; the sft term and the diagnostics keep every response token. From hidden states
          this takes one more pass over the chunks, without gradient, for the scores.
        * ``sft_weight > 0`` adds ``sft_weight * sft`` to a distillation loss; it is ignored for ``"sft"``.
        """
        options = self.options
        if options.top_k is not None:
            teacher_topk_ids, teacher_topk_logprobs = (None if x is None else x[..., : options.top_k]
                                                       for x in (teacher_topk_ids, teacher_topk_logprobs))
        signals = dict(targets=targets, old_logprobs=old_logprobs, behavior_logprobs=behavior_logprobs,
                       teacher_logprobs=teacher_logprobs, teacher_topk_ids=teacher_topk_ids,
                       teacher_topk_logprobs=teacher_topk_logprobs, behavior_topk_ids=behavior_topk_ids,
                       teacher_behavior_topk_logprobs=teacher_behavior_topk_logprobs)
        self.check_signals(signals)
        behavior_ids, behavior_lp = signals.pop("behavior_topk_ids"), signals.pop("teacher_behavior_topk_logprobs")
        if options.topk_support == "union":
            # one [B, T, 1 + k + k_s] support from here on, in the full-logits and the chunked path alike
            signals["teacher_topk_ids"], signals["teacher_topk_logprobs"] = union_support(
                [targets.unsqueeze(-1), teacher_topk_ids, behavior_ids],
                [teacher_logprobs.unsqueeze(-1), teacher_topk_logprobs, behavior_lp])
        if options.clip_against == "behavior":
            signals["old_logprobs"] = behavior_logprobs
        mask = mask.to(torch.bool)
        if (student_logits is None) == (hidden is None or lm_head_weight is None):
            raise ValueError("give student_logits, or hidden and lm_head_weight (not both)")
        if student_logits is None:
            return _chunked_loss(self, signals, mask, hidden, lm_head_weight, lm_head_bias, chunk_size)
        student = self.student(student_logits, signals, mask)
        train_mask = mask
        if self.selects:
            train_mask = select_tokens(self.selection_scores(student), mask, options.token_fraction)
        return self.losses(student, signals, mask, train_mask, mask.sum(), train_mask.sum())

    def check_signals(self, signals: dict[str, Tensor | None]) -> None:
        """The teacher signals (and behaviour log-probs) that the loss and its options read are all given."""
        options, needed = self.options, []
        if "opd" in options.terms:
            needed.append("teacher_logprobs")
        if options.reads_topk:
            needed += ["teacher_topk_ids", "teacher_topk_logprobs"]
            if options.topk_support == "union":
                needed += ["teacher_logprobs", "behavior_topk_ids", "teacher_behavior_topk_logprobs"]
        if options.clip_against == "behavior":
            if signals["old_logprobs"] is not None:
                raise ValueError("clip_against behavior takes pi_old from behavior_logprobs: give no old_logprobs")
            needed.append("behavior_logprobs")
        for arg in needed:
            if signals[arg] is None:
                raise ValueError(f"loss {options.loss!r} with these options needs {arg}")

    def student(self, logits: Tensor, signals: dict[str, Tensor | None], mask: Tensor) -> _Student:
        if self.options.temperature != 1.0:
            logits = logits / self.options.temperature
        # One normaliser shared by every term: the float32 cast of bf16 logits is then
        # made (and saved for backward) once, not once per loss.
        log_z = _log_normalizer(logits)
        topk_kl = None
        if self.needs_topk_kl:
            with torch.no_grad():
                # rest_bucket: the one view in which the student's mass outside the teacher's k counts
                # and the reverse KL stays finite; it is a lower bound of the exact KL_t.
                topk_kl = _topk_divergence(logits, log_z, signals["teacher_topk_ids"], signals["teacher_topk_logprobs"],
                                           mask, 1.0, "rest_bucket")
        return _Student(logits, log_z, _gather_logprobs(logits, signals["targets"], log_z),
                        student_entropy(logits, log_z), topk_kl)

    def selection_scores(self, student: _Student) -> Tensor:
        return student.entropy if self.options.token_select == "entropy" else student.topk_kl

    def losses(self, student: _Student, signals: dict[str, Tensor | None], mask: Tensor, train_mask: Tensor,
               n_mask: Tensor, n_train: Tensor) -> dict[str, Tensor]:
        """The call's dict at these positions; every mean divides by the batch's count (n_mask or n_train)."""
        options = self.options
        total = student.logits.new_zeros((), dtype=torch.float32)
        out: dict[str, Tensor] = {}
        teacher_lp = signals["teacher_logprobs"]
        if "opd" in options.terms:
            opd, out["clip_fraction"] = sampled_token_opd_loss(
                student.logprobs, teacher_lp, train_mask, clip_eps=options.clip_eps,
                old_logprobs=signals["old_logprobs"], behavior_logprobs=signals["behavior_logprobs"],
                importance_cap=options.importance_cap, baseline=student.topk_kl if options.vopd else None,
                count=n_train,
            )
            total = total + opd
            out["opd"] = opd.detach()
        for term in options.terms:
            if term.startswith("topk_"):
                per_token = _topk_divergence(student.logits, student.log_z, signals["teacher_topk_ids"],
                                             signals["teacher_topk_logprobs"], train_mask, options.beta(term),
                                             options.topk_tail)
                value = masked_mean(per_token, train_mask, n_train)
                total = total + value
                out[term] = value.detach()
        if "sft" in options.terms or options.sft_weight > 0:
            sft = sft_loss(student.logprobs, mask, n_mask)
            total = total + (sft if options.loss == "sft" else options.sft_weight * sft)
            out["sft"] = sft.detach()
        out["entropy"] = masked_mean(student.entropy, mask, n_mask)
        if teacher_lp is not None:
            out["reverse_kl"] = reverse_kl_estimate(student.logprobs, teacher_lp, mask, n_mask)
        return {"loss": total, **out}


OPTIONS = frozenset(f.name for f in dataclasses.fields(ObjectiveConfig)) - {"loss"}
"""compute_loss's option keywords: ObjectiveConfig's fields."""


def compute_loss(name: str, **inputs) -> dict[str, Tensor]:
    """The loss ``name`` (one of LOSSES; ``a+b`` sums terms a and b) on one batch, built and called once:
    ``Objective(ObjectiveConfig(loss=name, **options))(**rest)``, where ``options`` are the ``inputs`` named like
    ObjectiveConfig's fields (clip_eps, topk_tail, temperature, ...) and the rest Objective.__call__'s keywords
    (the student, targets, mask and the teacher signals). A training loop builds its Objective once instead."""
    options = {key: inputs.pop(key) for key in list(inputs) if key in OPTIONS}
    return Objective(ObjectiveConfig(loss=name, **options))(**inputs)


def _chunked_loss(objective: Objective, signals: dict[str, Tensor | None], mask: Tensor, hidden: Tensor,
                  weight: Tensor, bias: Tensor | None, chunk_size: int) -> dict[str, Tensor]:
    """The objective from hidden states: the masked positions' rows, ``chunk_size`` of them at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = mask.flatten().nonzero().squeeze(1)
    # [N] and [N, k] at the masked positions, in [B, T] order (select_tokens breaks ties by it).
    at_rows = {key: None if value is None else value.flatten(0, mask.dim() - 1)[rows] for key, value in signals.items()}
    everywhere = torch.ones_like(rows, dtype=torch.bool)
    # An empty mask still runs one (empty) chunk, for the dict's keys and a loss of 0 with a zero gradient.
    chunks = [slice(start, start + chunk_size) for start in range(0, max(len(rows), 1), chunk_size)]

    def student_at(logits: Tensor, chunk: slice) -> tuple[_Student, dict[str, Tensor | None]]:
        part = {key: None if value is None else value[chunk] for key, value in at_rows.items()}
        return objective.student(logits, part, everywhere[chunk]), part

    flat = hidden.reshape(-1, hidden.shape[-1])
    train = everywhere
    if objective.selects:
        with torch.no_grad():
            scores = [objective.selection_scores(student_at(F.linear(flat[rows[chunk]], weight, bias), chunk)[0])
                      for chunk in chunks]
        train = select_tokens(torch.cat(scores), everywhere, objective.options.token_fraction)
    n_mask, n_train = everywhere.sum(), train.sum()

    def losses_at(logits: Tensor, chunk: slice) -> dict[str, Tensor]:
        student, part = student_at(logits, chunk)
        return objective.losses(student, part, everywhere[chunk], train[chunk], n_mask, n_train)

    metrics: dict[str, Tensor] = {}
    loss = _ChunkedLinearLoss.apply(hidden, weight, bias, rows, chunks, losses_at, torch.is_grad_enabled(), metrics)
    return {"loss": loss, **metrics}


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, the product in a and b's dtype (autocast's choice for the logits), then summed into out's."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)  # no [V, H] temporary
    else:
        out += a @ b


class _ChunkedLinearLoss(torch.autograd.Function):
    """A loss of F.linear(hidden rows, weight, bias), one chunk of rows at a time, differentiated in the forward pass.

    Each chunk's logits are a leaf: ``losses_at(logits, chunk)`` gives its share of the loss (every term is
    a sum over tokens divided by the whole batch's count, so the shares add up exactly), autograd its
    gradient w.r.t. those logits, and two products turn it into the chunk's gradients w.r.t. its hidden rows
    and the head, as the backward of one big product would. So only one chunk's logits and their
    gradient exist at a time, and nothing is recomputed: the backward pass scales the stored gradients
    by the loss's incoming gradient (the loss is a scalar, its gradient linear in that factor), in place,
    so a head-sized gradient exists once; hence one backward pass per forward (no retain_graph).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, chunks, losses_at, grad_enabled, metrics):
        # ctx.needs_input_grad ignores torch.no_grad() here, hence grad_enabled.
        needs = [grad_enabled and x is not None and x.requires_grad for x in (hidden, weight, bias)]
        flat = hidden.reshape(-1, hidden.shape[-1])
        grads = [torch.zeros_like(x) if need else None for x, need in zip((flat, weight, bias), needs)]
        grad_flat, grad_weight, grad_bias = grads
        totals: dict[str, Tensor] = {}
        for chunk in chunks:
            index = rows[chunk]
            h = flat[index]
            logits = F.linear(h, weight, bias).requires_grad_(any(needs))  # grad is off here: a fresh leaf
            with torch.enable_grad():
                out = losses_at(logits, chunk)
                grad = torch.autograd.grad(out["loss"], logits, allow_unused=True)[0] if any(needs) else None
            if grad is not None:
                if grad_flat is not None:
                    grad_flat[index] = (grad @ weight).to(grad_flat.dtype)
                if grad_weight is not None:
                    _add_product(grad_weight, grad.T, h)
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            for key, value in out.items():
                totals[key] = totals[key] + value.detach() if key in totals else value.detach()
        # Not save_for_backward: backward scales them in place, which its version check would refuse.
        ctx.grads, ctx.hidden_shape = grads, hidden.shape
        metrics.update((key, value) for key, value in totals.items() if key != "loss")
        return totals["loss"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the chunked loss's gradients were used by an earlier backward pass")
        grad_flat, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        grad_hidden = None if grad_flat is None else grad_flat.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None
