"""The teacher cache for training: every rollout/cache shard pair checked before training starts (checksum,
schema, alignment, k and k_s, ids within the student's vocabulary, teacher consistency domain by domain), then
streamed as training rows a few shards at a time (pipeline.data.ShardedRows)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import VERSION_KEY, SchemaError, teacher_cache
from data_schemas import rollouts as rollouts_schema
from pipeline import data, shards
from pipeline.config import ConfigError, OpdConfig, TeacherLogprobsConfig

log = logging.getLogger("opd")


def read_pair(rollout_path: Path, cache_path: Path) -> tuple[pa.Table, pa.Table, dict]:
    """One rollout shard and its cache shard, validated, checked to belong together, aligned row by row."""
    rollouts, _ = shards.read_shard(rollout_path, rollouts_schema)
    cache, provenance = shards.read_shard(cache_path, teacher_cache)
    if provenance.get("rollouts_sha256") != shards.file_sha256(rollout_path):
        raise SchemaError(
            f"{cache_path} was scored from other rollouts than {rollout_path}. "
            f"Fix: rerun the teacher_logprobs stage on these rollouts.",
            cache_path,
        )
    teacher_cache.check_aligned(cache, rollouts, cache_path, rollout_path)
    return rollouts, cache, provenance


def row_teachers(cache: pa.Table, provenance: dict, path: Path) -> dict[str | None, dict]:
    """The teacher that scored each domain's rows of one cache shard, by domain (its `domain` and `teacher` columns;
    a cache written before them: {None: the one teacher of its provenance})."""
    if not teacher_cache.has_row_teacher(cache):
        return {None: provenance["teacher"]}
    found: dict[str | None, dict] = {}
    for pair in cache.select(list(teacher_cache.ROW_TEACHER)).group_by(list(teacher_cache.ROW_TEACHER)).aggregate(
            []).to_pylist():
        domain, teacher = pair["domain"], provenance.get("teachers", {}).get(pair["teacher"])
        if teacher is None:
            raise SchemaError(f"{path}: rows scored by teacher {pair['teacher']!r}, which its provenance's teachers "
                              f"({sorted(provenance.get('teachers', {}))}) do not describe. Fix: delete it and rerun "
                              f"{teacher_cache.PRODUCED_BY}.", path)
        if domain in found and found[domain]["weights_sha256"] != teacher["weights_sha256"]:
            raise SchemaError(f"{path}: domain {domain!r} holds rows scored by two teachers ({found[domain]['id']} "
                              f"and {teacher['id']}). Fix: delete it and rerun {teacher_cache.PRODUCED_BY}.", path)
        found[domain] = teacher
    return found


def shard_rows(rollouts: pa.Table, cache: pa.Table) -> list[dict]:
    """Training rows of one shard pair: per-row numpy views (tokens, behaviour and teacher signal)."""
    k, student_k = teacher_cache.k_of(cache), teacher_cache.student_k_of(cache)
    behavior = {"behavior_topk_ids": shards.row_arrays(rollouts[rollouts_schema.TOPK_IDS], student_k),
                "teacher_behavior_topk_logprobs": shards.row_arrays(cache[teacher_cache.BEHAVIOR_TOPK], student_k),
                } if student_k else {}
    columns = {
        "prompt_ids": shards.row_arrays(rollouts["prompt_ids"]),
        "response_ids": shards.row_arrays(rollouts["response_ids"]),
        "behavior_logprobs": shards.row_arrays(rollouts["behavior_logprobs"]),
        "teacher_logprobs": shards.row_arrays(cache["teacher_token_logprobs"]),
        "teacher_topk_ids": shards.row_arrays(cache["teacher_topk_ids"], k),
        "teacher_topk_logprobs": shards.row_arrays(cache["teacher_topk_logprobs"], k),
        **behavior,
    }
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def open_cache(rollouts_dir: Path, cache_dir: Path, max_shards_in_memory: int = 8, vocab_size: int | None = None,
               student_support: bool = False):
    """Check every shard pair before training starts (a bad shard fails now, not hours in): each one's
    checksum, schema, alignment, k and k_s, with `vocab_size` (the student's) its top-k ids, and with
    `student_support` (opd.topk_support union) that it holds the behaviour top-k. Returns the
    streaming dataset over them, each row's length (for bucketing) and the cache's provenance (its first shard's),
    with `domain_teachers`: the teacher of each domain's rows over every shard (row_teachers), and `domain_shards`:
    the first shard holding each domain."""
    cache_paths = shards.list_shards(cache_dir)
    rollout_paths = shards.list_shards(rollouts_dir)
    if len(cache_paths) != len(rollout_paths) or not cache_paths:
        raise SchemaError(
            f"{cache_dir} has {len(cache_paths)} shards but {rollouts_dir} has {len(rollout_paths)}: "
            f"the cache is incomplete or from other rollouts. Fix: rerun the teacher_logprobs stage.",
            cache_dir,
        )
    sizes, lengths, cache_provenance, first = [], [], None, None
    domain_teachers: dict[str | None, dict] = {}
    domain_shards: dict[str | None, str] = {}
    for rollout_path, cache_path in zip(rollout_paths, cache_paths):
        rollouts, cache, provenance = read_pair(rollout_path, cache_path)
        widths = teacher_cache.k_of(cache, cache_path), teacher_cache.student_k_of(cache, cache_path)
        first = first or widths
        # a cache written before k_s was recorded holds none
        if widths != first or (provenance.get("k"), provenance.get("student_k", 0)) != widths:
            raise SchemaError(f"{cache_path} holds top-k {widths[0]} and behaviour top-k {widths[1]} (its provenance "
                              f"says {provenance.get('k')} and {provenance.get('student_k', 0)}) but {cache_paths[0]} "
                              f"holds {first[0]} and {first[1]}: the shards come from different runs. "
                              f"Fix: delete {cache_dir} and rerun the teacher_logprobs stage.", cache_path)
        if student_support and not widths[1]:
            raise no_student_support(rollout_path, rollouts)
        if vocab_size is not None:
            teacher_cache.check_ids_below(cache, vocab_size, cache_path)
        for domain, teacher in row_teachers(cache, provenance, cache_path).items():
            if domain in domain_teachers and domain_teachers[domain]["weights_sha256"] != teacher["weights_sha256"]:
                raise SchemaError(f"{cache_path}: its rows of domain {domain!r} were scored by {teacher['id']}, but "
                                  f"those of {domain_shards[domain]} by {domain_teachers[domain]['id']}: the shards "
                                  f"come from different runs. Fix: delete {cache_dir} and rerun the teacher_logprobs "
                                  f"stage.", cache_path)
            domain_teachers.setdefault(domain, teacher)
            domain_shards.setdefault(domain, str(cache_path))
        sizes.append(rollouts.num_rows)
        lengths.extend(pc.add(pc.list_value_length(rollouts["prompt_ids"]),
                              pc.list_value_length(rollouts["response_ids"])).to_pylist())
        cache_provenance = cache_provenance or provenance
    def load(i: int) -> list[dict]:  # checked above: while training, a shard is only read again
        return shard_rows(shards.read_shard(rollout_paths[i], rollouts_schema)[0],
                          shards.read_shard(cache_paths[i], teacher_cache)[0])

    dataset = data.ShardedRows(sizes, load, max_shards_in_memory)
    return dataset, lengths, {**cache_provenance, "domain_teachers": domain_teachers, "domain_shards": domain_shards}


def no_student_support(rollout_path: Path, rollouts: pa.Table) -> ConfigError:
    """The refusal of opd.topk_support union on rollouts without the behaviour top-k (a cache holds it exactly
    when its rollouts do: read_pair checks), naming the shard and the fix."""
    version = (rollouts.schema.metadata or {}).get(VERSION_KEY, b"?").decode()
    return ConfigError(f"{rollout_path}: rollouts v{version} without behavior_topk_ids (written with "
                       f"rollouts.student_top_k 0, or before it existed), but opd.topk_support union trains on the "
                       f"behaviour policy's top-k. Fix: set rollouts.student_top_k (e.g. 8) and rerun rollouts and "
                       f"teacher_logprobs (hf scorer; dvc repro teacher_logprobs), or set opd.topk_support: teacher")


def sft_teachers(sft_provenance: dict) -> dict[str | None, dict]:
    """The teachers that wrote an SFT student's data, by domain (key None: one teacher for every domain)."""
    return sft_provenance.get("sft_data_teachers") or {None: sft_provenance["sft_data_teacher"]}


def check_consistency(cfg: OpdConfig, sft_provenance: dict, cache_provenance: dict, sft_weights: str,
                      sft_model: Path) -> None:
    """Refuse a cache whose teacher of any domain differs from that domain's SFT-data teacher (scored by the SFT
    student, teacher_logprobs.model sft: from the SFT student at `sft_model`, of weights `sft_weights`, that OPD
    starts from), whose tokenizer differs from the student's, or whose k is too small. `cache_provenance` is
    open_cache's (with `domain_teachers`)."""
    cache_teachers = cache_provenance.get("domain_teachers") or {None: cache_provenance["teacher"]}
    where = cache_provenance.get("domain_shards", {})
    sft = sft_teachers(sft_provenance)
    for domain, cache_teacher in cache_teachers.items():
        shown = f"domain {domain!r}" if domain is not None else "every domain"
        path = where.get(domain, "the teacher cache")
        sft_teacher = sft.get(domain, sft.get(None))
        if cache_provenance.get("scorer", "teacher") == "sft":  # self-distillation: the teacher is its SFT self
            if cache_teacher["weights_sha256"] != sft_weights:
                _mismatch(cfg, f"self-distillation inconsistency: the cache was scored by the SFT student "
                               f"{cache_teacher['id']} (weights {cache_teacher['weights_sha256'][:12]}) but OPD starts "
                               f"from {sft_model} (weights {sft_weights[:12]}), which must be its own teacher. Fix: "
                               f"rerun teacher_logprobs with --sft-model {sft_model}, or set "
                               f"opd.allow_teacher_mismatch: true to train anyway (recorded in the metrics).")
        elif sft_teacher is None:
            _mismatch(cfg, f"teacher inconsistency in {shown}: {path} holds rows of {shown} (scored by "
                           f"{cache_teacher['id']}), but the SFT data of {sft_model} was written by a teacher per "
                           f"domain and names none for it (its domains: {sorted(map(str, sft))}); a cache written "
                           f"without the rows' domains (no --prompts, or before they were recorded) has the domain "
                           f"None. Fix: rerun teacher_logprobs with --prompts (dvc repro teacher_logprobs), or set "
                           f"opd.allow_teacher_mismatch: true to train anyway (biased; recorded in the metrics).")
        elif sft_teacher["weights_sha256"] != cache_teacher["weights_sha256"]:
            _mismatch(cfg, f"teacher inconsistency in {shown}: the SFT data of {sft_model} was written by "
                           f"{sft_teacher['id']} (weights {sft_teacher['weights_sha256'][:12]}) but {path} was scored "
                           f"by {cache_teacher['id']} (weights {cache_teacher['weights_sha256'][:12]}). Fix: rerun "
                           f"teacher_logprobs with the SFT teacher of {shown} (models.teachers), or set "
                           f"opd.allow_teacher_mismatch: true to train anyway (biased; recorded in the metrics).")
        student_tok, teacher_tok = sft_provenance["base"]["tokenizer_sha256"], cache_teacher["tokenizer_sha256"]
        if student_tok != teacher_tok:
            raise ConfigError(
                f"tokenizer mismatch: the student ({sft_provenance['base']['id']}, tokenizer {student_tok[:12]}) and "
                f"the cache's teacher ({cache_teacher['id']}, tokenizer {teacher_tok[:12]}) map tokens to different "
                f"ids, so the cached top-k ids mean other tokens to the student. Fix: use a student and teacher of "
                f"one tokenizer family (same vocabulary and token-to-id mapping) in the models section."
            )
    if cfg.top_k is not None and cfg.top_k > cache_provenance["k"]:
        raise ConfigError(
            f"opd.top_k is {cfg.top_k} but the teacher cache holds k={cache_provenance['k']}. "
            f"Fix: lower opd.top_k, or raise teacher_logprobs.top_k and rerun teacher_logprobs."
        )


def _mismatch(cfg: OpdConfig, message: str) -> None:
    if not cfg.allow_teacher_mismatch:
        raise ConfigError(message)
    log.warning("%s (allowed by opd.allow_teacher_mismatch)", message)


def check_scoring(cfg: TeacherLogprobsConfig, cache_provenance: dict, cache_dir: Path) -> None:
    """Refuse a cache scored by another model (teacher_logprobs.model) or under another teacher prompt than `cfg`
    says: the params changed since it was scored, so it is stale (and refresh rounds would score otherwise)."""
    # a cache written before these were recorded was scored by the teacher under the student's prompt
    scored = {"model": cache_provenance.get("scorer", "teacher"),
              "teacher_prompt": cache_provenance.get("teacher_prompt")}
    wanted = {"model": cfg.model, "teacher_prompt": cfg.teacher_prompt}
    if scored != wanted:
        differ = ", ".join(f"teacher_logprobs.{key} {scored[key]!r} (params: {wanted[key]!r})"
                           for key in scored if scored[key] != wanted[key])
        raise ConfigError(f"{cache_dir} was scored with {differ}: it is stale for these params. Fix: rerun "
                          f"teacher_logprobs (dvc repro teacher_logprobs), or set the params back")
