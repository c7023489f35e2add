r"""Offline OPD, periodic refresh and standard online OPD on the embedded task: accuracy and wall time.

    python bench/offline_vs_online.py --seeds 0 1 2 [--params params.yaml] [--set section.key=value ...] \
        [--root runs/seeds]

Per seed, the pipeline up to the teacher cache runs once (bench/seeds.py; its runs under the same
--root are reused). Then the opd stage runs once per setting, all with the same number of student
updates (`opd.steps`): `refresh_every` 0 (pure offline, the Lightning OPD recipe), steps / 4 (a
refresh every 25% of training) and 1 (standard online OPD); the evaluate stage scores each.

Wall time is split into rollouts, teacher scoring and training. Every setting starts from the same
round 0, so each pays the offline `rollouts` and `teacher_logprobs` stages once; the refreshes add
the rollouts and scoring times opd measures inside (models/opd_<setting>/timings.json), and
training is the rest of the opd stage's wall time (process start and loading included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seeds import load_params, prepare_seed, print_table, run_stages, seed_args, stage_commands, stage_seconds  # noqa: E402

SETTINGS = {"offline": lambda steps: 0, "refresh_25": lambda steps: max(1, steps // 4), "online": lambda steps: 1}
"""Setting name -> opd.refresh_every as a function of opd.steps."""
SHARED = ("prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "control_data", "control")
"""The stages every setting shares (round 0, what it is sampled from, and the control evaluate reports beside it)."""


def setting_commands(params_file: Path, out: Path, setting: str) -> list[tuple[str, list[str]]]:
    """The opd and evaluate commands of one setting: its own params file, model, rounds and metrics."""
    params = yaml.safe_load(params_file.read_text())
    params["opd"]["refresh_every"] = SETTINGS[setting](params["opd"]["steps"])
    setting_params = out / f"params_{setting}.yaml"
    setting_params.write_text(yaml.safe_dump(params))
    renamed = {str(out / "models/opd"): str(out / f"models/opd_{setting}"),
               str(out / "data/opd_rounds"): str(out / f"data/opd_rounds_{setting}"),
               str(out / "metrics/eval.json"): str(out / f"metrics/eval_{setting}.json"),
               str(out / "metrics/accuracy.json"): str(out / f"metrics/accuracy_{setting}.json")}
    return [(f"{name}_{setting}", [renamed.get(arg, arg) for arg in cmd])
            for name, cmd in stage_commands(setting_params, out) if name in ("opd", "evaluate")]


def setting_result(out: Path, setting: str) -> dict[str, float]:
    """Accuracy and wall seconds by part for one setting of one seed's run."""
    timings = json.loads((out / f"models/opd_{setting}/timings.json").read_text())
    accuracy = json.loads((out / f"metrics/eval_{setting}.json").read_text())["opd_student"]["accuracy"]
    rollouts = stage_seconds(out, "rollouts") + timings["rollouts_s"]
    scoring = stage_seconds(out, "teacher_logprobs") + timings["scoring_s"]
    training = stage_seconds(out, f"opd_{setting}") - timings["rollouts_s"] - timings["scoring_s"]
    return {"accuracy": accuracy, "rollouts_s": rollouts, "scoring_s": scoring, "training_s": training,
            "total_s": rollouts + scoring + training}


def run_seed(params: dict, seed: int, root: Path) -> dict[str, dict[str, float]]:
    out, params_file = prepare_seed(params, seed, root)
    commands = [(name, cmd) for name, cmd in stage_commands(params_file, out) if name in SHARED]
    for setting in SETTINGS:
        commands += setting_commands(params_file, out, setting)
    run_stages(commands, out)
    return {setting: setting_result(out, setting) for setting in SETTINGS}


def print_tables(results: dict[int, dict[str, dict[str, float]]]) -> None:
    print_table({seed: {s: r[s]["accuracy"] for s in SETTINGS} for seed, r in results.items()},
                {s: f"{s} accuracy" for s in SETTINGS})
    print("\n| setting | accuracy (mean) | rollouts s | teacher scoring s | training s | total s | total / offline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mean = {s: {key: sum(r[s][key] for r in results.values()) / len(results) for key in results[next(iter(results))][s]}
            for s in SETTINGS}
    for s in SETTINGS:
        m = mean[s]
        print(f"| {s} | {m['accuracy']:.3f} | {m['rollouts_s']:.0f} | {m['scoring_s']:.0f} | {m['training_s']:.0f} | "
              f"{m['total_s']:.0f} | {m['total_s'] / mean['offline']['total_s']:.2f}x |")


def main(argv=None) -> None:
    args = seed_args(__doc__, argv)
    params = load_params(args.params)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(params, seed, args.root)
        print(f"seed {seed}: {json.dumps(results[seed])}", flush=True)
    (args.root / "offline_vs_online.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)


if __name__ == "__main__":
    main()
