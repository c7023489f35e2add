r"""The teacher scores the rollouts once; its log-probs are cached in Parquet shards for OPD.

    python -m stages.teacher_logprobs --params params.yaml --models models/base --rollouts data/rollouts \
        --out data/teacher_cache

Cache shard i scores rollout shard i row by row (same keys, same order). Per response token it
stores the teacher's exact log-prob of the sampled token (float32) and its top-k ids and log-probs.
Finished shards are kept on rerun, so a killed run recomputes only what is missing, and
`--shard w --num-shards n` workers split the shards between them (shards i % n == w each).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_schemas import rollouts as rollouts_schema
from data_schemas import teacher_cache
from pipeline import cli, engines, models, shards
from pipeline.config import ConfigError, EngineConfig, TeacherLogprobsConfig, load_section
from pipeline.provenance import stage_provenance

log = logging.getLogger("teacher_logprobs")


def scores_table(rollouts: pa.Table, scores: list[engines.Scores], k: int) -> pa.Table:
    """The cache rows for `rollouts` (keys copied) from the engine's scores."""
    return pa.table(
        {
            **{key: rollouts[key] for key in teacher_cache.KEYS},
            "teacher_token_logprobs": [s.token_logprobs for s in scores],
            "teacher_topk_ids": teacher_cache.topk_column([s.topk_ids for s in scores], pa.int32(), k),
            "teacher_topk_logprobs": teacher_cache.topk_column([s.topk_logprobs.astype(np.float16) for s in scores],
                                                               pa.float16(), k),
        }
    )


def run(cfg: TeacherLogprobsConfig, engine_cfg: EngineConfig, models_dir: Path, rollouts_dir: Path, out: Path,
        worker: tuple[int, int] = (0, 1), replace_stale: bool = False,
        engine: engines.LazyEngine | None = None) -> int:
    """Score every rollout shard of `rollouts_dir` into `out`; `engine`: the teacher's, kept open by the caller
    (OPD refresh rounds keep it for every round), else one is loaded here if a shard is missing."""
    manifest = models.read_manifest(models_dir)
    teacher = manifest["teacher"]
    # Checked before any shard is scored or replaced: a top_k the teacher cannot give, ids the student cannot read.
    teacher_vocab = models.model_config(teacher["path"]).vocab_size
    if cfg.top_k > teacher_vocab:
        raise ConfigError(f"teacher_logprobs.top_k is {cfg.top_k} but the teacher ({teacher['id']}) has a vocabulary "
                          f"of {teacher_vocab} tokens. Fix: set teacher_logprobs.top_k to at most {teacher_vocab}")
    student_vocab = models.model_config(manifest["student"]["path"]).vocab_size
    rollout_paths = shards.complete_shards(rollouts_dir, rollouts_schema)

    def provenance(index: int) -> dict:
        return stage_provenance("teacher_logprobs", engine=engine_cfg.name, teacher=models.identity(teacher),
                                temperature=1.0, k=cfg.top_k, rollouts_sha256=shards.file_sha256(rollout_paths[index]))

    def make_table(index: int, _rows) -> pa.Table:
        rollouts, _ = shards.read_shard(rollout_paths[index], rollouts_schema)
        scores = lazy.get().score(rollouts["prompt_ids"].to_pylist(), rollouts["response_ids"].to_pylist(), cfg.top_k)
        table = scores_table(rollouts, scores, cfg.top_k)
        teacher_cache.check_ids_below(table, student_vocab, shards.shard_path(out, index))
        return table

    # the given engine stays open for the caller; one loaded here (only if a shard is missing) is closed at the end
    with (contextlib.nullcontext(engine) if engine
          else engines.LazyEngine(teacher["path"], engine_cfg, cfg.top_k)) as lazy:
        written = shards.fill_shards(out, len(rollout_paths), 1, make_table, teacher_cache, provenance, worker,
                                     replace_stale, k=cfg.top_k)
    log.info("%s: %d of %d shards scored now", out, written, len(rollout_paths))
    return written


def main(argv=None):
    args = cli.stage_args("teacher_logprobs", __doc__, argv, "models", "rollouts", "out", sharded=True)
    params = args.params
    run(load_section("teacher_logprobs", params), load_section("engine", params), args.models, args.rollouts, args.out,
        worker=args.worker, replace_stale=args.replace_stale)
    cli.summary(args)


if __name__ == "__main__":
    main()
