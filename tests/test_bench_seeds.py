"""bench/seeds.py runs exactly dvc.yaml's commands, moved under a per-seed root."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.seeds import seeded_params, stage_commands
from tests.conftest import ROOT


def test_stage_commands_follow_dvc_yaml_with_paths_moved(tmp_path):
    commands = stage_commands(Path("p.yaml"), tmp_path)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert [name for name, _ in commands] == list(stages)
    for name, cmd in commands:
        assert cmd[1:3] == ["-m", f"stages.{name}"]
        assert cmd[cmd.index("--params") + 1] == "p.yaml"
        paths = [arg for arg in cmd[3:] if not arg.startswith("--") and arg != "p.yaml"]
        assert paths and all(arg.startswith(str(tmp_path)) for arg in paths)


def test_seeded_params_set_every_seed_but_the_prompts():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeded = seeded_params(params, 7)
    assert seeded["task"]["seed"] == params["task"]["seed"]
    assert seeded["models"]["seed"] == seeded["sft"]["seed"] == seeded["rollouts"]["seed"] == seeded["opd"]["seed"] == 7
    assert seeded["models"]["teacher_training"]["seed"] == 7
    assert params["opd"].get("seed") != 7  # the input is not modified
