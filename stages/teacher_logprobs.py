r"""The teacher scores the rollouts once; its log-probs are cached in Parquet shards for OPD.

    python -m stages.teacher_logprobs --params params.yaml --models models/base --rollouts data/rollouts \
        --out data/teacher_cache --sft-model models/sft --prompts data/prompts

Cache shard i scores rollout shard i row by row (same keys, same order). Per response token it
stores the teacher's exact log-prob of the sampled token (float32) and its top-k ids and log-probs;
when the rollouts hold the behaviour policy's top-k_s ids (rollouts.student_top_k), also the teacher's
log-probs at those ids (hf scorer only: vLLM's and the server's prompt log-probs cannot be asked for
log-probs at given ids, so they are refused with the fix).
The scorer is models.teacher (with models.teachers: each row's domain's teacher, the domain read from
`--prompts`), or with `teacher_logprobs.model: sft` the SFT student (`--sft-model`): self-distillation.
Every row records its domain and the id of the teacher that scored it (`domain`, `teacher`; the
provenance's `teachers` holds each one's hashes). With `teacher_logprobs.teacher_prompt` it scores each
response after its own prompt,
the template filled in with the prompt's text and reference answer from `--prompts` (privileged
context the student never sees); the response tokens stay the student's. `--sft-model` is read only
when these settings need it; without `--prompts` the rows' domain is null (one teacher only).
Finished shards are kept on rerun, so a killed run recomputes only what is missing, and
`--shard w --num-shards n` workers split the shards between them (shards i % n == w each).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import SchemaError, teacher_cache
from data_schemas import rollouts as rollouts_schema
from pipeline import cli, engines, models, shards
from pipeline.config import ConfigError, EngineConfig, TeacherLogprobsConfig, load_section
from pipeline.prompts import fill_teacher_prompt, prompts_sha256, read_chat, read_rows
from pipeline.provenance import stage_provenance

log = logging.getLogger("teacher_logprobs")


def scores_table(rollouts: pa.Table, scores: list[engines.Scores], k: int, student_k: int = 0,
                 domains: list[str | None] | None = None, teachers: list[str] | None = None) -> pa.Table:
    """The cache rows for `rollouts` (keys copied) from the engine's scores (with `student_k`, their log-probs at the
    behaviour top-k ids), each with its domain and the id of the teacher that scored it (`domains`, `teachers`: one
    per row; None: no per-row teacher columns)."""
    row_teacher = {} if teachers is None else {"domain": pa.array(domains, pa.string()), "teacher": teachers}
    behavior = {teacher_cache.BEHAVIOR_TOPK: teacher_cache.topk_column(
        [s.at_ids_logprobs.astype(np.float16) for s in scores], pa.float16(), student_k)} if student_k else {}
    return pa.table(
        {
            **{key: rollouts[key] for key in teacher_cache.KEYS},
            "teacher_token_logprobs": [s.token_logprobs for s in scores],
            "teacher_topk_ids": teacher_cache.topk_column([s.topk_ids for s in scores], pa.int32(), k),
            "teacher_topk_logprobs": teacher_cache.topk_column([s.topk_logprobs.astype(np.float16) for s in scores],
                                                               pa.float16(), k),
            **behavior,
            **row_teacher,
        }
    )


def scorers(cfg: TeacherLogprobsConfig, models_dir: Path, sft_model: Path | None) -> dict[str | None, dict]:
    """The models that score (teacher_logprobs.model) by domain, as manifest entries (id, path, hashes): the
    manifest's teachers (models.domain_teachers; key None: one for every domain), or the SFT student at `sft_model`
    (self-distillation)."""
    if cfg.model == "teacher":
        return models.domain_teachers(models.read_manifest(models_dir))
    if sft_model is None:
        raise ConfigError("teacher_logprobs.model is sft, but no SFT model was given. Fix: pass --sft-model "
                          "models/sft (dvc.yaml's teacher_logprobs stage does)")
    return {None: models.describe(Path(sft_model).name, Path(sft_model))}


def row_domains(prompts_dir: Path, rollout_paths: list[Path]) -> tuple[dict[str, str | None], str]:
    """The domain of each prompt by prompt_id, from the prompts the rollouts were sampled from (checked), and their
    sha256."""
    rows, sha256 = read_rows(prompts_dir), prompts_sha256(prompts_dir)
    for path in rollout_paths:
        if shards.read_shard(path, rollouts_schema)[1].get("prompts_sha256") != sha256:
            raise SchemaError(f"{path} was sampled from other prompts than {prompts_dir}, whose domains say which "
                              f"teacher scores each row. Fix: pass the --prompts the rollouts were sampled from, or "
                              f"rerun the rollouts stage on these.", path)
    return {prompt_id: row["domain"] for prompt_id, row in rows.items()}, sha256


def teacher_prompt_ids(cfg: TeacherLogprobsConfig, teacher: dict, prompts_dir: Path | None,
                       rollout_paths: list[Path]) -> tuple[dict[str, list[int]], str]:
    """With teacher_logprobs.teacher_prompt: the scorer's prompt ids of each prompt the rollouts hold (by
    prompt_id; the template filled in from `prompts_dir` and encoded with the scorer's tokenizer and the prompts'
    chat settings), each checked to fit the scorer's positions with its rollouts' responses, and the prompts'
    sha256. Checked for every shard before any is scored or replaced."""
    if prompts_dir is None:
        raise ConfigError("teacher_logprobs.teacher_prompt is set, but no prompts were given to fill it in. Fix: pass "
                          "--prompts data/prompts (dvc.yaml's teacher_logprobs stage does)")
    rows, chat, sha256 = read_rows(prompts_dir), read_chat(prompts_dir), prompts_sha256(prompts_dir)
    tokenizer = models.load_tokenizer(teacher["path"])
    limit = getattr(models.model_config(teacher["path"]), "max_position_embeddings", None)
    encoded: dict[str, list[int]] = {}
    for path in rollout_paths:
        rollouts, provenance = shards.read_shard(path, rollouts_schema)
        if provenance.get("prompts_sha256") != sha256:
            raise SchemaError(f"{path} was sampled from other prompts than {prompts_dir}, whose text and answers "
                              f"would then fill in teacher_logprobs.teacher_prompt. Fix: pass the --prompts the "
                              f"rollouts were sampled from, or rerun the rollouts stage on these.", path)
        lengths = pc.list_value_length(rollouts["response_ids"]).to_pylist()
        for row, (prompt_id, length) in enumerate(zip(rollouts["prompt_id"].to_pylist(), lengths)):
            if prompt_id not in encoded:
                text = fill_teacher_prompt(cfg.teacher_prompt, rows[prompt_id], prompts_dir)
                encoded[prompt_id] = models.encode_prompt(tokenizer, text, chat)
            if limit and len(encoded[prompt_id]) + length > limit:
                raise ConfigError(
                    f"{path}: row {row} (prompt_id {prompt_id!r}): its teacher prompt (teacher_logprobs.teacher_prompt "
                    f"filled in) has {len(encoded[prompt_id])} tokens and its response {length}, "
                    f"{len(encoded[prompt_id]) + length} in all, over the {limit} positions of the scorer "
                    f"{teacher['path']}. Fix: shorten teacher_logprobs.teacher_prompt, or keep prompts, answers and "
                    f"responses shorter (prompts.max_prompt_tokens, rollouts.max_new_tokens)")
    return encoded, sha256


def run(cfg: TeacherLogprobsConfig, engine_cfg: EngineConfig, models_dir: Path, rollouts_dir: Path, out: Path,
        worker: tuple[int, int] = (0, 1), replace_stale: bool = False,
        engines_: engines.LazyEngines | None = None, sft_model: Path | None = None,
        prompts_dir: Path | None = None) -> int:
    """Score every rollout shard of `rollouts_dir` into `out`; `engines_`: the scorers', kept open by the caller
    (OPD refresh rounds keep them for every round), else each is loaded here if a shard needs it. `sft_model` is read
    only with teacher_logprobs.model sft; `prompts_dir` gives the rows' domains and fills in teacher_prompt."""
    manifest = models.read_manifest(models_dir)
    teachers = scorers(cfg, models_dir, sft_model)
    distinct = {teacher["id"]: teacher for teacher in teachers.values()}
    teacher = next(iter(distinct.values()))  # all of one tokenizer (the models stage checks): it encodes prompts
    # Checked before any shard is scored or replaced: a top_k the teacher cannot give, ids the student cannot read.
    teacher_vocab = min(models.model_config(t["path"]).vocab_size for t in distinct.values())
    if cfg.top_k > teacher_vocab:
        raise ConfigError(f"teacher_logprobs.top_k is {cfg.top_k} but the teacher ({teacher['id']}) has a vocabulary "
                          f"of {teacher_vocab} tokens. Fix: set teacher_logprobs.top_k to at most {teacher_vocab}")
    student_vocab = models.model_config(manifest["student"]["path"]).vocab_size
    rollout_paths = shards.complete_shards(rollouts_dir, rollouts_schema)
    # k_s of the rollouts (rollouts.student_top_k; 0 without behaviour top-k): every shard of one run has the same
    student_k = rollouts_schema.student_k_of(shards.checked_schema(rollout_paths[0], rollouts_schema), rollout_paths[0])
    if student_k and engine_cfg.name != "hf":
        raise ConfigError(f"{rollout_paths[0]}: " + engines.AT_IDS_HF_ONLY.format(engine=engine_cfg.name))
    # each prompt's domain, which picks its teacher (without prompts: the unnamed domain, one teacher only)
    domain_of, context = {}, {}
    if prompts_dir is not None:
        domain_of, sha256 = row_domains(prompts_dir, rollout_paths)
        context = {"prompts_sha256": sha256}
    elif None not in teachers:
        raise ConfigError("models.teachers gives each domain its own teacher, but no prompts were given to read the "
                          "rollouts' domains from. Fix: pass --prompts data/prompts (dvc.yaml's teacher_logprobs "
                          "stage does)")
    # the scorer's own prompt ids by prompt_id (None: the student's), and the prompts they were filled in from
    templated = None
    if cfg.teacher_prompt is not None:
        templated, sha256 = teacher_prompt_ids(cfg, teacher, prompts_dir, rollout_paths)
        context = {"prompts_sha256": sha256}

    def provenance(index: int) -> dict:
        # one teacher: also recorded as `teacher`, as before models.teachers existed
        single = {"teacher": models.identity(teacher)} if len(distinct) == 1 else {}
        return stage_provenance("teacher_logprobs", engine=engine_cfg.name, **single,
                                teachers={id_: models.identity(t) for id_, t in distinct.items()},
                                domains={"*" if d is None else d: t["id"] for d, t in teachers.items()},
                                scorer=cfg.model, teacher_prompt=cfg.teacher_prompt, temperature=1.0, k=cfg.top_k,
                                student_k=student_k, rollouts_sha256=shards.file_sha256(rollout_paths[index]),
                                **context)

    def make_table(index: int, _rows) -> pa.Table:
        path = rollout_paths[index]
        rollouts, _ = shards.read_shard(path, rollouts_schema)
        if rollouts_schema.student_k_of(rollouts) != student_k:
            raise SchemaError(f"{path} holds {rollouts_schema.student_k_of(rollouts)} behaviour top-k ids a token but "
                              f"{rollout_paths[0]} holds {student_k}: the shards come from different runs. Fix: delete "
                              f"{rollouts_dir} and rerun {rollouts_schema.PRODUCED_BY}.", path)
        at_ids = None
        if student_k:
            teacher_cache.check_ids_below(rollouts, teacher_vocab, path, rollouts_schema.TOPK_IDS, "teacher")
            at_ids = shards.row_arrays(rollouts[rollouts_schema.TOPK_IDS], student_k)
        prompt_ids = (rollouts["prompt_ids"].to_pylist() if templated is None
                      else [templated[prompt_id] for prompt_id in rollouts["prompt_id"].to_pylist()])
        response_ids = rollouts["response_ids"].to_pylist()
        domains = [domain_of.get(prompt_id) for prompt_id in rollouts["prompt_id"].to_pylist()]
        row_teachers = [models.teacher_for(teachers, domain, prompts_dir) for domain in domains]
        scores = [None] * rollouts.num_rows
        for path_, rows in engines.groups([t["path"] for t in row_teachers]).items():
            scored = lazy.get(path_).score([prompt_ids[i] for i in rows], [response_ids[i] for i in rows], cfg.top_k,
                                           None if at_ids is None else [at_ids[i] for i in rows])
            for row, score in zip(rows, scored):
                scores[row] = score
        table = scores_table(rollouts, scores, cfg.top_k, student_k, domains, [t["id"] for t in row_teachers])
        teacher_cache.check_ids_below(table, student_vocab, shards.shard_path(out, index))
        return table

    # the given engines stay open for the caller; those loaded here (only if a shard is missing) close at the end
    with (contextlib.nullcontext(engines_) if engines_
          else engines.LazyEngines(engine_cfg, cfg.top_k)) as lazy:
        written = shards.fill_shards(out, len(rollout_paths), 1, make_table, teacher_cache, provenance, worker,
                                     replace_stale, k=cfg.top_k, student_k=student_k, per_row_teacher=True)
    log.info("%s: %d of %d shards scored now", out, written, len(rollout_paths))
    return written


def main(argv=None):
    args = cli.stage_args("teacher_logprobs", __doc__, argv, "models", "rollouts", "out", sharded=True,
                          optional=("sft_model", "prompts"))
    params = args.params
    run(load_section("teacher_logprobs", params), load_section("engine", params), args.models, args.rollouts, args.out,
        worker=args.worker, replace_stale=args.replace_stale, sft_model=args.sft_model, prompts_dir=args.prompts)
    cli.summary(args)


if __name__ == "__main__":
    main()
