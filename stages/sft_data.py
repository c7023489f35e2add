"""The teacher answers the SFT prompts; its responses become the student's SFT data.

    python -m stages.sft_data --params params.yaml --models models/base --prompts data/prompts --out data/sft

Responses cut at `max_new_tokens` (no end-of-sequence) are dropped: training on them would teach the
student never to stop. With `models.teachers` each prompt is answered by its domain's teacher (each teacher
loaded when a shard first needs it, and kept until the end), and the provenance records the teacher of each
domain (`teachers`) in place of the one `teacher`. Shards are written atomically, so a crashed run resumes
where it stopped.
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
    teachers = models.domain_teachers(models.read_manifest(models_dir))
    prompts = read_split(prompts_dir, split)
    chat = read_chat(prompts_dir)
    # one teacher: recorded as always; several: the teacher of each domain, which the opd stage checks per domain
    recorded = ({"teacher": models.identity(teachers[None])} if None in teachers else
                {"teachers": {domain: models.identity(teacher) for domain, teacher in teachers.items()}})
    provenance = stage_provenance(stage, cfg, engine_cfg.name, split=split, **recorded,
                                  prompts_sha256=prompts_sha256(prompts_dir))
    dropped = 0
    served = [models.teacher_for(teachers, r["domain"], prompts_dir) for r in prompts]
    by_teacher = engines.groups([teacher["path"] for teacher in served])
    encoded = [None] * len(prompts)
    for path, rows in by_teacher.items():
        tokenizer = models.load_tokenizer(path)
        for row in rows:
            encoded[row] = models.encode_prompt(tokenizer, prompts[row]["prompt"], chat)
        models.check_prompt_lengths([prompts[row] for row in rows], [encoded[row] for row in rows],
                                    "sft_data.max_new_tokens", cfg.max_new_tokens, path, prompts_dir)

    def make_table(index: int, rows: slice) -> pa.Table:
        nonlocal dropped
        chunk, prompt_ids = prompts[rows], encoded[rows]
        kept = []
        for path, members in engines.groups([teacher["path"] for teacher in served[rows]]).items():
            gens = teachers_engines.get(path).generate([prompt_ids[i] for i in members], cfg, seed=cfg.seed + index)
            dropped += sum(g.finish_reason != "stop" for g in gens)
            kept += [(members[g.prompt_index], g) for g in gens if g.finish_reason == "stop"]
        return pa.table(
            {
                "prompt_id": [chunk[i]["prompt_id"] for i, _ in kept],
                "prompt_ids": [prompt_ids[i] for i, _ in kept],
                "response_ids": [g.response_ids for _, g in kept],
            }
        )

    with engines.LazyEngines(engine_cfg) as teachers_engines:  # each loaded only if a shard needs it
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
