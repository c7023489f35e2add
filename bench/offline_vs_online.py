r"""Offline OPD, periodic refresh and standard online OPD on the embedded task: accuracy and wall time.

    python bench/offline_vs_online.py --seeds 0 1 2 [--params params.yaml] [--set section.key=value ...] \
        [--root runs/seeds] [--lrs 0.001 0.003 0.01 --sweep-seeds 100 101]

Per seed, the pipeline up to the teacher cache runs once (bench/seeds.py; its runs under the same
--root are reused). Then the opd stage runs once per setting, all with the same number of student
updates (`opd.steps`): `refresh_every` 0 (pure offline, the Lightning OPD recipe), steps / 4 (a
refresh every 25% of training) and 1 (standard online OPD); the evaluate stage scores each.

Wall time is split into rollouts, teacher scoring and training. Every setting starts from the same
round 0, so each pays the offline `rollouts` and `teacher_logprobs` stages once; the refreshes add
the rollouts and scoring times opd measures inside (models/opd_<setting>/timings.json), and
training is the rest of the opd stage's wall time (process start and loading included).

With --lrs, each setting first runs once per learning rate on each of --sweep-seeds, seeds apart from
--seeds, and keeps the lr of the highest mean sampled accuracy over them (the paper's avg@k; greedy
accuracy breaks ties); the seeds then run each setting at its own lr, so no setting is judged at an lr
picked for another, and no reported seed is one the lr was picked on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seeds import (  # noqa: E402
    load_params,
    means,
    prepare_seed,
    print_table,
    run_stages,
    seed_args,
    stage_commands,
    stage_seconds,
)
from pipeline.config import load_section  # noqa: E402

SETTINGS = {"offline": lambda steps: 0, "refresh_25": lambda steps: max(1, steps // 4), "online": lambda steps: 1}
"""Setting name -> opd.refresh_every as a function of opd.steps."""
SHARED = ("prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "control_data", "control")
"""The stages every setting shares (round 0, what it is sampled from, and the control evaluate reports beside it)."""


def run_name(params_file: Path, setting: str, lr: float | None = None) -> str:
    """What a setting's outputs are named after: the setting, and the lr where it is not the params file's."""
    return setting if lr is None or lr == load_section("opd", params_file).lr else f"{setting}_lr{lr:g}"


def setting_commands(params_file: Path, out: Path, setting: str, lr: float | None = None
                     ) -> list[tuple[str, list[str]]]:
    """The opd and evaluate commands of one setting (at `lr`, None: opd.lr): its own params file, model, rounds
    and metrics."""
    params = yaml.safe_load(params_file.read_text())
    tag = run_name(params_file, setting, lr)
    params["opd"]["refresh_every"] = SETTINGS[setting](params["opd"]["steps"])
    if lr is not None:
        params["opd"]["lr"] = lr
    setting_params = out / f"params_{tag}.yaml"
    setting_params.write_text(yaml.safe_dump(params))
    renamed = {str(out / "models/opd"): str(out / f"models/opd_{tag}"),
               str(out / "data/opd_rounds"): str(out / f"data/opd_rounds_{tag}"),
               str(out / "metrics/eval.json"): str(out / f"metrics/eval_{tag}.json"),
               str(out / "metrics/accuracy.json"): str(out / f"metrics/accuracy_{tag}.json")}
    return [(f"{name}_{tag}", [renamed.get(arg, arg) for arg in cmd])
            for name, cmd in stage_commands(setting_params, out) if name in ("opd", "evaluate")]


def setting_result(out: Path, tag: str) -> dict[str, float]:
    """Accuracy, sampled accuracy (where evaluate measured it) and wall seconds by part for one setting of one
    seed's run (`tag`: its run_name)."""
    timings = json.loads((out / f"models/opd_{tag}/timings.json").read_text())
    student = json.loads((out / f"metrics/eval_{tag}.json").read_text())["opd_student"]
    rollouts = stage_seconds(out, "rollouts") + timings["rollouts_s"]
    scoring = stage_seconds(out, "teacher_logprobs") + timings["scoring_s"]
    training = stage_seconds(out, f"opd_{tag}") - timings["rollouts_s"] - timings["scoring_s"]
    return {"accuracy": student["accuracy"], "sampled_accuracy": student.get("sampled_accuracy", student["accuracy"]),
            "rollouts_s": rollouts, "scoring_s": scoring, "training_s": training,
            "total_s": rollouts + scoring + training}


def run_seed(params: dict, seed: int, root: Path, lrs: dict[str, list[float | None]] | None = None
             ) -> dict[str, dict[float | None, dict[str, float]]]:
    """Each setting at each of its `lrs` (None: opd.lr only) on one seed: setting -> lr -> setting_result."""
    lrs = lrs or {setting: [None] for setting in SETTINGS}
    out, params_file = prepare_seed(params, seed, root)
    commands = [(name, cmd) for name, cmd in stage_commands(params_file, out) if name in SHARED]
    for setting in SETTINGS:
        for lr in lrs[setting]:
            commands += setting_commands(params_file, out, setting, lr)
    run_stages(commands, out)
    return {setting: {lr: setting_result(out, run_name(params_file, setting, lr)) for lr in lrs[setting]}
            for setting in SETTINGS}


def pick_lr(by_lr: dict[float, dict[str, float]]) -> float:
    """The lr of the highest sampled accuracy, greedy accuracy breaking ties (then the smaller lr)."""
    return max(sorted(by_lr), key=lambda lr: (by_lr[lr]["sampled_accuracy"], by_lr[lr]["accuracy"]))


def mean_runs(runs: list[dict[str, dict[float, dict[str, float]]]]) -> dict[str, dict[float, dict[str, float]]]:
    """run_seed's results of several seeds, averaged key by key."""
    return {setting: {lr: means(dict(enumerate(r[setting][lr] for r in runs)), result) for lr, result in by_lr.items()}
            for setting, by_lr in runs[0].items()}


def print_sweep(sweep: dict[str, dict[float, dict[str, float]]], picked: dict[str, float], seeds: list[int]) -> None:
    lrs = sorted({lr for by_lr in sweep.values() for lr in by_lr})
    print(f"\nlr sweep, mean of seeds {', '.join(map(str, seeds))} (accuracy / sampled accuracy):\n")
    print("| setting | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | picked lr |")
    print("| --- |" + " --- |" * (len(lrs) + 1))
    for setting, by_lr in sweep.items():
        cells = [f"{by_lr[lr]['accuracy']:.3f} / {by_lr[lr]['sampled_accuracy']:.3f}" if lr in by_lr else ""
                 for lr in lrs]
        print(f"| {setting} | " + " | ".join(cells) + f" | {picked[setting]:g} |")


def print_tables(results: dict[int, dict[str, dict[str, float]]], lrs: dict[str, float]) -> None:
    """`results`: seed -> setting -> setting_result, each setting at its lr of `lrs`."""
    for key, what in (("accuracy", "accuracy"), ("sampled_accuracy", "sampled accuracy")):
        print_table({seed: {s: r[s][key] for s in SETTINGS} for seed, r in results.items()},
                    {s: f"{s} {what}" for s in SETTINGS})
    print("\n| setting | lr | accuracy (mean) | sampled accuracy (mean) | rollouts s | teacher scoring s | "
          "training s | total s | total / offline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    mean = {s: means({seed: r[s] for seed, r in results.items()}, next(iter(results.values()))[s]) for s in SETTINGS}
    for s in SETTINGS:
        m = mean[s]
        print(f"| {s} | {lrs[s]:g} | {m['accuracy']:.3f} | {m['sampled_accuracy']:.3f} | {m['rollouts_s']:.0f} |"
              f" {m['scoring_s']:.0f} | {m['training_s']:.0f} | "
              f"{m['total_s']:.0f} | {m['total_s'] / mean['offline']['total_s']:.2f}x |")


def main(argv=None) -> None:
    args = seed_args(__doc__, argv, extra=_sweep_args)
    params = load_params(args.params)
    picked = {setting: load_section("opd", args.params).lr for setting in SETTINGS}
    sweep = {}
    if args.lrs:
        if set(args.sweep_seeds) & set(args.seeds):
            raise SystemExit(f"--sweep-seeds {sorted(set(args.sweep_seeds) & set(args.seeds))} are among --seeds: "
                             f"pick the lr on seeds that are not reported")
        sweep = mean_runs([run_seed(params, seed, args.root, {setting: args.lrs for setting in SETTINGS})
                           for seed in args.sweep_seeds])
        picked = {setting: pick_lr(by_lr) for setting, by_lr in sweep.items()}
        print_sweep(sweep, picked, args.sweep_seeds)
    results = {}
    for seed in args.seeds:
        by_lr = run_seed(params, seed, args.root, {setting: [picked[setting]] for setting in SETTINGS})
        results[seed] = {setting: runs[picked[setting]] for setting, runs in by_lr.items()}
        print(f"seed {seed}: {json.dumps(results[seed])}", flush=True)
    (args.root / "offline_vs_online.json").write_text(json.dumps(
        {"lr": picked, "sweep_seeds": args.sweep_seeds if args.lrs else [],
         "sweep": {s: {str(lr): r for lr, r in by_lr.items()} for s, by_lr in sweep.items()}, "seeds": results},
        indent=2) + "\n")
    print_tables(results, picked)


def _sweep_args(parser) -> None:
    parser.add_argument("--lrs", type=float, nargs="+", default=[],
                        help="learning rates to sweep per setting (default: none, opd.lr for every setting)")
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[100, 101],
                        help="the seeds the sweep runs on (none of --seeds)")


if __name__ == "__main__":
    main()
