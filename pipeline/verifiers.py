"""Verifiers that decide whether a response answers a prompt, and the pass@k estimator.

A verifier is a pure function (response text, reference answer) -> bool, chosen by name with
`evaluate.verifier` (the names are declared in pipeline/config.py VERIFIERS, so configs validate
before anything loads):

- `toy`: the embedded task's final answer, the sum its worked steps state in either notation
  (pipeline/toy_task.py is_correct);
- `exact`: the whole response equals the reference, both whitespace-normalised;
- `math`: the final answer extracted from the response (a `\\boxed{...}` first) equals the
  reference by value, with math-verify (`\\frac{1}{2}` == `0.5`).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pipeline import toy_task

if TYPE_CHECKING:  # the configs only annotate here; importing pipeline.config at run time is not needed
    from pipeline.config import ChatConfig, EngineConfig, EvaluateConfig

Verifier = Callable[[str, str], bool]

MATH_TIMEOUT_S = 5
"""Seconds math-verify may spend parsing or comparing one expression (its default): sympy can
take practically forever on adversarial LaTeX, and a timeout counts as a wrong answer."""


def exact_match(response: str, reference: str) -> bool:
    """The whole response equals the reference once both are trimmed and inner whitespace runs are
    collapsed to one space (so a trailing newline or a doubled space is not an error)."""
    return " ".join(response.split()) == " ".join(reference.split())


def math_match(response: str, reference: str) -> bool:
    """The response's final answer equals the reference by value (math-verify's parse and verify).

    The answer is extracted as math-verify's LaTeX extraction does, with `\\boxed{...}` tried first,
    then "final answer is", "answer:", and the last LaTeX or plain expression. A response with no
    answer, or LaTeX that does not parse, is simply wrong: math-verify returns no match, never raises.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = _math_timeout()
    answer = parse(
        response,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )
    # gold first: math-verify's comparison is not symmetric (assignments, intervals)
    return verify(_parse_reference(reference, timeout), answer, timeout_seconds=timeout)


@functools.lru_cache(maxsize=4096)  # each reference is checked against n samples of 3 models
def _parse_reference(reference: str, timeout: int | None) -> list:
    """The reference as math-verify objects. A bare reference (`\\sqrt{2}`, `x^2+1`) is wrapped in
    `$...$`, since math-verify extracts LaTeX only from math delimiters or `\\boxed{}`; one that
    already has them is parsed as it is."""
    from math_verify import parse

    text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    return parse(text, parsing_timeout=timeout) or parse(reference, parsing_timeout=timeout)


def _math_timeout() -> int | None:
    """math-verify times out with signal.alarm, which Python allows only in the main thread (elsewhere
    it raises ValueError). In any other thread run without its timeout: a stuck parse then blocks
    that thread, which the caller has to bound itself."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


VERIFIERS: dict[str, Verifier] = {
    "toy": toy_task.is_correct,
    "exact": exact_match,
    "math": math_match,
}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; valid verifiers: {sorted(VERIFIERS)}")
    return VERIFIERS[name]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples (Chen et al. 2021): the chance
    that k of the n samples, drawn without replacement, include a correct one, 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    # Exact integers, divided once: C(n-c, k) is 0 when fewer than k samples are wrong (pass@k = 1).
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, from each prompt's count of correct samples out of n."""
    if not correct:
        raise ValueError("pass@k of no prompts")
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)


def accuracy(model_dir, prompts: list[dict], cfg: EvaluateConfig, engine_cfg: EngineConfig,
             chat: ChatConfig | None = None) -> dict:
    """The evaluate stage's metrics of one model on `prompts` (rows with `prompt` and `answer`): `accuracy`
    (pass@1 over `cfg.n_samples` responses at `cfg.temperature`), `mean_response_tokens`, each `pass@k` of
    `cfg.pass_k`, and with `cfg.sampled_n` `sampled_accuracy` (that many responses at `cfg.sampled_temperature`).
    `chat` is the prompts' chat settings."""
    from pipeline import engines, models  # engines loads torch; the verifiers alone need none of it
    from pipeline.config import SamplingConfig

    with engines.load_engine(model_dir, engine_cfg) as engine:
        ids = [models.encode_prompt(engine.tokenizer, r["prompt"], chat) for r in prompts]
        gens = engine.generate(ids, SamplingConfig(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                                   max_new_tokens=cfg.max_new_tokens), seed=cfg.seed)
        sampled = engine.generate(ids, SamplingConfig(n=cfg.sampled_n, temperature=cfg.sampled_temperature,
                                                      max_new_tokens=cfg.max_new_tokens),
                                  seed=cfg.seed) if cfg.sampled_n else []
    correct = _correct_per_prompt(engine.tokenizer, gens, prompts, cfg.verifier)
    metrics = {
        "accuracy": round(mean_pass_at_k(correct, cfg.n_samples, 1), 4),
        "mean_response_tokens": round(sum(len(g.response_ids) for g in gens) / len(gens), 2),
    }
    for k in sorted(cfg.pass_k):
        metrics[f"pass@{k}"] = round(mean_pass_at_k(correct, cfg.n_samples, k), 4)
    if sampled:
        correct = _correct_per_prompt(engine.tokenizer, sampled, prompts, cfg.verifier)
        metrics["sampled_accuracy"] = round(mean_pass_at_k(correct, cfg.sampled_n, 1), 4)
    return metrics


def _correct_per_prompt(tokenizer, gens, prompts: list[dict], verifier: str) -> list[int]:
    """How many of each prompt's responses the verifier accepts."""
    texts = tokenizer.batch_decode([g.response_ids for g in gens], skip_special_tokens=True)
    verify = get_verifier(verifier)
    correct = [0] * len(prompts)
    for gen, text in zip(gens, texts):
        correct[gen.prompt_index] += verify(text, prompts[gen.prompt_index]["answer"])
    return correct
