"""Teacher consistency: OPD scored by the teacher that wrote the SFT data (A) versus by another teacher (B).

    python bench/teacher_consistency.py --seeds 0 1 2 [--params params.yaml] [--root runs/seeds]

The paper's key condition, tested: per seed, the whole pipeline runs with teacher A (bench/seeds.py's
run, reused when it is already done under the same --root). Then teacher B is trained by the `models`
stage with `models.seed` and `models.teacher_training.seed` set to seed + 1000: the same size and data
as A, another initialisation and data order. B scores A's rollouts (the SFT student's, as for A), and
OPD starts from the same SFT student on B's cache, which the `opd` stage accepts only through the
explicit override `opd.allow_teacher_mismatch: true`. `evaluate`, given B and OPD(B), measures both on
the same held-out prompts. B's stages are dvc.yaml's commands with B's params and B's own outputs
(models_B, data/teacher_cache_B, models/opd_B, metrics/eval_B.json under the seed's tree) in place of
A's, run as stage CLIs like `dvc repro` runs them, so the numbers are the pipeline's. Prints a
markdown table (accuracy per seed and the mean) and writes the same numbers to
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

from bench.seeds import means, prepare_seed, print_table, run_stages, seed_args, stage_commands  # noqa: E402

TEACHER_B_SEED_OFFSET = 1000  # far above any seed a bench run uses, so B never shares a seed with another run's A
B_STAGES = ("models", "teacher_logprobs", "opd", "evaluate")
"""The stages run again for teacher B: B itself, its cache of A's rollouts, OPD on that cache, evaluation."""
B_OUTPUTS = {
    "models/base": "models_B",
    "data/teacher_cache": "data/teacher_cache_B",
    "data/opd_rounds": "data/opd_rounds_B",
    "models/opd": "models/opd_B",
    "metrics/eval.json": "metrics/eval_B.json",
    "metrics/accuracy.json": "metrics/accuracy_B.json",
}
"""Where B's run writes each output of those stages (dvc.yaml's paths, under the seed's tree); A's stay as they are."""
COLUMNS = {
    "teacher_A": "teacher A",
    "teacher_B": "teacher B",
    "sft_student": "SFT student",
    "opd_A": "OPD scored by A (consistent)",
    "opd_B": "OPD scored by B (inconsistent)",
}


def teacher_b_params(params: dict, seed: int) -> dict:
    """The seed's params with teacher B's seeds and the override that lets OPD train on B's cache."""
    params = json.loads(json.dumps(params))
    params["models"]["seed"] = params["models"]["teacher_training"]["seed"] = seed + TEACHER_B_SEED_OFFSET
    params.setdefault("opd", {})["allow_teacher_mismatch"] = True
    return params


def stage_outputs(stage: dict) -> list[str]:
    """A dvc.yaml stage's outs and metrics paths (an entry is a path, or a path mapped to its options)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in stage.get("outs", []) + stage.get("metrics", [])]


def teacher_b_commands(commands: list[tuple[str, list[str]]], params_a: Path, params_b: Path,
                       out: Path) -> list[tuple[str, list[str]]]:
    """Teacher B's stages: the pipeline's own commands for them, with B's params and B's outputs in place of A's.

    Every path is swapped, whichever option carries it, so that e.g. OPD's refresh rounds (`--models`)
    are scored by B too; an output dvc.yaml adds to these stages must be given a B path first.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    unmapped = [path for name in B_STAGES for path in stage_outputs(stages[name]) if path not in B_OUTPUTS]
    if unmapped:
        raise RuntimeError(f"dvc.yaml's stages {B_STAGES} write {unmapped}, which teacher B's run would share with "
                           f"A's. Fix: give each a path of its own in B_OUTPUTS ({Path(__file__).name}).")
    moved = {str(params_a): str(params_b), **{str(out / a): str(out / b) for a, b in B_OUTPUTS.items()}}
    a = dict(commands)
    return [(f"{name}_B", [moved.get(arg, arg) for arg in a[name]]) for name in B_STAGES]


def accuracies(out: Path) -> dict[str, float]:
    """The five accuracies of one seed: A's run gives teacher A, the SFT student and OPD(A); B's, the rest."""
    a = json.loads((out / "metrics" / "eval.json").read_text())
    b = json.loads((out / "metrics" / "eval_B.json").read_text())
    return {
        "teacher_A": a["teacher"]["accuracy"],
        "teacher_B": b["teacher"]["accuracy"],
        "sft_student": a["sft_student"]["accuracy"],
        "opd_A": a["opd_student"]["accuracy"],
        "opd_B": b["opd_student"]["accuracy"],
    }


def run_seed(params: dict, seed: int, root: Path) -> dict[str, float]:
    out, params_a = prepare_seed(params, seed, root)
    params_b = out / "params_B.yaml"
    params_b.write_text(yaml.safe_dump(teacher_b_params(yaml.safe_load(params_a.read_text()), seed)))
    commands = stage_commands(params_a, out)
    # One list, so a rerun of any of A's stages reruns B's too (they read A's SFT student and rollouts).
    run_stages(commands + teacher_b_commands(commands, params_a, params_b, out), out)
    return accuracies(out)


def run(params_path: Path, seeds: list[int], root: Path) -> dict:
    params = yaml.safe_load(params_path.read_text())
    results = {}
    for seed in seeds:
        start = time.perf_counter()
        results[seed] = run_seed(params, seed, root)
        print(f"seed {seed}: {results[seed]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(results, COLUMNS)
    report = {
        "params": str(params_path),
        "teacher_B_seed": f"seed + {TEACHER_B_SEED_OFFSET}",
        "seeds": results,
        "mean": means(results, COLUMNS),
    }
    (root / "teacher_consistency.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    args = seed_args(__doc__)
    run(args.params, args.seeds, args.root)


if __name__ == "__main__":
    main()
