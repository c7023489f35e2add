"""The teacher scores the rollouts once; its log-probs are cached in Parquet shards for OPD.

    python -m stages.teacher_logprobs --params params.yaml --models models/base --rollouts data/rollouts --out data/teacher_cache

Cache shard i scores rollout shard i row by row (same keys, same order). Per response token it
stores the teacher's exact log-prob of the sampled token (float32) and its top-k ids and log-probs.
Finished shards are kept on rerun, so a killed run recomputes only what is missing, and
`--shard w --num-shards n` workers split the shards between them (shards i % n == w each).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_schemas import rollouts as rollouts_schema
from data_schemas import teacher_cache
from pipeline import cli, engines, models, shards
from pipeline.config import ConfigError, EngineConfig, TeacherLogprobsConfig, load_section

log = logging.getLogger("teacher_logprobs")


def _fixed_size(arrays: list[np.ndarray], value_type: pa.DataType, k: int) -> pa.Array:
    """list<fixed_size_list<value_type, k>> from per-row [R, k] arrays, without Python loops over tokens."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), k)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def scores_table(rollouts: pa.Table, scores: list[engines.Scores], k: int) -> pa.Table:
    """The cache rows for `rollouts` (keys copied) from the engine's scores."""
    return pa.table(
        {
            **{key: rollouts[key] for key in teacher_cache.KEYS},
            "teacher_token_logprobs": [s.token_logprobs for s in scores],
            "teacher_topk_ids": _fixed_size([s.topk_ids for s in scores], pa.int32(), k),
            "teacher_topk_logprobs": _fixed_size([s.topk_logprobs.astype(np.float16) for s in scores], pa.float16(), k),
        }
    )


def run(cfg: TeacherLogprobsConfig, engine_cfg: EngineConfig, models_dir: Path, rollouts_dir: Path, out: Path,
        worker: tuple[int, int] = (0, 1), replace_stale: bool = False, engine=None) -> int:
    """Score every rollout shard of `rollouts_dir` into `out`; `engine`: the teacher's, already loaded
    (OPD refresh rounds keep it), else loaded here if a shard is missing."""
    manifest = models.read_manifest(models_dir)
    teacher = manifest["teacher"]
    # Checked before any shard is scored or replaced: a top_k the teacher cannot give, ids the student cannot read.
    teacher_vocab = models.model_config(teacher["path"]).vocab_size
    if cfg.top_k > teacher_vocab:
        raise ConfigError(f"teacher_logprobs.top_k is {cfg.top_k} but the teacher ({teacher['id']}) has a vocabulary "
                          f"of {teacher_vocab} tokens. Fix: set teacher_logprobs.top_k to at most {teacher_vocab}")
    student_vocab = models.model_config(manifest["student"]["path"]).vocab_size
    rollout_paths = shards.list_shards(rollouts_dir)
    if not rollout_paths:
        raise FileNotFoundError(f"{rollouts_dir} holds no rollout shards: run the rollouts stage first")
    for index, path in enumerate(rollout_paths):
        if path != shards.shard_path(rollouts_dir, index):
            raise FileNotFoundError(
                f"{shards.shard_path(rollouts_dir, index)} is missing: the rollouts are incomplete. "
                f"Fix: finish the rollouts stage (every --shard worker) before scoring."
            )
    code = cli.code_sha256("teacher_logprobs")

    def provenance(index: int) -> dict:
        return {
            "stage": "teacher_logprobs",
            "code_sha256": code,
            "teacher": models.identity(teacher),
            "engine": engines.engine_version(engine_cfg.name),
            "logprob_mode": engines.LOGPROB_MODE,
            "temperature": 1.0,
            "k": cfg.top_k,
            "rollouts_sha256": shards.file_sha256(rollout_paths[index]),
        }

    def make_table(index: int, _rows) -> pa.Table:
        nonlocal engine
        engine = engine or engines.load_engine(teacher["path"], engine_cfg, cfg.top_k)  # only if a shard is missing
        rollouts, _ = shards.read_shard(rollout_paths[index], rollouts_schema)
        scores = engine.score(rollouts["prompt_ids"].to_pylist(), rollouts["response_ids"].to_pylist(), cfg.top_k)
        table = scores_table(rollouts, scores, cfg.top_k)
        teacher_cache.check_ids_below(table, student_vocab, shards.shard_path(out, index))
        return table

    written = shards.fill_shards(out, len(rollout_paths), 1, make_table, teacher_cache, provenance, worker,
                                 replace_stale, k=cfg.top_k)
    log.info("%s: %d of %d shards scored now", out, written, len(rollout_paths))
    return written


def main(argv=None):
    args = cli.stage_args(__doc__, argv, "models", "rollouts", "out", sharded=True)
    params = args.params
    run(load_section("teacher_logprobs", params), load_section("engine", params), args.models, args.rollouts, args.out,
        worker=args.worker, replace_stale=args.replace_stale)
    cli.summary(args)


if __name__ == "__main__":
    main()
