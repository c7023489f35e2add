r"""The teacher answers the OPD prompts: the training data of the equal-compute control (stages/control.py).

    python -m stages.control_data --params params.yaml --models models/base --prompts data/prompts \
        --out data/control_sft

The sft_data stage's code and params (`sft_data`: greedy by default) on the `opd` split: the same prompts
the SFT student samples its OPD rollouts on, answered by the teacher instead.
"""

from __future__ import annotations

from stages import sft_data


def main(argv=None):
    sft_data.main(argv, doc=__doc__, split="opd", stage="control_data")


if __name__ == "__main__":
    main()
