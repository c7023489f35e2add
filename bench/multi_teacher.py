r"""Multi-teacher distillation: one student distilled from a specialist teacher per domain, against the student
distilled from either specialist alone, evaluated on both domains.

    python bench/multi_teacher.py --seeds 0 1 2 3 4 [--params params.yaml] [--set section.key=value ...] \
        [--root runs/multi_teacher] [--arms both add_alone sub_alone]

The toy task with two domains (`task.domains: [add, sub]`: long addition and long subtraction, each with the
split sizes of the `task` section), with the study's recipe (study_steps: twice the params' teacher, SFT and
OPD steps; a --set overrides them). Per seed and arm, the whole pipeline (bench/seeds.py's run: dvc.yaml's
commands under <root>/<arm>/seed<N>, finished stages reused) with `models.teachers` set by the arm:

- `both`: each domain's own specialist (a toy teacher trained on that domain's teacher_train prompts only)
  writes its SFT data and scores its rollouts;
- `add_alone`, `sub_alone`: one specialist (add's, or sub's) serves both domains. When `both` runs too (first,
  per seed), these arms read its specialists' model directories rather than train the same weights again.

Every arm trains the same student on the same prompts with the same steps; only the teachers differ (a
specialist is trained exactly alike in every arm it is in). `evaluate` scores every model on each domain's
held-out prompts (the teacher column: each domain's teacher on its own domain). Prints a table per arm (per
seed, mean +- std) and a summary of the OPD student per arm, and writes the numbers to
<root>/multi_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
from pipeline.config import load_section  # noqa: E402

DOMAINS = ["add", "sub"]
ARMS = {
    "both": {"add": "toy", "sub": "toy"},
    "add_alone": {"add": "toy:add", "sub": "toy:add"},
    "sub_alone": {"add": "toy:sub", "sub": "toy:sub"},
}
"""models.teachers of each arm: each domain's specialist, or one specialist serving both domains."""
ROLES = {"teacher": "teacher", "sft_student": "SFT", "control": "control", "opd_student": "OPD"}
"""Roles of metrics/eval.json and their short headings."""
COLUMNS = {f"{role}_{part}": f"{name} {part}" for role, name in ROLES.items() for part in (*DOMAINS, "all")}
"""One arm's columns: each role's greedy accuracy on each domain and on both (`all`)."""


def arm_params(params: dict, arm: str, specialists: Path | None = None) -> dict:
    """The study's params for `arm`: both domains, and the arm's teachers. `specialists`: the models stage's output
    of this seed's `both` arm, whose specialist `toy:<domain>` stands for (the same weights, not trained again)."""
    params = json.loads(json.dumps(params))
    params.setdefault("task", {})["domains"] = DOMAINS
    teachers = dict(ARMS[arm])
    if specialists is not None and arm != "both":
        teachers = {d: str(specialists / f"teacher-{t.removeprefix('toy:')}") for d, t in teachers.items()}
    params.setdefault("models", {})["teachers"] = teachers
    return params


def seed_result(metrics: dict) -> dict[str, float]:
    """One arm's columns from a seed's metrics/eval.json."""
    result = {}
    for role in ROLES:
        result[f"{role}_all"] = metrics[role]["accuracy"]
        result.update({f"{role}_{domain}": metrics[role]["domains"][domain]["accuracy"] for domain in DOMAINS})
    return result


def run(params_path: Path | Params, seeds: list[int], root: Path, arms: list[str] | None = None) -> dict:
    params = load_params(params_path)
    arms = arms or list(ARMS)
    results: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in arms}
    seconds: dict[str, dict[int, float]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            specialists = root.resolve() / "both" / f"seed{seed}" / "models" / "base"
            reuse = specialists if "both" in arms and (specialists / "manifest.json").exists() else None
            out, params_file = prepare_seed(arm_params(params, arm, reuse), seed, root / arm)
            start = time.perf_counter()
            run_stages(stage_commands(params_file, out), out)
            seconds[arm][seed] = round(time.perf_counter() - start, 1)
            results[arm][seed] = seed_result(json.loads((out / "metrics" / "eval.json").read_text()))
            print(f"seed {seed}, {arm}: {results[arm][seed]} ({seconds[arm][seed]:.0f} s)", flush=True)
    for arm in arms:
        print(f"\n{arm} (models.teachers: {ARMS[arm]})")
        print_table(results[arm], {key: COLUMNS[key] for key in COLUMNS})
    summary = {arm: {"mean": means(results[arm], COLUMNS), "std": stds(results[arm], COLUMNS)} for arm in arms}
    opd = [f"opd_student_{part}" for part in (*DOMAINS, "all")]
    print("\n| arm | " + " | ".join(COLUMNS[key] for key in opd) + " |\n| --- |" + " --- |" * len(opd))
    for arm in arms:
        print(f"| {arm} | " + " | ".join(f"{summary[arm]['mean'][key]:.3f} +- {summary[arm]['std'][key]:.3f}"
                                         for key in opd) + " |")
    report = {"params": str(params_path), "arms": {arm: ARMS[arm] for arm in arms}, "seeds": results,
              "summary": summary, "seconds": seconds}
    root.mkdir(parents=True, exist_ok=True)
    (root / "multi_teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def study_steps(params_path: Path) -> list[str]:
    """--set overrides that double the teacher's, SFT's and OPD's steps of the params file, applied before those of the
    command line (which win): two domains are twice the task. With the single-domain steps, seed 0's sub specialist
    reached 0.510, the SFT student 0.000 on both domains and the OPD student 0.008 (control 0.411): nothing to
    compare."""
    models_cfg, sft_cfg, opd_cfg = (load_section(name, params_path) for name in ("models", "sft", "opd"))
    return [f"models.teacher_training.steps={2 * models_cfg.teacher_training.steps}", f"sft.steps={2 * sft_cfg.steps}",
            f"opd.steps={2 * opd_cfg.steps}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    known, rest = parser.parse_known_args(argv)
    args = seed_args(__doc__, rest)
    args.params = Params(args.params.path, (*study_steps(args.params.path), *args.params.overrides))
    if args.root == ROOT / "runs" / "seeds":  # seed_args' default: the single-domain runs live there
        args.root = ROOT / "runs" / "multi_teacher"
    run(args.params, args.seeds, args.root, known.arms)


if __name__ == "__main__":
    main()
