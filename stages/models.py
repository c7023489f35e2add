"""Resolve the teacher and the student: train the toy teacher and initialise the toy student, or record real ones.

    python -m stages.models --params params.yaml --prompts data/prompts --out models/base

With `models.teacher: toy` the teacher is a small Llama-style model trained here on the task's
reference answers, written in the notation `models.teacher_style` (the toy task's two valid ways);
with `models.student: toy` the student is a smaller one, freshly initialised.
Otherwise each is a local model directory or a hub id, resolved and recorded with content hashes.
`manifest.json` in the output says where each model lives; later stages read only it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from data_schemas import prompts as prompts_schema
from pipeline import cli, data, models, shards, toy_task, training
from pipeline.config import ConfigError, ModelsConfig, TaskConfig, load_section
from pipeline.prompts import read_chat, read_split

log = logging.getLogger("models")


def run(cfg: ModelsConfig, task: TaskConfig, prompts_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = toy_task.build_tokenizer()
    manifest = {}
    if cfg.teacher == "toy":
        teacher = models.build_toy_model(cfg.toy_teacher, tokenizer, cfg.seed)
        chat = read_chat(prompts_dir)
        toy = shards.read_shards(prompts_dir, prompts_schema)[1].get("task") == toy_task.TASK
        rows = [
            {
                "prompt_ids": models.encode_prompt(tokenizer, r["prompt"], chat),
                "response_ids": models.encode_response(
                    tokenizer, toy_task.solve(r["prompt"], cfg.teacher_style) if toy else r["answer"]),
            }
            for r in read_split(prompts_dir, "teacher_train")
        ]
        train_cfg = cfg.teacher_training
        batches = data.in_memory(rows, train_cfg.batch_size, tokenizer.pad_token_id, train_cfg.seed)
        # A killed run resumes from the last of teacher_training.checkpoint_every's checkpoints, kept beside `out`
        # (dvc deletes `out` before it reruns the stage), if it was written for this config and these prompts.
        training.train(teacher, batches, train_cfg, out / "logs" / "teacher",
                       checkpoint_dir=training.checkpoint_dir_for(out),
                       fingerprint=training.inputs_fingerprint(train_cfg, json.dumps(asdict(cfg), sort_keys=True),
                                                               [prompts_dir]))
        models.save_model(teacher, tokenizer, out / "teacher")
        manifest["teacher"] = {**models.describe("toy-teacher", out / "teacher"), "path": "teacher",
                              **({"style": cfg.teacher_style} if toy else {})}
    else:
        manifest["teacher"] = models.describe(cfg.teacher, models.resolve_model_dir(cfg.teacher, "models.teacher"))
    if cfg.student == "toy":
        student = models.build_toy_model(cfg.toy_student, tokenizer, cfg.seed + 1)
        models.save_model(student, tokenizer, out / "student")
        manifest["student"] = {**models.describe("toy-student", out / "student"), "path": "student"}
    else:
        manifest["student"] = models.describe(cfg.student, models.resolve_model_dir(cfg.student, "models.student"))
    teacher, student = manifest["teacher"], manifest["student"]
    teacher_tok, student_tok = teacher["tokenizer_sha256"], student["tokenizer_sha256"]
    if teacher_tok != student_tok:  # checked here, before any stage runs either model
        raise ConfigError(f"models.teacher ({teacher['id']}) and models.student ({student['id']}) map tokens to "
                          f"different ids (tokenizers {teacher_tok[:12]} and {student_tok[:12]}), so the teacher's "
                          f"top-k ids would mean other tokens to the student. Fix: pick a teacher and a student of "
                          f"one tokenizer family")
    (out / models.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("teacher %s, student %s -> %s", manifest["teacher"]["id"], manifest["student"]["id"], out)
    return manifest


def main(argv=None):
    args = cli.stage_args("models", __doc__, argv, "prompts", "out")
    cfg = load_section("models", args.params)
    run(cfg, load_section("task", args.params), args.prompts, args.out)
    cli.summary(args, *([f"{cfg.teacher_training.steps:,} teacher steps"] if cfg.teacher == "toy" else []))


if __name__ == "__main__":
    main()
