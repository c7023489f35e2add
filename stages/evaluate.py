"""Held-out accuracy of the teacher, the SFT student and the OPD student, as a DVC metrics file.

    python -m stages.evaluate --params params.yaml --models models/base --sft-model models/sft --opd-model models/opd --prompts data/prompts --out metrics/eval.json --chart metrics/accuracy.json

Each model answers every `eval` prompt greedily, or `evaluate.n_samples` times with sampling; the
verifier named by `evaluate.verifier` checks each response against the prompt's reference answer
(pipeline/verifiers.py; the default `toy_exact` counts only a whole worked answer that matches).
Per model: `accuracy` (pass@1, the mean correctness over all responses), `mean_response_tokens`,
and `pass@k` for each k of `evaluate.pass_k` (the unbiased estimator over the n samples).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import cli, engines, models, verifiers
from pipeline.config import ChatConfig, EngineConfig, EvaluateConfig, SamplingConfig, load_section
from stages.prompts import read_chat, read_split

log = logging.getLogger("evaluate")


def accuracy(model_dir, prompts: list[dict], cfg: EvaluateConfig, engine_cfg: EngineConfig,
             chat: ChatConfig | None = None) -> dict:
    engine = engines.load_engine(model_dir, engine_cfg)
    sampling = SamplingConfig(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens)
    try:
        gens = engine.generate([models.encode_prompt(engine.tokenizer, r["prompt"], chat) for r in prompts], sampling, seed=cfg.seed)
    finally:
        engine.close()
    texts = engine.tokenizer.batch_decode([g.response_ids for g in gens], skip_special_tokens=True)
    verify = verifiers.get_verifier(cfg.verifier)
    correct = [0] * len(prompts)  # correct responses of each prompt, out of n_samples
    for gen, text in zip(gens, texts):
        correct[gen.prompt_index] += verify(text, prompts[gen.prompt_index]["answer"])
    metrics = {
        "accuracy": round(verifiers.mean_pass_at_k(correct, cfg.n_samples, 1), 4),
        "mean_response_tokens": round(sum(len(g.response_ids) for g in gens) / len(gens), 2),
    }
    for k in sorted(cfg.pass_k):
        metrics[f"pass@{k}"] = round(verifiers.mean_pass_at_k(correct, cfg.n_samples, k), 4)
    return metrics


def run(cfg: EvaluateConfig, engine_cfg: EngineConfig, models_dir: Path, sft_model: Path, opd_model: Path, prompts_dir: Path, out: Path,
        chart: Path | None = None) -> dict:
    """Write the metrics to `out` and, given `chart`, each model's accuracy as rows for dvc.yaml's bar chart."""
    prompts = read_split(prompts_dir, "eval")
    chat = read_chat(prompts_dir)
    unanswered = sum(r["answer"] is None for r in prompts)
    if unanswered:
        raise ValueError(f"{prompts_dir}: {unanswered} of {len(prompts)} eval prompts have no reference answer, "
                         f"which the verifier needs; use a prompt source with answers for the eval split")
    metrics = {
        "n_prompts": len(prompts),
        # only when sampling, so greedy runs keep the file as it always was
        **({"n_samples": cfg.n_samples} if cfg.n_samples > 1 else {}),
        "teacher": accuracy(models.read_manifest(models_dir)["teacher"]["path"], prompts, cfg, engine_cfg, chat),
        "sft_student": accuracy(sft_model, prompts, cfg, engine_cfg, chat),
        "opd_student": accuracy(opd_model, prompts, cfg, engine_cfg, chat),
    }
    metrics["teacher_mismatch_allowed"] = models.read_provenance(opd_model)["teacher_mismatch_allowed"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if chart is not None:
        rows = [{"model": role, "accuracy": metrics[role]["accuracy"]} for role in ("teacher", "sft_student", "opd_student")]
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_text(json.dumps(rows, indent=2) + "\n")
    log.info("accuracy (%s): teacher %.3f, SFT student %.3f, OPD student %.3f on %d prompts x %d samples", cfg.verifier,
             metrics["teacher"]["accuracy"], metrics["sft_student"]["accuracy"], metrics["opd_student"]["accuracy"],
             len(prompts), cfg.n_samples)
    return metrics


def main(argv=None):
    args = cli.stage_args(__doc__, argv, "models", "sft_model", "opd_model", "prompts", "out", "chart")
    params = args.params
    cfg = load_section("evaluate", params)
    metrics = run(cfg, load_section("engine", params), args.models, args.sft_model, args.opd_model, args.prompts, args.out,
                  args.chart)
    cli.summary(args, f"{3 * metrics['n_prompts'] * cfg.n_samples:,} responses")  # teacher, SFT and OPD students


if __name__ == "__main__":
    main()
