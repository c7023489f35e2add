"""Held-out accuracy of the teacher, the SFT student and the OPD student, as a DVC metrics file.

    python -m stages.evaluate --params params.yaml --models models/base --sft-model models/sft --opd-model models/opd --prompts data/prompts --out metrics/eval.json

Each model answers every `eval` prompt greedily; an answer counts only if the whole worked
answer matches (pipeline/toy_task.py: is_correct).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import cli, engines, models, toy_task
from pipeline.config import EngineConfig, EvaluateConfig, SamplingConfig, load_section
from stages.prompts import read_split

log = logging.getLogger("evaluate")


def accuracy(model_dir, prompts: list[dict], cfg: EvaluateConfig, engine_cfg: EngineConfig) -> dict:
    engine = engines.load_engine(model_dir, engine_cfg)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    try:
        gens = engine.generate([models.encode_prompt(engine.tokenizer, r["prompt"]) for r in prompts], greedy, seed=0)
    finally:
        engine.close()
    texts = engine.tokenizer.batch_decode([g.response_ids for g in gens], skip_special_tokens=True)
    correct = sum(toy_task.is_correct(text, r["answer"]) for text, r in zip(texts, prompts))
    return {
        "accuracy": round(correct / len(prompts), 4),
        "mean_response_tokens": round(sum(len(g.response_ids) for g in gens) / len(gens), 2),
    }


def run(cfg: EvaluateConfig, engine_cfg: EngineConfig, models_dir: Path, sft_model: Path, opd_model: Path, prompts_dir: Path, out: Path) -> dict:
    prompts = read_split(prompts_dir, "eval")
    metrics = {
        "n_prompts": len(prompts),
        "teacher": accuracy(models.read_manifest(models_dir)["teacher"]["path"], prompts, cfg, engine_cfg),
        "sft_student": accuracy(sft_model, prompts, cfg, engine_cfg),
        "opd_student": accuracy(opd_model, prompts, cfg, engine_cfg),
    }
    metrics["teacher_mismatch_allowed"] = models.read_provenance(opd_model)["teacher_mismatch_allowed"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("accuracy: teacher %.3f, SFT student %.3f, OPD student %.3f on %d prompts",
             metrics["teacher"]["accuracy"], metrics["sft_student"]["accuracy"], metrics["opd_student"]["accuracy"], len(prompts))
    return metrics


def main(argv=None):
    args = cli.stage_args(__doc__, argv, "models", "sft_model", "opd_model", "prompts", "out")
    params = args.params
    run(load_section("evaluate", params), load_section("engine", params), args.models, args.sft_model, args.opd_model, args.prompts, args.out)


if __name__ == "__main__":
    main()
