"""The objective (pipeline.losses.Objective, through compute_loss) built from its options (ObjectiveConfig): its
terms, token selection, temperature, degenerate inputs and every option rule, checked in one place."""

import pytest
import torch

from pipeline.config import TAILS, ConfigError, OpdConfig, from_dict
from pipeline.losses import (
    LOSSES,
    compute_loss,
    sampled_token_opd_loss,
    select_tokens,
    sft_loss,
    student_entropy,
    token_logprobs,
    topk_divergence_loss,
)
from tests.conftest import B, T, V, rest_bucket_reverse_kl


@pytest.mark.parametrize("name", ["sft", "topk_fkl", "topk_rkl", "topk_jsd"])
def test_compute_loss_gradcheck_with_temperature_and_sft_mix(gen, mask, make_teacher, name):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    _, top_ids, top_lp = make_teacher(3)

    def loss(x):
        return compute_loss(name, student_logits=x, targets=targets, mask=mask, teacher_topk_ids=top_ids,
                            teacher_topk_logprobs=top_lp, topk_tail="rest_bucket", jsd_beta=0.3, temperature=0.7,
                            sft_weight=0.5)["loss"]

    assert torch.autograd.gradcheck(loss, (logits,))



@pytest.mark.parametrize("token_select", ["entropy", "divergence"])
def test_token_selection_narrows_the_distillation_terms_only(gen, make_teacher, token_select):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = make_teacher(2)
    teacher_lp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    inputs = dict(student_logits=logits, targets=targets, mask=mask, teacher_logprobs=teacher_lp,
                  teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, sft_weight=0.5)
    out = compute_loss("opd+topk_fkl", **inputs, token_fraction=0.4, token_select=token_select)
    everything = compute_loss("opd+topk_fkl", **inputs)

    scores = student_entropy(logits) if token_select == "entropy" else rest_bucket_reverse_kl(logits, top_ids, top_lp)
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
def test_temperature_divides_the_student_logits_only(gen, mask, make_teacher, name):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    full, top_ids, top_lp = make_teacher(2)
    inputs = dict(targets=targets, mask=mask, teacher_logprobs=full.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
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



# --- compute_loss dispatch and configuration ----------------------------------------------------


def _compute_inputs(gen, mask, k=2):
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen), -1)
    top_lp, top_ids = teacher.topk(k, -1)
    return dict(student_logits=logits, targets=targets, mask=mask,
                teacher_logprobs=teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp)


def test_compute_loss_dispatch_and_components(gen, mask):
    inputs = _compute_inputs(gen, mask)
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


def test_compute_loss_errors(gen, mask):
    inputs = _compute_inputs(gen, mask)
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



def test_every_option_rule_is_one_check_for_the_config_and_the_loss(gen, mask):
    """ObjectiveConfig holds the rules: opd.<key> in params.yaml and compute_loss's keyword fail alike."""
    inputs = _compute_inputs(gen, mask)
    bad = [({"jsd_beta": 1.5}, r"opd.jsd_beta must be in \[0, 1\]"),
           ({"loss": "topk_fkl", "importance_cap": 2.0}, r"opd.vopd and opd.importance_cap act on the opd term"),
           ({"top_k": 0}, r"opd.top_k must be > 0 or null"),
           ({"clip_against": "behavior", "clip_eps": None}, r"clip_against behavior .* needs clip_eps")]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(OpdConfig, options, "opd")
        name = options.pop("loss", "opd")
        with pytest.raises(ConfigError, match=message):
            compute_loss(name, **inputs, **options)


def test_clip_against_behavior_divides_by_the_behaviour_log_probs(gen, mask):
    inputs = _compute_inputs(gen, mask)
    behavior = inputs["teacher_logprobs"] + torch.randn(B, T, generator=gen)
    got = compute_loss("opd", **inputs, behavior_logprobs=behavior, clip_against="behavior", clip_eps=0.1)
    expected = compute_loss("opd", **inputs, behavior_logprobs=behavior, old_logprobs=behavior, clip_eps=0.1)
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)
    assert got["clip_fraction"] > 0
    with pytest.raises(ValueError, match="needs behavior_logprobs"):
        compute_loss("opd", **inputs, clip_against="behavior")
    with pytest.raises(ValueError, match="give no old_logprobs"):
        compute_loss("opd", **inputs, behavior_logprobs=behavior, old_logprobs=behavior, clip_against="behavior")


def test_top_k_keeps_the_first_cached_entries(gen, mask):
    inputs = _compute_inputs(gen, mask, k=3)
    got = compute_loss("opd+topk_fkl", **inputs, top_k=2, vopd=True)
    sliced = {**inputs, "teacher_topk_ids": inputs["teacher_topk_ids"][..., :2],
              "teacher_topk_logprobs": inputs["teacher_topk_logprobs"][..., :2]}
    expected = compute_loss("opd+topk_fkl", **sliced, vopd=True)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert not torch.equal(got["topk_fkl"], compute_loss("opd+topk_fkl", **inputs, vopd=True)["topk_fkl"])


def test_each_config_builds_its_objective_once():
    """TrainConfig (the SFT stages): sft with the default options; OpdConfig: opd.loss with its own. DistillModule
    builds it, and refuses an LM head it cannot chunk, when it is made."""
    from pipeline import models, toy_task
    from pipeline.config import ObjectiveConfig, ToyModelConfig, TrainConfig
    from pipeline.losses import Objective
    from pipeline.training import DistillModule

    assert TrainConfig().objective() == ObjectiveConfig(loss="sft")
    cfg = OpdConfig(loss="opd+topk_jsd", vopd=True, jsd_beta=0.2, topk_tail="rest_bucket", top_k=4, lr=0.1)
    assert cfg.objective() == ObjectiveConfig(loss="opd+topk_jsd", vopd=True, jsd_beta=0.2, topk_tail="rest_bucket",
                                              top_k=4)
    assert cfg.objective("opd").loss == "opd" and cfg.objective("opd").vopd
    model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), toy_task.build_tokenizer(), seed=0)
    for config, loss, expected in ((TrainConfig(), None, TrainConfig().objective()), (cfg, None, cfg.objective()),
                                   (cfg, "opd", cfg.objective("opd"))):
        objective = DistillModule(model, config, loss).objective
        assert isinstance(objective, Objective) and objective.options == expected
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="loss_chunk_tokens 0"):
        DistillModule(model, cfg)
    DistillModule(model, OpdConfig(loss_chunk_tokens=0))
