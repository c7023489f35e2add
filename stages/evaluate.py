r"""Held-out accuracy of the teacher, the SFT student, the control and the OPD student, as a DVC metrics file.

    python -m stages.evaluate --params params.yaml --models models/base --sft-model models/sft \
        --control-model models/control --opd-model models/opd --prompts data/prompts \
        --out metrics/eval.json --chart metrics/accuracy.json

Each model answers every `eval` prompt greedily, or `evaluate.n_samples` times with sampling; the
verifier named by `evaluate.verifier` checks each response against the prompt's reference answer
(pipeline/verifiers.py; the default `toy` checks the sum the worked answer states). Per model:
`accuracy` (pass@1, the mean correctness over all responses), `mean_response_tokens`, `pass@k` for
each k of `evaluate.pass_k` (the unbiased estimator over the n samples), and with `evaluate.sampled_n`
`sampled_accuracy`, the mean correctness of that many responses sampled at `evaluate.sampled_temperature`.
The control is the SFT student trained further on the teacher's answers to the OPD prompts with OPD's
steps, batch and schedule (stages/control.py): what OPD must beat for its gain to be more than more steps.
When the eval prompts hold several domains, each model is evaluated domain by domain (the teacher of
`models.teachers` on its own domain's prompts) and each role also gets `domains`, the same metrics per domain;
its overall numbers are their means weighted by the domains' prompt counts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import cli, models
from pipeline.config import EngineConfig, EvaluateConfig, load_section
from pipeline.prompts import domains, read_chat, read_split
from pipeline.verifiers import accuracy

log = logging.getLogger("evaluate")

ROLES = ("teacher", "sft_student", "control", "opd_student")
"""The models evaluated, as metrics/eval.json names them."""


def run(cfg: EvaluateConfig, engine_cfg: EngineConfig, models_dir: Path, sft_model: Path, control_model: Path,
        opd_model: Path, prompts_dir: Path, out: Path, chart: Path | None = None) -> dict:
    """Write the metrics to `out` and, given `chart`, each model's accuracy as rows for dvc.yaml's bar chart."""
    prompts = read_split(prompts_dir, "eval")
    chat = read_chat(prompts_dir)
    unanswered = sum(r["answer"] is None for r in prompts)
    if unanswered:
        raise ValueError(f"{prompts_dir}: {unanswered} of {len(prompts)} eval prompts have no reference answer, "
                         f"which the verifier needs; use a prompt source with answers for the eval split")
    teachers = models.domain_teachers(models.read_manifest(models_dir))
    by_domain = {domain: [r for r in prompts if r["domain"] == domain] for domain in domains(prompts)}

    def model_of(role: str, domain: str | None) -> Path:
        students = dict(zip(ROLES[1:], (sft_model, control_model, opd_model)))
        return Path(models.teacher_for(teachers, domain, prompts_dir)["path"]) if role == "teacher" else students[role]

    # before any model answers, as rollouts and sft_data check theirs
    for model_dir in dict.fromkeys(model_of(role, domain) for role in ROLES for domain in by_domain):
        tokenizer = models.load_tokenizer(model_dir)
        models.check_prompt_lengths(prompts, [models.encode_prompt(tokenizer, r["prompt"], chat) for r in prompts],
                                    "evaluate.max_new_tokens", cfg.max_new_tokens, model_dir, prompts_dir)
    metrics = {
        "n_prompts": len(prompts),
        # only when sampling, so greedy runs keep the file as it always was
        **({"n_samples": cfg.n_samples} if cfg.n_samples > 1 else {}),
    }
    for role in ROLES:
        if len(by_domain) == 1:  # one domain: one call on every prompt, as always
            metrics[role] = accuracy(model_of(role, prompts[0]["domain"]), prompts, cfg, engine_cfg, chat)
            continue
        parts = {domain: accuracy(model_of(role, domain), rows, cfg, engine_cfg, chat)
                 for domain, rows in by_domain.items()}
        metrics[role] = {**weighted_mean(parts, {domain: len(rows) for domain, rows in by_domain.items()}),
                         "domains": {str(domain): part for domain, part in parts.items()}}
    metrics["teacher_mismatch_allowed"] = models.read_provenance(opd_model)["teacher_mismatch_allowed"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if chart is not None:
        rows = [{"model": role, "accuracy": metrics[role]["accuracy"]} for role in ROLES]
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_text(json.dumps(rows, indent=2) + "\n")
    log.info("accuracy (%s) on %d prompts x %d samples: %s", cfg.verifier, len(prompts), cfg.n_samples,
             ", ".join(f"{role} {metrics[role]['accuracy']:.3f}" for role in ROLES))
    return metrics


def weighted_mean(parts: dict, counts: dict) -> dict:
    """Each metric of `parts` (one metrics dict per domain) averaged over the domains, weighted by `counts` (their
    prompts): accuracy, pass@k and the sampled accuracy are means over prompts, and every prompt has as many
    responses, so this is the metric over all the prompts."""
    total = sum(counts.values())
    keys = next(iter(parts.values()))
    return {key: round(sum(counts[d] * part[key] for d, part in parts.items()) / total, 4) for key in keys}


def main(argv=None):
    args = cli.stage_args("evaluate", __doc__, argv, "models", "sft_model", "control_model", "opd_model", "prompts",
                          "out", "chart")
    params = args.params
    cfg = load_section("evaluate", params)
    metrics = run(cfg, load_section("engine", params), args.models, args.sft_model, args.control_model, args.opd_model,
                  args.prompts, args.out, args.chart)
    cli.summary(args, f"{len(ROLES) * metrics['n_prompts'] * (cfg.n_samples + cfg.sampled_n):,} responses")


if __name__ == "__main__":
    main()
