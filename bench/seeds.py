"""Run the whole pipeline (the commands of dvc.yaml, in order) for several seeds; print the accuracies.

    python bench/seeds.py --seeds 0 1 2 [--params params.yaml] [--root runs/seeds]

Each seed gets its own output tree under --root and its own params file: the given params with every
training and sampling seed set to the seed (the prompts, `task.seed`, stay fixed, so every seed is
evaluated on the same held-out prompts). Same commands as `dvc repro`, so the numbers are the
pipeline's numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SEEDED = [("models", "seed"), ("sft", "seed"), ("rollouts", "seed"), ("opd", "seed")]
OUTPUT_PREFIXES = ("data/", "models/", "metrics/")


def seeded_params(params: dict, seed: int) -> dict:
    params = json.loads(json.dumps(params))
    for section, key in SEEDED:
        params.setdefault(section, {})[key] = seed
    params["models"].setdefault("teacher_training", {})["seed"] = seed
    return params


def stage_commands(params_file: Path, out: Path) -> list[tuple[str, list[str]]]:
    """dvc.yaml's commands, with the params file and every data/models/metrics path moved under `out`."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = []
    for name, stage in stages.items():
        args = []
        for arg in shlex.split(stage["cmd"]):
            if arg == "params.yaml":
                arg = str(params_file)
            elif arg.startswith(OUTPUT_PREFIXES):
                arg = str(out / arg)
            args.append(arg)
        commands.append((name, [sys.executable if args[0] == "python" else args[0], *args[1:]]))
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "seeds")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        out = args.root / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        params_file = out / "params.yaml"
        params_file.write_text(yaml.safe_dump(seeded_params(yaml.safe_load(args.params.read_text()), seed)))
        start = time.perf_counter()
        for name, cmd in stage_commands(params_file, out):
            with open(out / f"{name}.log", "w") as log:
                subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        metrics = json.loads((out / "metrics" / "eval.json").read_text())
        results[seed] = {role: metrics[role]["accuracy"] for role in ("teacher", "sft_student", "opd_student")}
        print(f"seed {seed}: {results[seed]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| seed | teacher | SFT student | OPD student |\n| --- | --- | --- | --- |")
    for seed, r in results.items():
        print(f"| {seed} | {r['teacher']:.3f} | {r['sft_student']:.3f} | {r['opd_student']:.3f} |")
    mean = {role: statistics.mean(r[role] for r in results.values()) for role in ("teacher", "sft_student", "opd_student")}
    print(f"| mean | {mean['teacher']:.3f} | {mean['sft_student']:.3f} | {mean['opd_student']:.3f} |")


if __name__ == "__main__":
    main()
