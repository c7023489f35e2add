"""The teacher answers the SFT prompts; its responses become the student's SFT data.

    python -m stages.sft_data --params params.yaml --models models/base --prompts data/prompts --out data/sft

Responses cut at `max_new_tokens` (no end-of-sequence) are dropped: training on them would teach the
student never to stop. Shards are written atomically, so a crashed run resumes where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from data_schemas import sft_samples
from pipeline import cli, engines, models, shards
from pipeline.config import EngineConfig, SamplingConfig, load_section
from pipeline.prompts import prompts_sha256, read_chat, read_split
from pipeline.provenance import stage_provenance

log = logging.getLogger("sft_data")


def run(cfg: SamplingConfig, engine_cfg: EngineConfig, models_dir: Path, prompts_dir: Path, out: Path,
        replace_stale: bool = False, split: str = "sft", stage: str = "sft_data") -> int:
    """The teacher's answers to the prompts of `split` (stages/control_data.py reuses this on the opd split)."""
    teacher = models.read_manifest(models_dir)["teacher"]
    prompts = read_split(prompts_dir, split)
    chat = read_chat(prompts_dir)
    provenance = stage_provenance(stage, cfg, engine_cfg.name, split=split, teacher=models.identity(teacher),
                                  prompts_sha256=prompts_sha256(prompts_dir))
    dropped = 0
    tokenizer = models.load_tokenizer(teacher["path"])
    encoded = [models.encode_prompt(tokenizer, r["prompt"], chat) for r in prompts]
    models.check_prompt_lengths(prompts, encoded, "sft_data.max_new_tokens", cfg.max_new_tokens, teacher["path"],
                                prompts_dir)

    def make_table(index: int, rows: slice) -> pa.Table:
        nonlocal dropped
        chunk, prompt_ids = prompts[rows], encoded[rows]
        gens = engine.get().generate(prompt_ids, cfg, seed=cfg.seed + index)
        kept = [g for g in gens if g.finish_reason == "stop"]
        dropped += len(gens) - len(kept)
        return pa.table(
            {
                "prompt_id": [chunk[g.prompt_index]["prompt_id"] for g in kept],
                "prompt_ids": [prompt_ids[g.prompt_index] for g in kept],
                "response_ids": [g.response_ids for g in kept],
            }
        )

    with engines.LazyEngine(teacher["path"], engine_cfg) as engine:  # loaded only if a shard is missing
        written = shards.fill_shards(out, len(prompts), cfg.rows_per_shard, make_table, sft_samples, provenance,
                                     replace_stale=replace_stale)
    log.info("%s: %d shards written, %d truncated responses dropped", out, written, dropped)
    return written


def main(argv=None, doc: str = __doc__, split: str = "sft", stage: str = "sft_data"):
    args = cli.stage_args(stage, doc, argv, "models", "prompts", "out", resumable=True)
    params = args.params
    run(load_section("sft_data", params), load_section("engine", params), args.models, args.prompts, args.out,
        replace_stale=args.replace_stale, split=split, stage=args.stage)
    cli.summary(args)


if __name__ == "__main__":
    main()
