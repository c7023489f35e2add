r"""The equal-compute control: the SFT student trained further on the teacher's answers to the OPD prompts.

    python -m stages.control --params params.yaml --sft-model models/sft --control-data data/control_sft \
        --out models/control

Cross-entropy on the teacher's answers (stages/control_data.py) with the training settings of the `opd`
section (steps, batch size, learning rate and schedule, seed): as many updates of as many sequences as
OPD makes, from the same start. OPD beating the SFT student may only mean that more steps beat fewer;
OPD beating this control means that training on the student's own samples against the teacher's
scores beats training on the teacher's answers.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import cli, models
from pipeline.config import OpdConfig, load_section
from stages import sft


def run(opd_cfg: OpdConfig, sft_model: Path, control_data: Path, out: Path) -> Path:
    student = models.describe("sft-student", Path(sft_model))
    return sft.run(opd_cfg.training(), None, control_data, out, student=student, stage="control")


def main(argv=None):
    args = cli.stage_args("control", __doc__, argv, "sft_model", "control_data", "out")
    cfg = load_section("opd", args.params)
    run(cfg, args.sft_model, args.control_data, args.out)
    cli.summary(args, f"{cfg.steps:,} steps")


if __name__ == "__main__":
    main()
