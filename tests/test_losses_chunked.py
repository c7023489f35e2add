"""The objective from hidden states, the logits a chunk of positions at a time: the full-logits values and
gradients, and DistillModule's step either way."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import OpdConfig
from pipeline.losses import LOSSES, compute_loss
from tests.conftest import B, V

H, T_LONG = 4, 5
CHUNK_OPTIONS = {
    "plain": {},
    "entropy_selection": dict(token_fraction=0.5, temperature=0.7, sft_weight=0.3, topk_tail="rest_bucket"),
    "divergence_selection": dict(token_fraction=0.6, token_select="divergence", topk_tail="renorm_both", jsd_beta=0.3,
                                 clip_eps=None),
    "opd_options": dict(vopd=True, importance_cap=1.5, topk_tail="rest_bucket"),  # and old_logprobs
    "union_support": dict(topk_support="union", topk_tail="rest_bucket", token_fraction=0.6,
                          token_select="divergence"),
}
CHUNK_CASES = [(name, variant) for name in LOSSES for variant in CHUNK_OPTIONS
               if (variant != "opd_options" or "opd" in name.split("+"))
               and (variant != "union_support" or "topk" in name)]


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
    # the behaviour policy's top-2, overlapping the teacher's top-3 here and there (V = 5)
    behavior_ids = torch.randn(B, T_LONG, V, generator=gen).topk(2, -1).indices
    signals = dict(targets=targets, mask=mask, teacher_logprobs=teacher_lp,
                   behavior_logprobs=teacher_lp + torch.randn(B, T_LONG, generator=gen, dtype=dtype),
                   teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, behavior_topk_ids=behavior_ids,
                   teacher_behavior_topk_logprobs=teacher.gather(-1, behavior_ids))
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
             "teacher_topk_logprobs": np.sort(-rng.exponential(1.0, (r, k)), axis=1)[:, ::-1].astype(np.float16),
             "behavior_topk_ids": rng.integers(0, vocab, (r, 2)).astype(np.int32),
             "teacher_behavior_topk_logprobs": -rng.exponential(2.0, (r, 2)).astype(np.float16)}
            for r in (1, 5, 3, 4)]
    batch = next(iter(data.in_memory(rows, 4, tokenizer.pad_token_id, 0).train_dataloader()))
    opd = dict(loss="opd+topk_fkl", token_fraction=0.5, vopd=True, sft_weight=0.2)
    union = dict(opd, loss="opd+topk_rkl", topk_support="union", topk_tail="rest_bucket")
    for make, loss in ((lambda chunk: OpdConfig(**opd, loss_chunk_tokens=chunk), opd["loss"]),
                       (lambda chunk: OpdConfig(**union, loss_chunk_tokens=chunk), union["loss"]),
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
