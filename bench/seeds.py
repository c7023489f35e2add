"""Run the whole pipeline (the commands of dvc.yaml, in order) for several seeds; print the accuracies.

    python bench/seeds.py --seeds 0 1 2 3 4 [--params params.yaml] [--set section.key=value ...] [--root runs/seeds]

Each seed gets its own output tree under --root and its own params file: the given params with every
training and sampling seed set to the seed (the prompts, `task.seed`, stay fixed, so every seed is
evaluated on the same held-out prompts). Same commands as `dvc repro`, so the numbers are the
pipeline's numbers.

A stage that finished is marked in <root>/seed<N>/.done/<stage> with its command line, the sha256
of the params sections it reads, a digest of the stages before it and its wall time; a rerun skips the stages
whose mark still matches, so other bench scripts (bench/teacher_consistency.py) reuse a seed's run
under the same --root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cli import stage_sections  # noqa: E402
from pipeline.config import Params, load_params  # noqa: E402

SEEDED = [("models", "seed"), ("sft", "seed"), ("rollouts", "seed"), ("opd", "seed")]
OUTPUT_PREFIXES = ("data/", "models/", "metrics/")
COLUMNS = {"teacher": "teacher", "sft_student": "SFT student", "control": "control (SFT, OPD's steps)",
           "opd_student": "OPD student"}
"""Roles of metrics/eval.json, and their column headings."""


def seed_result(metrics: dict) -> dict[str, float]:
    """One seed's columns from its metrics/eval.json: each role's accuracy, and `<role>_sampled`, its
    sampled_accuracy (evaluate.sampled_n), where measured."""
    result = {role: metrics[role]["accuracy"] for role in COLUMNS}
    result.update({f"{role}_sampled": metrics[role]["sampled_accuracy"] for role in COLUMNS
                   if "sampled_accuracy" in metrics[role]})
    return result


def columns_of(results: dict[int, dict[str, float]]) -> dict[str, str]:
    """COLUMNS, then the sampled ones where every seed has them."""
    sampled = {f"{role}_sampled": f"{name}, sampled" for role, name in COLUMNS.items()
               if all(f"{role}_sampled" in r for r in results.values())}
    return {**COLUMNS, **sampled}


def seeded_params(params: dict, seed: int) -> dict:
    params = json.loads(json.dumps(params))
    for section, key in SEEDED:
        params.setdefault(section, {})[key] = seed
    params["models"].setdefault("teacher_training", {})["seed"] = seed
    return params


def prepare_seed(params: dict, seed: int, root: Path) -> tuple[Path, Path]:
    """The seed's output tree, root/seed<N>, and its params file written there (`params`, seeded)."""
    out = root.resolve() / f"seed{seed}"  # absolute: the stages run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump(seeded_params(params, seed)))
    return out, params_file


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


def stage_key(cmd: list[str], upstream: str) -> dict:
    """What a finished stage's marker must hold for it to be skipped: its command line, the params
    sections it reads (dvc.yaml's `params` of its stage, as `dvc repro` tracks them) and the stages
    before it; any change may make its outputs stale."""
    params = yaml.safe_load(Path(cmd[cmd.index("--params") + 1]).read_text())
    module = cmd[cmd.index("-m") + 1] if "-m" in cmd else ""
    sections = stage_sections(module.removeprefix("stages.")) if module else []  # none: not a stage, all of it
    read = {section: params.get(section) for section in sections} if sections else params
    return {"command": shlex.join(cmd),
            "params_sha256": hashlib.sha256(json.dumps(read, sort_keys=True).encode()).hexdigest(),
            "upstream": upstream}


def _marked_key(marker: Path) -> dict | None:
    try:
        return {k: v for k, v in json.loads(marker.read_text()).items() if k != "seconds"}
    except (FileNotFoundError, ValueError):  # never finished, or cut short while written: not done
        return None


def run_stages(commands: list[tuple[str, list[str]]], out: Path) -> list[str]:
    """Run `commands` in order from the repository root, each logging to out/<name>.log; return the names run.

    A finished stage is marked in out/.done/<name> (its stage_key and wall seconds). It is skipped when
    the mark matches its command, params and the stages before it (so a stage changed in an earlier
    run invalidates the later ones); once one stage runs, every later one runs too, since its inputs
    were rewritten.
    """
    done = out / ".done"
    done.mkdir(parents=True, exist_ok=True)
    upstream, ran = "", []
    for name, cmd in commands:
        key, marker = stage_key(cmd, upstream), done / name
        if ran or _marked_key(marker) != key:
            marker.unlink(missing_ok=True)  # a stage that fails part-way must not look done next time
            start = time.perf_counter()
            with open(out / f"{name}.log", "w") as log:
                subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
            marker.write_text(json.dumps({**key, "seconds": round(time.perf_counter() - start, 3)}, indent=2) + "\n")
            ran.append(name)
        upstream = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return ran


def stage_seconds(out: Path, name: str) -> float:
    """Wall seconds of the stage's last completed run under `out` (process start included)."""
    return json.loads((out / ".done" / name).read_text())["seconds"]


def means(results: dict[int, dict[str, float]], keys) -> dict[str, float]:
    return {key: statistics.mean(r[key] for r in results.values()) for key in keys}


def stds(results: dict[int, dict[str, float]], keys) -> dict[str, float]:
    """Sample standard deviation over the seeds (0 for one seed)."""
    return {key: statistics.stdev([r[key] for r in results.values()]) if len(results) > 1 else 0.0 for key in keys}


def print_table(results: dict[int, dict[str, float]], columns: dict[str, str]) -> None:
    """A markdown table: one row per seed, one column per key of `columns` (key: heading), and mean +- std."""
    print("\n| seed | " + " | ".join(columns.values()) + " |\n| --- |" + " --- |" * len(columns))
    for seed, r in results.items():
        print(f"| {seed} | " + " | ".join(f"{r[key]:.3f}" for key in columns) + " |")
    mean, std = means(results, columns), stds(results, columns)
    print("| mean +- std | " + " | ".join(f"{mean[key]:.3f} +- {std[key]:.3f}" for key in columns) + " |")


def seed_args(doc: str, argv=None, extra=None) -> argparse.Namespace:
    """The command line of the bench scripts that run the pipeline per seed (the first line of `doc` is their help;
    `extra(parser)` adds a script's own arguments)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the params file, as for a stage (repeatable)")
    args = parser.parse_args(argv)
    args.params = Params(args.params, tuple(args.overrides))
    return args


def main() -> None:
    args = seed_args(__doc__)
    params = load_params(args.params)
    results = {}
    for seed in args.seeds:
        out, params_file = prepare_seed(params, seed, args.root)
        start = time.perf_counter()
        run_stages(stage_commands(params_file, out), out)
        results[seed] = seed_result(json.loads((out / "metrics" / "eval.json").read_text()))
        print(f"seed {seed}: {results[seed]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(results, columns_of(results))
    (args.root / "seeds.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
