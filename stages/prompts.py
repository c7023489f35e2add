"""Write the task's prompts: disjoint splits for teacher training, SFT, OPD and evaluation.

    python -m stages.prompts --params params.yaml --out data/prompts

Prompts come from the embedded toy task (pipeline/toy_task.py); each has its reference answer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pyarrow as pa

from data_schemas import prompts as prompts_schema
from pipeline import cli, shards, toy_task
from pipeline.config import TaskConfig, load_section

log = logging.getLogger("prompts")
SPLITS = ("teacher_train", "sft", "opd", "eval")


def prompt_id(prompt: str) -> str:
    """Content-addressed, so the same prompt has the same id in every run and split."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def run(task: TaskConfig, out: Path) -> Path:
    counts = {
        "teacher_train": task.teacher_train_prompts,
        "sft": task.sft_prompts,
        "opd": task.opd_prompts,
        "eval": task.eval_prompts,
    }
    examples = toy_task.make_examples(sum(counts.values()), task.n_digits, task.seed)
    splits = [split for split in SPLITS for _ in range(counts[split])]
    table = pa.table(
        {
            "prompt_id": [prompt_id(p) for p, _ in examples],
            "prompt": [p for p, _ in examples],
            "answer": [a for _, a in examples],
            "split": splits,
        }
    )
    provenance = {"stage": "prompts", "task": "toy_addition", "config": vars(task)}
    shards.fill_shards(out, 1, 1, lambda i, rows: table, prompts_schema, provenance)
    log.info("%s: %s prompts", out, ", ".join(f"{counts[s]} {s}" for s in SPLITS))
    return out


def read_split(prompts_dir: Path, split: str) -> list[dict]:
    """The rows of one split, in file order, as dicts."""
    table, _ = shards.read_shards(prompts_dir, prompts_schema)
    rows = [r for r in table.to_pylist() if r["split"] == split]
    if not rows:
        raise ValueError(f"{prompts_dir}: no prompts in split {split!r}; check the task section of params.yaml")
    return rows


def main(argv=None):
    args = cli.stage_args(__doc__, argv, "out")
    run(load_section("task", args.params), args.out)


if __name__ == "__main__":
    main()
