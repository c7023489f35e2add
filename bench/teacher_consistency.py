r"""Teacher consistency: OPD scored by the teacher that wrote the SFT data (A) versus by another teacher (B).

    python bench/teacher_consistency.py --seeds 0 1 2 3 4 [--params params.yaml] [--set section.key=value ...] \
        [--root runs/seeds]

The paper's key condition, tested: per seed, the whole pipeline runs with teacher A (bench/seeds.py's
run, reused when it is already done under the same --root). Teacher B is trained by the `models` stage
as A (same size, data, seeds and steps; its own lr, B_LR) but on the toy task's other valid notation
(`models.teacher_style`: units_first where A writes carry_first): two equally able teachers that prefer
different ways of writing a correct answer. B scores A's rollouts (the SFT student's, which are in A's
style), and OPD starts from the same SFT student on B's cache, which the `opd` stage accepts only
through the explicit override `opd.allow_teacher_mismatch: true`. `evaluate`, given B and OPD(B),
measures both on the same held-out prompts. B's stages are dvc.yaml's commands with B's params and B's
own outputs (models_B, data/teacher_cache_B, models/opd_B, metrics/eval_B.json under the seed's tree)
in place of A's, run as stage CLIs like `dvc repro` runs them, so the numbers are the pipeline's.

The mechanism, from the data: the mean teacher log-prob of the sampled tokens of A's rollouts, in A's
cache and in B's (B finds A's style unlikely, so its scores pull the student away from the style it
learnt). Prints a markdown table (per seed, mean +- std) and writes the numbers to
<root>/teacher_consistency.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seeds import (  # noqa: E402
    Params,
    load_params,
    means,
    prepare_seed,
    print_table,
    run_stages,
    seed_args,
    stage_commands,
    stds,
)

B_STAGES = ("teacher_logprobs", "opd", "evaluate")
"""The stages run again with teacher B, once it is chosen: its cache of A's rollouts, OPD on that cache, evaluation."""
B_OUTPUTS = {
    "data/teacher_cache": "data/teacher_cache_B",
    "data/opd_rounds": "data/opd_rounds_B",
    "models/opd": "models/opd_B",
    "metrics/eval.json": "metrics/eval_B.json",
    "metrics/accuracy.json": "metrics/accuracy_B.json",
}
"""Where B's run writes each output of those stages (dvc.yaml's paths, under the seed's tree); A's stay as they are.
Teacher B itself (the `models` stage) is written to models_B."""
COLUMNS = {
    "teacher_A": "teacher A",
    "teacher_B": "teacher B",
    "sft_student": "SFT student",
    "opd_A": "OPD scored by A (consistent)",
    "opd_B": "OPD scored by B (inconsistent)",
    "logprob_A": "A's mean log-prob of A-style rollouts",
    "logprob_B": "B's mean log-prob of A-style rollouts",
}
OTHER_STYLE = {"carry_first": "units_first", "units_first": "carry_first"}
B_LR = 0.001
"""Teacher B's learning rate (`models.teacher_training.lr`; everything else as A's). B's notation writes the units
digit, a sum mod 10, before the carry: at A's lr 0.003 its loss stalled on a plateau in two seeds of five (seed 3
near 0.13 from step 600 to the end, accuracy 0.088), at 0.001 it fell below 0.001 by step 700 in both."""


def teacher_b_params(params: dict) -> dict:
    """The seed's params with teacher B's style and lr (B_LR), and the override that lets OPD train on B's cache."""
    params = json.loads(json.dumps(params))
    models = params.setdefault("models", {})
    models["teacher_style"] = OTHER_STYLE[models.get("teacher_style", "carry_first")]
    models.setdefault("teacher_training", {})["lr"] = B_LR
    params.setdefault("opd", {})["allow_teacher_mismatch"] = True
    return params


def stage_outputs(stage: dict) -> list[str]:
    """A dvc.yaml stage's outs and metrics paths (an entry is a path, or a path mapped to its options)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in stage.get("outs", []) + stage.get("metrics", [])]


def _b_paths(params_a: Path, params_b: Path, out: Path) -> dict[str, str]:
    """A's params and models directory -> B's."""
    return {str(params_a): str(params_b), str(out / "models/base"): str(out / "models_B")}


def teacher_b_commands(commands: list[tuple[str, list[str]]], params_a: Path, params_b: Path,
                       out: Path) -> list[tuple[str, list[str]]]:
    """Teacher B's stages: the `models` stage that trains B (into models_B), then the pipeline's own commands
    for B_STAGES, with B's params, B's models and B's outputs in place of A's.

    Every path is swapped, whichever option carries it, so that e.g. OPD's refresh rounds (`--models`)
    are scored by B too; an output dvc.yaml adds to these stages must be given a B path first.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    unmapped = [path for name in B_STAGES for path in stage_outputs(stages[name]) if path not in B_OUTPUTS]
    if unmapped:
        raise RuntimeError(f"dvc.yaml's stages {B_STAGES} write {unmapped}, which teacher B's run would share with "
                           f"A's. Fix: give each a path of its own in B_OUTPUTS ({Path(__file__).name}).")
    moved = {**_b_paths(params_a, params_b, out), **{str(out / a): str(out / b) for a, b in B_OUTPUTS.items()}}
    a = dict(commands)
    return [(f"{name}_B", [moved.get(arg, arg) for arg in a[name]]) for name in ("models", *B_STAGES)]


def mean_teacher_logprob(cache_dir: Path) -> float:
    """The mean log-prob a cache's teacher gives the sampled tokens of its rollouts (polars over every shard)."""
    import polars as pl

    frame = pl.scan_parquet(str(cache_dir / "part-*.parquet")).select(pl.col("teacher_token_logprobs").explode())
    return float(frame.mean().collect().item())


def accuracies(out: Path) -> dict[str, float]:
    """One seed's accuracies (A's run gives teacher A, the SFT student and OPD(A); B's, the rest) and the two
    teachers' mean log-prob of the rollouts."""
    a = json.loads((out / "metrics" / "eval.json").read_text())
    b = json.loads((out / "metrics" / "eval_B.json").read_text())
    return {
        "teacher_A": a["teacher"]["accuracy"],
        "teacher_B": b["teacher"]["accuracy"],
        "sft_student": a["sft_student"]["accuracy"],
        "opd_A": a["opd_student"]["accuracy"],
        "opd_B": b["opd_student"]["accuracy"],
        "logprob_A": mean_teacher_logprob(out / "data/teacher_cache"),
        "logprob_B": mean_teacher_logprob(out / B_OUTPUTS["data/teacher_cache"]),
    }


def run_seed(params: dict, seed: int, root: Path) -> dict:
    out, params_a = prepare_seed(params, seed, root)
    commands = stage_commands(params_a, out)
    params_b = out / "params_B.yaml"
    params_b.write_text(yaml.safe_dump(teacher_b_params(yaml.safe_load(params_a.read_text()))))
    # One list, so a rerun of any of A's stages reruns B's too (they read A's SFT student and rollouts).
    run_stages(commands + teacher_b_commands(commands, params_a, params_b, out), out)
    return accuracies(out)


def run(params_path: Path | Params, seeds: list[int], root: Path) -> dict:
    params = load_params(params_path)
    results = {}
    for seed in seeds:
        start = time.perf_counter()
        results[seed] = run_seed(params, seed, root)
        print(f"seed {seed}: {results[seed]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(results, COLUMNS)
    report = {
        "params": str(params_path),
        "teacher_B": "teacher A's training in the other notation (models.teacher_style)",
        "seeds": results,
        "mean": means(results, COLUMNS),
        "std": stds(results, COLUMNS),
    }
    (root / "teacher_consistency.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    args = seed_args(__doc__)
    run(args.params, args.seeds, args.root)


if __name__ == "__main__":
    main()
