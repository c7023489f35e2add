"""bench/offline_vs_online.py: each setting is the opd stage with its own refresh_every and outputs,
and its wall time is split into the parts the stages measured."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import offline_vs_online as study
from bench.seeds import prepare_seed, stage_seconds
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


@pytest.mark.slow  # four stage processes after the shared seed run: about a minute on 2 CPU cores
def test_offline_and_online_on_tiny_params(tiny_seed_root, monkeypatch):
    monkeypatch.setattr(study, "SETTINGS", {"offline": study.SETTINGS["offline"], "online": study.SETTINGS["online"]})
    params = yaml.safe_load(TINY_PARAMS.read_text())
    results = study.run_seed(params, 0, tiny_seed_root)
    out = tiny_seed_root / "seed0"
    offline, online = results["offline"], results["online"]
    rounds = json.loads((out / "data/opd_rounds_online/rounds.json").read_text())["rounds"]
    assert len(rounds) == params["opd"]["steps"]  # a refresh before every step but the first
    assert json.loads((out / "data/opd_rounds_offline/rounds.json").read_text())["refresh_every"] == 0
    assert offline["rollouts_s"] == stage_seconds(out, "rollouts")  # offline samples once, before opd
    assert online["rollouts_s"] > offline["rollouts_s"] and online["scoring_s"] > offline["scoring_s"]
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1
        assert r["total_s"] == pytest.approx(r["rollouts_s"] + r["scoring_s"] + r["training_s"])
        assert r["training_s"] > 0
