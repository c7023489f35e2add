"""Verifiers, the pass@k estimator, their config checks, and evaluate with n samples on the tiny run."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from pipeline import config, verifiers
from pipeline.config import ConfigError, EvaluateConfig, from_dict
from tests.conftest import section


def test_registry_matches_the_names_config_accepts():
    assert tuple(verifiers.VERIFIERS) == config.VERIFIERS
    with pytest.raises(ValueError, match=r"unknown verifier 'regex'; valid verifiers: \['exact', 'math', 'toy'\]"):
        verifiers.get_verifier("regex")


def test_toy_checks_the_sum_the_worked_answer_states_in_either_notation():
    verify = verifiers.get_verifier("toy")
    assert verify("16;13;09;", "16;13;09;")
    assert verify("16;13;09; \n", "16;13;09;")
    assert verify("61:31:90:", "16;13;09;")  # units_first notation: the same sum, 936
    assert verify("16;31:09;", "16;13;09;")  # notations mixed step by step
    assert not verify("16;13;08;", "16;13;09;")
    assert not verify("16;13;", "16;13;09;")  # a column left out
    assert not verify("16;13;0x;", "16;13;09;")  # malformed step
    assert not verify("16;13;09;1", "16;13;09;")


def test_exact_normalises_whitespace_only():
    verify = verifiers.get_verifier("exact")
    assert verify("  Paris\n", "Paris")
    assert verify("New  York", " New York ")
    assert not verify("paris", "Paris")
    assert not verify("Paris.", "Paris")
    assert not verify("", "Paris")


@pytest.mark.parametrize("response, reference", [
    (r"So the answer is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2}", "2"),
    ("The answer is 2", "2"),
    (r"First I guessed 3, then checked: \boxed{2}. Total steps: 7", "2"),  # the boxed answer wins
    (r"$\boxed{2\sqrt{3}}$", r"2\sqrt{3}"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{x^2 + 1}", "1 + x^2"),
    ("The final answer is $2$. I hope it is correct.", r"\boxed{2}"),
])
def test_math_accepts_equal_values(response, reference):
    assert verifiers.math_match(response, reference)


@pytest.mark.parametrize("response, reference", [
    (r"\boxed{\frac{1}{3}}", "0.5"),  # wrong value
    (r"\boxed{3}", "2"),
    (r"I think it's 2 but the answer is \boxed{3}", "2"),
    ("I do not know.", "2"),  # no answer at all
    ("", "2"),
    (r"\boxed{\frac{1}{", "0.5"),  # malformed LaTeX: wrong, not an error
    (r"$\frac{$ and \sqrt{", r"\frac{1}{2}"),
    (r"\boxed{2}", r"\frac{"),  # a malformed reference matches nothing
])
def test_math_rejects_wrong_missing_and_malformed_answers(response, reference):
    assert not verifiers.math_match(response, reference)


def test_math_works_outside_the_main_thread():
    """math-verify's signal-based timeout raises ValueError outside the main thread; the verifier turns it off there."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (verifiers.math_match(r"\boxed{\frac{1}{2}}", "0.5"), verifiers.math_match(r"\boxed{3}", "2"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


def test_pass_at_k_edge_cases():
    assert verifiers.pass_at_k(10, 0, 1) == 0.0  # nothing correct
    assert verifiers.pass_at_k(10, 0, 10) == 0.0
    assert verifiers.pass_at_k(10, 10, 1) == 1.0  # everything correct
    assert verifiers.pass_at_k(10, 7, 4) == 1.0  # 3 wrong samples cannot fill k = 4
    assert verifiers.pass_at_k(10, 1, 10) == 1.0
    assert verifiers.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert verifiers.pass_at_k(1, 1, 1) == 1.0 and verifiers.pass_at_k(1, 0, 1) == 0.0
    assert verifiers.pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n stays exact
    for n, c, k in ((3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)):
        with pytest.raises(ValueError, match="pass@k needs"):
            verifiers.pass_at_k(n, c, k)


def test_pass_at_k_equals_enumerating_every_k_subset():
    n = 7
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert verifiers.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (c, k)


def test_mean_pass_at_k_averages_prompts():
    assert verifiers.mean_pass_at_k([0, 4, 2], 4, 1) == pytest.approx((0 + 1 + 0.5) / 3)
    assert verifiers.mean_pass_at_k([0, 4, 2], 4, 4) == pytest.approx(2 / 3)
    assert verifiers.mean_pass_at_k([1, 0, 1, 1], 1, 1) == 0.75  # n = 1: plain accuracy
    with pytest.raises(ValueError, match="no prompts"):
        verifiers.mean_pass_at_k([], 4, 1)


def test_evaluate_config_checks():
    assert EvaluateConfig() == EvaluateConfig(verifier="toy", n_samples=1, pass_k=[], temperature=0.0)
    cfg = from_dict(EvaluateConfig, {"verifier": "math", "n_samples": 8, "pass_k": [1, 4, 8], "temperature": 1},
                    "evaluate")
    assert cfg.pass_k == [1, 4, 8] and cfg.temperature == 1.0
    with pytest.raises(ConfigError, match=r"evaluate.verifier must be one of \('toy', 'exact', 'math'\), got 'regex'"):
        from_dict(EvaluateConfig, {"verifier": "regex"}, "evaluate")
    with pytest.raises(ConfigError, match=r"pass@8 draws 8 of the n_samples = 4 responses"):
        from_dict(EvaluateConfig, {"n_samples": 4, "pass_k": [1, 8], "temperature": 1.0}, "evaluate")
    with pytest.raises(ConfigError, match=r"pass@0 draws"):
        from_dict(EvaluateConfig, {"n_samples": 4, "pass_k": [0], "temperature": 1.0}, "evaluate")
    with pytest.raises(ConfigError, match="lists a k twice"):
        from_dict(EvaluateConfig, {"n_samples": 4, "pass_k": [2, 2], "temperature": 1.0}, "evaluate")
    with pytest.raises(ConfigError, match="needs temperature > 0"):
        from_dict(EvaluateConfig, {"n_samples": 4}, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate.pass_k\[1\]: expected int, found 'four'"):
        from_dict(EvaluateConfig, {"n_samples": 4, "pass_k": [1, "four"], "temperature": 1.0}, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate.pass_k: expected list, found 4"):
        from_dict(EvaluateConfig, {"n_samples": 4, "pass_k": 4, "temperature": 1.0}, "evaluate")


def test_evaluate_counts_each_prompts_correct_samples(monkeypatch):
    """The scoring of evaluate on known responses: 0, 4 and 2 of 4 samples right."""
    from pipeline import engines, models, toy_task

    examples = toy_task.make_examples(3, 2, seed=0)
    wrong = "99;99;"
    responses = [[wrong] * 4, [examples[1][1]] * 4, [examples[2][1], wrong, wrong, examples[2][1]]]

    class FakeEngine(engines.Engine):
        tokenizer = toy_task.build_tokenizer()

        def generate(self, prompts, sampling, seed):
            assert (sampling.n, sampling.temperature, seed) == (4, 1.0, 0) and len(prompts) == 3
            return [engines.Generation(p, s, models.encode_response(self.tokenizer, responses[p][s]), [], "stop")
                    for p in range(3) for s in range(4)]

    monkeypatch.setattr(engines, "load_engine", lambda model_dir, cfg: FakeEngine())
    cfg = EvaluateConfig(n_samples=4, pass_k=[1, 2, 4], temperature=1.0)
    metrics = verifiers.accuracy("unused", [{"prompt": p, "answer": a} for p, a in examples], cfg, section("engine"))
    assert metrics == {
        "accuracy": round((0 + 1 + 0.5) / 3, 4),
        "mean_response_tokens": 7.0,  # 6 answer tokens + EOS
        "pass@1": round((0 + 1 + 0.5) / 3, 4),
        "pass@2": round((0 + 1 + (1 - 1 / 6)) / 3, 4),  # C(2, 2) / C(4, 2) = 1/6 of pairs miss both right ones
        "pass@4": round(2 / 3, 4),
    }


def test_greedy_evaluate_writes_only_the_usual_keys(tiny_run):
    """The tiny params evaluate greedily and with evaluate.sampled_n: 2."""
    metrics = json.loads((tiny_run / "metrics/eval.json").read_text())
    assert set(metrics) == {"n_prompts", "teacher", "sft_student", "control", "opd_student", "teacher_mismatch_allowed"}
    for role in ("teacher", "sft_student", "control", "opd_student"):
        assert set(metrics[role]) == {"accuracy", "mean_response_tokens", "sampled_accuracy"}
        assert 0.0 <= metrics[role]["sampled_accuracy"] <= 1.0


def test_evaluate_with_n_samples_writes_pass_at_k(tiny_run, tmp_path):
    from stages import evaluate

    cfg = EvaluateConfig(max_new_tokens=section("evaluate").max_new_tokens, n_samples=4, pass_k=[4, 1, 2],
                         temperature=1.0)
    out = tmp_path / "eval.json"
    d = tiny_run
    evaluate.run(cfg, section("engine"), d / "models/base", d / "models/sft", d / "models/control", d / "models/opd",
                 d / "data/prompts", out)
    metrics = json.loads(out.read_text())
    assert metrics["n_samples"] == 4 and metrics["n_prompts"] == section("task").eval_prompts
    for role in evaluate.ROLES:
        m = metrics[role]
        assert list(m) == ["accuracy", "mean_response_tokens", "pass@1", "pass@2", "pass@4"]
        assert m["accuracy"] == m["pass@1"]
        assert all(0.0 <= m[f"pass@{k}"] <= 1.0 for k in (1, 2, 4))
        assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]
        assert m["mean_response_tokens"] > 0


def test_the_toy_tasks_notations_are_the_ones_config_accepts_and_state_the_same_sum():
    from pipeline import toy_task

    assert tuple(toy_task.STYLES) == config.TEACHER_STYLES
    for prompt, answer in toy_task.make_examples(50, 4, seed=1):
        a, b = (int("".join(reversed(digits))) for digits in zip(*prompt.rstrip("=").split(",")))
        for style in config.TEACHER_STYLES:
            assert toy_task.final_answer(toy_task.solve(prompt, style)) == a + b
            assert verifiers.get_verifier("toy")(toy_task.solve(prompt, style), answer)
    with pytest.raises(ValueError, match="unknown style 'roman'"):
        toy_task.solve("12=", "roman")
