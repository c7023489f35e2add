"""Resolve the teacher and the student: train the toy teacher and initialise the toy student, or record real ones.

    python -m stages.models --params params.yaml --prompts data/prompts --out models/base

With `models.teacher: toy` the teacher is a small Llama-style model trained here on the task's
reference answers, written in the notation `models.teacher_style` (the toy task's two valid ways);
with `models.teachers` each domain of the prompts has its own teacher (a toy specialist trained on that
domain's teacher_train prompts only, saved as teacher-<domain>, or a model directory), each distinct one
built once and listed by domain in the manifest's `teachers`;
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
from pipeline.prompts import domains, read_chat, read_rows, read_split

log = logging.getLogger("models")


def _train_toy_teacher(cfg: ModelsConfig, prompts_dir: Path, out: Path, domain: str | None = None) -> dict:
    """Train a toy teacher on the teacher_train prompts (with `domain`, that domain's only: a specialist, saved as
    teacher-<domain>) and return its manifest entry."""
    tokenizer = toy_task.build_tokenizer()
    teacher = models.build_toy_model(cfg.toy_teacher, tokenizer, cfg.seed)
    chat = read_chat(prompts_dir)
    toy = shards.read_shards(prompts_dir, prompts_schema)[1].get("task") == toy_task.TASK
    rows = [
        {
            "prompt_ids": models.encode_prompt(tokenizer, r["prompt"], chat),
            "response_ids": models.encode_response(
                tokenizer, toy_task.solve(r["prompt"], cfg.teacher_style) if toy else r["answer"]),
        }
        for r in read_split(prompts_dir, "teacher_train") if domain is None or r["domain"] == domain
    ]
    if not rows:
        raise ConfigError(f"{prompts_dir}: no teacher_train prompts in domain {domain!r} for its toy teacher "
                          f"(models.teachers). Fix: give that domain teacher_train prompts (prompts.splits."
                          f"teacher_train), or map it to a model directory")
    name = "teacher" if domain is None else f"teacher-{domain}"
    train_cfg = cfg.teacher_training
    batches = data.in_memory(rows, train_cfg.batch_size, tokenizer.pad_token_id, train_cfg.seed)
    # A killed run resumes from the last of teacher_training.checkpoint_every's checkpoints, kept beside `out`
    # (dvc deletes `out` before it reruns the stage), if it was written for this config and these prompts.
    described = json.dumps(asdict(cfg), sort_keys=True) + ("" if domain is None else f" domain {domain}")
    training.train(teacher, batches, train_cfg, out / "logs" / name,
                   checkpoint_dir=training.checkpoint_dir_for(out if domain is None else out.with_name(
                       f"{out.name}-{name}")),
                   fingerprint=training.inputs_fingerprint(train_cfg, described, [prompts_dir]))
    models.save_model(teacher, tokenizer, out / name)
    return {**models.describe(f"toy-{name}", out / name), "path": name, **({"style": cfg.teacher_style} if toy else {}),
            **({"domain": domain} if domain is not None else {})}


def teacher_specs(cfg: ModelsConfig, prompts_dir: Path) -> dict[str, str]:
    """models.teachers checked against the prompts' domains, `toy` written out as `toy:<domain>`."""
    found = domains(list(read_rows(prompts_dir).values()))
    named = sorted(d for d in found if d is not None)
    if None in found:
        raise ConfigError(f"models.teachers maps domains to teachers, but {prompts_dir} has prompts without a domain. "
                          f"Fix: set task.domains (toy task) or prompts.domain_column, or models.teachers: {{}}")
    missing, unknown = sorted(set(named) - set(cfg.teachers)), sorted(set(cfg.teachers) - set(named))
    if missing or unknown:
        raise ConfigError(f"models.teachers names domains {sorted(cfg.teachers)} but {prompts_dir} has domains "
                          f"{named}" + (f": {missing} have no teacher" if missing else "")
                          + (f": {unknown} are in no prompt" if unknown else "")
                          + ". Fix: map every domain of the prompts to its teacher, and no other")
    specs = {domain: f"toy:{domain}" if spec == "toy" else spec for domain, spec in cfg.teachers.items()}
    for domain, spec in specs.items():
        if spec.startswith("toy:") and spec.removeprefix("toy:") not in named:
            raise ConfigError(f"models.teachers.{domain}: {spec} is the toy specialist of domain "
                              f"{spec.removeprefix('toy:')!r}, which is in no prompt (domains: {named})")
    return {domain: specs[domain] for domain in named}


def run(cfg: ModelsConfig, task: TaskConfig, prompts_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = toy_task.build_tokenizer()
    manifest = {}
    if cfg.teachers:
        built: dict[str, dict] = {}  # each distinct teacher once, however many domains it serves
        for spec in teacher_specs(cfg, prompts_dir).values():
            if spec not in built:
                built[spec] = (_train_toy_teacher(cfg, prompts_dir, out, spec.removeprefix("toy:"))
                               if spec.startswith("toy:") else
                               models.describe(spec, models.resolve_model_dir(spec, "models.teachers")))
        manifest["teachers"] = {domain: built[spec] for domain, spec in teacher_specs(cfg, prompts_dir).items()}
    elif cfg.teacher == "toy":
        manifest["teacher"] = _train_toy_teacher(cfg, prompts_dir, out)
    else:
        manifest["teacher"] = models.describe(cfg.teacher, models.resolve_model_dir(cfg.teacher, "models.teacher"))
    if cfg.student == "toy":
        student = models.build_toy_model(cfg.toy_student, tokenizer, cfg.seed + 1)
        models.save_model(student, tokenizer, out / "student")
        manifest["student"] = {**models.describe("toy-student", out / "student"), "path": "student"}
    else:
        manifest["student"] = models.describe(cfg.student, models.resolve_model_dir(cfg.student, "models.student"))
    student = manifest["student"]
    for domain, teacher in models.domain_teachers(manifest).items():
        teacher_tok, student_tok = teacher["tokenizer_sha256"], student["tokenizer_sha256"]
        if teacher_tok != student_tok:  # checked here, before any stage runs either model
            param = "models.teacher" if domain is None else f"models.teachers.{domain}"
            raise ConfigError(f"{param} ({teacher['id']}) and models.student ({student['id']}) map tokens to "
                              f"different ids (tokenizers {teacher_tok[:12]} and {student_tok[:12]}), so the teacher's "
                              f"top-k ids would mean other tokens to the student. Fix: pick a teacher and a student "
                              f"of one tokenizer family")
    (out / models.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("teacher %s, student %s -> %s", ", ".join(f"{d or 'every domain'}: {t['id']}" for d, t in
                                                     models.domain_teachers(manifest).items()), student["id"], out)
    return manifest


def main(argv=None):
    args = cli.stage_args("models", __doc__, argv, "prompts", "out")
    cfg = load_section("models", args.params)
    manifest = run(cfg, load_section("task", args.params), args.prompts, args.out)
    toys = len({t["id"] for t in models.domain_teachers(manifest).values() if t["id"].startswith("toy-teacher")})
    cli.summary(args, *([f"{toys * cfg.teacher_training.steps:,} teacher steps"] if toys else []))

if __name__ == "__main__":
    main()
