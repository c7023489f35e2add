"""The SFT student samples responses on the OPD prompts, keeping its log-prob of each sampled token.

    python -m stages.rollouts --params params.yaml --policy models/sft --prompts data/prompts --out data/rollouts

The log-probs (raw, temperature 1) are the behaviour policy mu's, for importance weights in OPD.
With `rollouts.student_top_k` = k_s > 0 each response token also keeps mu's top-k_s ids
(`behavior_topk_ids`), the student's support on which teacher_logprobs then scores the teacher.
Shard i uses seed `rollouts.seed + i`, so a crashed run resumes with exactly the rows an
uninterrupted run writes, and `--shard w --num-shards n` workers (shards i % n == w each) together
write exactly the rows of one worker.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_schemas import rollouts as rollouts_schema
from data_schemas import topk_column
from pipeline import cli, engines, models, shards
from pipeline.config import EngineConfig, RolloutsConfig, load_section
from pipeline.prompts import prompts_sha256, read_chat, read_split
from pipeline.provenance import stage_provenance

log = logging.getLogger("rollouts")


SEED_STRIDE = 1_000_000
"""Shard i of round r samples with seed `rollouts.seed + r * SEED_STRIDE + i`: rounds never share a seed."""


def run(cfg: RolloutsConfig, engine_cfg: EngineConfig, policy_dir: Path, prompts_dir: Path, out: Path,
        round_: int = 0, worker: tuple[int, int] = (0, 1), replace_stale: bool = False,
        prompts: list[dict] | None = None) -> int:
    """Sample `prompts` (default: the opd split of `prompts_dir`) into shards under `out`."""
    prompts = read_split(prompts_dir, "opd") if prompts is None else prompts
    tokenizer = models.load_tokenizer(policy_dir)
    chat = read_chat(prompts_dir)
    provenance = stage_provenance("rollouts", cfg, engine_cfg.name, round=round_,
                                  policy=models.identity(models.describe(policy_dir.name, policy_dir)),
                                  prompts_sha256=prompts_sha256(prompts_dir))

    encoded = [models.encode_prompt(tokenizer, r["prompt"], chat) for r in prompts]
    models.check_prompt_lengths(prompts, encoded, "rollouts.max_new_tokens", cfg.max_new_tokens, policy_dir,
                                prompts_dir)

    def make_table(index: int, rows: slice) -> pa.Table:
        chunk, prompt_ids = prompts[rows], encoded[rows]
        student_k = cfg.student_top_k
        gens = engine.get().generate(prompt_ids, cfg, seed=cfg.seed + round_ * SEED_STRIDE + index, top_k=student_k)
        topk = {rollouts_schema.TOPK_IDS: topk_column([np.asarray(g.topk_ids, dtype=np.int32) for g in gens],
                                                      pa.int32(), student_k)} if student_k else {}
        return pa.table(
            {
                "prompt_id": [chunk[g.prompt_index]["prompt_id"] for g in gens],
                "sample_idx": [g.sample_idx for g in gens],
                "round": [round_] * len(gens),
                "prompt_ids": [prompt_ids[g.prompt_index] for g in gens],
                "response_ids": [g.response_ids for g in gens],
                "behavior_logprobs": [g.logprobs for g in gens],
                "finish_reason": [g.finish_reason for g in gens],
                **topk,
            }
        )

    # loaded only if a shard is missing; vLLM must allow student_top_k log-probs a token
    with engines.LazyEngine(policy_dir, engine_cfg, cfg.student_top_k) as engine:
        written = shards.fill_shards(out, len(prompts), cfg.rows_per_shard, make_table, rollouts_schema, provenance,
                                     worker, replace_stale, student_k=cfg.student_top_k)
    log.info("%s: %d shards written (%d prompts x %d samples)", out, written, len(prompts), cfg.n)
    return written


def main(argv=None):
    args = cli.stage_args("rollouts", __doc__, argv, "policy", "prompts", "out", sharded=True)
    params = args.params
    run(load_section("rollouts", params), load_section("engine", params), args.policy, args.prompts, args.out,
        worker=args.worker, replace_stale=args.replace_stale)
    cli.summary(args)


if __name__ == "__main__":
    main()
