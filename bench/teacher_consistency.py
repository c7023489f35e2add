"""Teacher consistency: OPD scored by the teacher that wrote the SFT data (A) versus by another teacher (B).

    python bench/teacher_consistency.py --seeds 0 1 2 [--params params.yaml] [--set section.key=value ...] [--root runs/seeds]

The paper's key condition, tested: per seed, the whole pipeline runs with teacher A (bench/seeds.py's
run, reused when it is already done under the same --root). Then teacher B, of A's size and data but
another initialisation and data order, is trained by the `models` stage with `models.seed` and
`models.teacher_training.seed` set to seed + 1000, + 1001, ... until a candidate's held-out accuracy
is at least A's minus B_TOLERANCE (the toy teacher's accuracy varies a lot from seed to seed, and a
weaker B would confound inconsistency with teacher quality; a stronger B only works against finding
the paper's effect, so it is accepted); after B_CANDIDATES without one, the most accurate is taken.
B scores A's rollouts (the SFT student's, as for A), and OPD starts from the same SFT student on B's cache, which the `opd` stage accepts only through the explicit override
`opd.allow_teacher_mismatch: true`. `evaluate`, given B and OPD(B), measures both on the same
held-out prompts. B's stages are dvc.yaml's commands with B's params and B's own outputs
(models_B<seed>, data/teacher_cache_B, models/opd_B, metrics/eval_B.json under the seed's tree) in
place of A's, run as stage CLIs like `dvc repro` runs them, so the numbers are the pipeline's. Prints
a markdown table (accuracy per seed and the mean) and writes the same numbers, with every candidate
B tried, to <root>/teacher_consistency.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seeds import Params, load_params, means, prepare_seed, print_table, run_stages, seed_args, stage_commands  # noqa: E402

TEACHER_B_SEED_OFFSET = 1000  # far above any seed a bench run uses, so B never shares a seed with another run's A
B_TOLERANCE = 0.05
"""How much less accurate than A teacher B may be (held-out accuracy; 2.5 standard errors at 0.9 on 500 prompts)."""
B_CANDIDATES = 8
"""Candidate B seeds tried at most per seed (each is one `models` stage, about 2 minutes on 2 CPU cores)."""
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
Candidate B teachers (the `models` stage) are written to models_B<seed>."""
COLUMNS = {
    "teacher_A": "teacher A",
    "teacher_B": "teacher B",
    "sft_student": "SFT student",
    "opd_A": "OPD scored by A (consistent)",
    "opd_B": "OPD scored by B (inconsistent)",
}


def teacher_b_params(params: dict, b_seed: int) -> dict:
    """The seed's params with teacher B's seeds and the override that lets OPD train on B's cache."""
    params = json.loads(json.dumps(params))
    params["models"]["seed"] = params["models"]["teacher_training"]["seed"] = b_seed
    params.setdefault("opd", {})["allow_teacher_mismatch"] = True
    return params


def stage_outputs(stage: dict) -> list[str]:
    """A dvc.yaml stage's outs and metrics paths (an entry is a path, or a path mapped to its options)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in stage.get("outs", []) + stage.get("metrics", [])]


def _b_paths(params_a: Path, params_b: Path, out: Path, b_seed: int) -> dict[str, str]:
    """A's params and models directory -> candidate B's."""
    return {str(params_a): str(params_b), str(out / "models/base"): str(out / f"models_B{b_seed}")}


def candidate_command(commands: list[tuple[str, list[str]]], params_a: Path, params_b: Path, out: Path,
                      b_seed: int) -> tuple[str, list[str]]:
    """The `models` stage of candidate B `b_seed`: B's params, its own output directory models_B<b_seed>."""
    moved = _b_paths(params_a, params_b, out, b_seed)
    return f"models_B{b_seed}", [moved.get(arg, arg) for arg in dict(commands)["models"]]


def teacher_b_commands(commands: list[tuple[str, list[str]]], params_a: Path, params_b: Path,
                       out: Path, b_seed: int) -> list[tuple[str, list[str]]]:
    """Teacher B's stages: the pipeline's own commands for them, with B's params, B's models
    (models_B<b_seed>) and B's outputs in place of A's.

    Every path is swapped, whichever option carries it, so that e.g. OPD's refresh rounds (`--models`)
    are scored by B too; an output dvc.yaml adds to these stages must be given a B path first.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    unmapped = [path for name in B_STAGES for path in stage_outputs(stages[name]) if path not in B_OUTPUTS]
    if unmapped:
        raise RuntimeError(f"dvc.yaml's stages {B_STAGES} write {unmapped}, which teacher B's run would share with "
                           f"A's. Fix: give each a path of its own in B_OUTPUTS ({Path(__file__).name}).")
    moved = {**_b_paths(params_a, params_b, out, b_seed), **{str(out / a): str(out / b) for a, b in B_OUTPUTS.items()}}
    a = dict(commands)
    return [(f"{name}_B", [moved.get(arg, arg) for arg in a[name]]) for name in B_STAGES]


def teacher_accuracy(models_dir: Path, params_file: Path, prompts_dir: Path) -> float:
    """Held-out accuracy of the teacher in `models_dir`, as the evaluate stage measures it."""
    from pipeline import models
    from pipeline.config import load_section
    from stages import evaluate
    from stages.prompts import read_chat, read_split

    teacher = models.read_manifest(models_dir)["teacher"]["path"]
    return evaluate.accuracy(teacher, read_split(prompts_dir, "eval"), load_section("evaluate", params_file),
                             load_section("engine", params_file), read_chat(prompts_dir))["accuracy"]


def choose_teacher_b(commands: list[tuple[str, list[str]]], params_a: Path, out: Path, seed: int,
                     accuracy_a: float) -> tuple[int, dict[int, float]]:
    """Train candidate B teachers (seed + 1000, + 1001, ...) until one is at most B_TOLERANCE less accurate
    than A; return the chosen seed (the most accurate one if none is) and every candidate's accuracy.
    Candidates already trained under `out` are reused."""
    tried = {}
    for b_seed in range(seed + TEACHER_B_SEED_OFFSET, seed + TEACHER_B_SEED_OFFSET + B_CANDIDATES):
        params_b = out / f"params_B{b_seed}.yaml"
        params_b.write_text(yaml.safe_dump(teacher_b_params(yaml.safe_load(params_a.read_text()), b_seed)))
        run_stages(commands + [candidate_command(commands, params_a, params_b, out, b_seed)], out)
        tried[b_seed] = teacher_accuracy(out / f"models_B{b_seed}", params_b, out / "data/prompts")
        print(f"seed {seed}: candidate teacher B {b_seed}: accuracy {tried[b_seed]:.3f} (A: {accuracy_a:.3f})", flush=True)
        if tried[b_seed] >= accuracy_a - B_TOLERANCE:
            return b_seed, tried
    return max(tried, key=tried.get), tried


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


def run_seed(params: dict, seed: int, root: Path) -> dict:
    out, params_a = prepare_seed(params, seed, root)
    commands = stage_commands(params_a, out)
    run_stages(commands, out)
    accuracy_a = json.loads((out / "metrics" / "eval.json").read_text())["teacher"]["accuracy"]
    b_seed, tried = choose_teacher_b(commands, params_a, out, seed, accuracy_a)
    params_b = out / f"params_B{b_seed}.yaml"
    # One list, so a rerun of any of A's stages reruns B's too (they read A's SFT student and rollouts).
    run_stages(commands + [candidate_command(commands, params_a, params_b, out, b_seed)]
               + teacher_b_commands(commands, params_a, params_b, out, b_seed), out)
    return {**accuracies(out), "teacher_B_seed": b_seed, "candidates": tried}


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
        "teacher_B": f"the first of seed + {TEACHER_B_SEED_OFFSET}, + {TEACHER_B_SEED_OFFSET + 1}, ... at most "
                     f"{B_TOLERANCE} less accurate than teacher A (at most {B_CANDIDATES} tried; else the most accurate)",
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
