"""Fine-tune the student on the teacher's SFT data (cross-entropy on response tokens).

    python -m stages.sft --params params.yaml --models models/base --sft-data data/sft --out models/sft
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_schemas import sft_samples
from pipeline import cli, data, models, shards, training
from pipeline.config import TrainConfig, load_section

log = logging.getLogger("sft")


def run(cfg: TrainConfig, models_dir: Path | None, sft_data: Path, out: Path, student: dict | None = None,
        stage: str = "sft") -> Path:
    """Train `student` (default: the manifest's student under `models_dir`; stages/control.py passes the SFT
    student) on the SFT data in `sft_data`, and save it to `out`."""
    student = student or models.read_manifest(models_dir)["student"]
    table, data_provenance = shards.read_shards(sft_data, sft_samples)
    model = models.load_model(student["path"])
    tokenizer = models.load_tokenizer(student["path"])
    rows = table.select(["prompt_ids", "response_ids"]).to_pylist()
    batches = data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
    training.train(model, batches, cfg, out / "logs", checkpoint_dir=training.checkpoint_dir_for(out),
                   fingerprint=training.inputs_fingerprint(cfg, student["weights_sha256"], [sft_data]))
    models.save_model(model, tokenizer, out)
    models.write_provenance(
        out,
        {
            "stage": stage,
            "base": models.identity(student),
            "sft_data_teacher": data_provenance.get("teacher"),  # null: a teacher per domain (models.teachers)
            **({"sft_data_teachers": data_provenance["teachers"]} if "teachers" in data_provenance else {}),
            "config": vars(cfg),
        },
    )
    log.info("%s: SFT student trained on %d samples for %d steps", out, len(rows), cfg.steps)
    return out


def main(argv=None):
    args = cli.stage_args("sft", __doc__, argv, "models", "sft_data", "out")
    cfg = load_section("sft", args.params)
    run(cfg, args.models, args.sft_data, args.out)
    cli.summary(args, f"{cfg.steps:,} steps")


if __name__ == "__main__":
    main()
