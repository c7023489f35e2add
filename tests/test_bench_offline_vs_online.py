"""bench/offline_vs_online.py: each setting is the opd stage with its own refresh_every and outputs,
and its wall time is split into the parts the stages measured."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import offline_vs_online as study
from bench.seeds import prepare_seed, stage_seconds
from pipeline.config import load_section
from tests.conftest import TINY_PARAMS


def test_each_setting_runs_opd_and_evaluate_with_its_refresh_and_outputs(tmp_path):
    out, params_file = prepare_seed(yaml.safe_load(TINY_PARAMS.read_text()), 0, tmp_path)
    steps = yaml.safe_load(params_file.read_text())["opd"]["steps"]
    seen = set()
    for setting, refresh_every in study.SETTINGS.items():
        commands = dict(study.setting_commands(params_file, out, setting))
        assert list(commands) == [f"opd_{setting}", f"evaluate_{setting}"]
        opd, evaluate = commands[f"opd_{setting}"], commands[f"evaluate_{setting}"]
        params = yaml.safe_load(open(opd[opd.index("--params") + 1]))
        assert params["opd"]["refresh_every"] == refresh_every(steps)
        assert (opd[opd.index("--out") + 1] == evaluate[evaluate.index("--opd-model") + 1]
                == str(out / f"models/opd_{setting}"))
        written = {opd[opd.index("--out") + 1], opd[opd.index("--rounds") + 1], evaluate[evaluate.index("--out") + 1]}
        assert not written & seen and not written & {str(out / "models/opd"), str(out / "data/opd_rounds")}
        seen |= written
        assert opd[opd.index("--teacher-cache") + 1] == str(out / "data/teacher_cache")  # round 0 is shared


def test_a_swept_lr_gets_its_own_params_and_outputs_and_the_default_lr_keeps_the_plain_names(tmp_path):
    out, params_file = prepare_seed(yaml.safe_load(TINY_PARAMS.read_text()), 0, tmp_path)
    lr = load_section("opd", params_file).lr
    assert study.run_name(params_file, "online", lr) == study.run_name(params_file, "online") == "online"
    commands = dict(study.setting_commands(params_file, out, "online", 0.01))
    assert list(commands) == ["opd_online_lr0.01", "evaluate_online_lr0.01"]
    opd = commands["opd_online_lr0.01"]
    params = yaml.safe_load(open(opd[opd.index("--params") + 1]))
    assert params["opd"]["lr"] == 0.01 and params["opd"]["refresh_every"] == 1
    assert opd[opd.index("--out") + 1] == str(out / "models/opd_online_lr0.01")
    assert load_section("opd", params_file).lr == lr  # the seed's own params are left as they were


def test_the_picked_lr_has_the_best_sampled_accuracy_then_the_best_greedy_then_the_smaller_lr():
    def runs(*pairs):
        return {lr: {"accuracy": greedy, "sampled_accuracy": sampled} for lr, greedy, sampled in pairs}

    assert study.pick_lr(runs((0.001, 0.9, 0.5), (0.003, 0.8, 0.7), (0.01, 1.0, 0.6))) == 0.003
    assert study.pick_lr(runs((0.001, 0.9, 0.7), (0.003, 0.95, 0.7))) == 0.003
    assert study.pick_lr(runs((0.01, 0.9, 0.7), (0.001, 0.9, 0.7))) == 0.001


def test_the_sweep_seeds_may_not_be_reported_seeds(tmp_path):
    with pytest.raises(SystemExit, match=r"--sweep-seeds \[1\] are among --seeds"):
        study.main(["--seeds", "0", "1", "--lrs", "0.001", "0.003", "--sweep-seeds", "1", "7", "--root", str(tmp_path),
                    "--params", str(TINY_PARAMS)])


def test_the_sweep_averages_each_setting_and_lr_over_its_seeds():
    def run(greedy, sampled):
        return {"offline": {0.001: {"accuracy": greedy, "sampled_accuracy": sampled}}}

    mean = study.mean_runs([run(1.0, 0.5), run(0.5, 0.25)])
    assert mean == {"offline": {0.001: {"accuracy": 0.75, "sampled_accuracy": 0.375}}}


@pytest.mark.slow  # four stage processes after the shared seed run: about a minute on 2 CPU cores
def test_offline_and_online_on_tiny_params(tiny_seed_root, monkeypatch):
    monkeypatch.setattr(study, "SETTINGS", {"offline": study.SETTINGS["offline"], "online": study.SETTINGS["online"]})
    params = yaml.safe_load(TINY_PARAMS.read_text())
    results = {setting: by_lr[None] for setting, by_lr in study.run_seed(params, 0, tiny_seed_root).items()}
    out = tiny_seed_root / "seed0"
    offline, online = results["offline"], results["online"]
    rounds = json.loads((out / "data/opd_rounds_online/rounds.json").read_text())["rounds"]
    assert len(rounds) == params["opd"]["steps"]  # a refresh before every step but the first
    assert json.loads((out / "data/opd_rounds_offline/rounds.json").read_text())["refresh_every"] == 0
    assert offline["rollouts_s"] == stage_seconds(out, "rollouts")  # offline samples once, before opd
    assert online["rollouts_s"] > offline["rollouts_s"] and online["scoring_s"] > offline["scoring_s"]
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["sampled_accuracy"] <= 1
        assert r["total_s"] == pytest.approx(r["rollouts_s"] + r["scoring_s"] + r["training_s"])
        assert r["training_s"] > 0
