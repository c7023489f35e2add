"""bench/seeds.py runs exactly dvc.yaml's commands, moved under a per-seed root, and skips the stages already done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.seeds import load_params, run_stages, seed_args, seeded_params, stage_commands, stage_key, stage_seconds
from tests.conftest import ROOT, TINY_PARAMS


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


def _stamp_commands(params: Path) -> list[tuple[str, list[str]]]:
    """Two stages that each log a fresh timestamp, so a rerun shows in the log."""
    stamp = [sys.executable, "-c", "import time; print(time.time_ns())", "--params", str(params)]
    return [("first", stamp), ("second", stamp)]


def test_run_stages_skips_done_stages_and_reruns_when_the_params_change(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("a: 1\n")
    commands = _stamp_commands(params)
    assert run_stages(commands, tmp_path) == ["first", "second"]
    logs = {name: (tmp_path / f"{name}.log").read_text() for name, _ in commands}
    assert run_stages(commands, tmp_path) == []
    assert {name: (tmp_path / f"{name}.log").read_text() for name, _ in commands} == logs
    params.write_text("a: 2\n")
    assert run_stages(commands, tmp_path) == ["first", "second"]
    assert (tmp_path / "first.log").read_text() != logs["first"]
    assert str(params) in (tmp_path / ".done" / "first").read_text()
    assert 0 < stage_seconds(tmp_path, "first") < 60


def test_a_stage_key_changes_with_the_params_sections_the_stage_reads_only(tmp_path):
    """Like `dvc repro`: a new opd key makes opd and the control (which trains with opd's settings) stale, not the
    stages before them."""
    params_file = tmp_path / "params.yaml"
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params_file.write_text(yaml.safe_dump(params))
    commands = dict(stage_commands(params_file, tmp_path))
    before = {name: stage_key(cmd, "") for name, cmd in commands.items()}
    for key, value, stale in (("loss", "topk_fkl", ["control", "opd"]), ("lr", 0.123, ["control", "opd"])):
        params["opd"][key] = value
        params_file.write_text(yaml.safe_dump(params))
        changed = [name for name, cmd in commands.items() if stage_key(cmd, "") != before[name]]
        assert changed == stale
        before = {name: stage_key(cmd, "") for name, cmd in commands.items()}


def test_run_stages_reruns_every_stage_after_one_that_ran(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("a: 1\n")
    commands = _stamp_commands(params)
    run_stages(commands, tmp_path)
    (tmp_path / ".done" / "first").unlink()
    assert run_stages(commands, tmp_path) == ["first", "second"]
    changed = [("first", commands[0][1] + ["extra"]), commands[1]]
    assert run_stages(changed, tmp_path) == ["first", "second"]
    assert run_stages(commands[1:], tmp_path) == ["second"]  # its upstream mark differs: the first stage changed


def test_a_stage_that_fails_is_not_left_marked_done(tmp_path):
    params, flag = tmp_path / "p.yaml", tmp_path / "fail"
    params.write_text("a: 1\n")
    fails_if_flagged = [sys.executable, "-c", f"import os; raise SystemExit(os.path.exists({str(flag)!r}))",
                        "--params", str(params)]
    commands = [_stamp_commands(params)[0], ("second", fails_if_flagged)]
    run_stages(commands, tmp_path)
    (tmp_path / ".done" / "first").unlink()
    flag.touch()
    with pytest.raises(subprocess.CalledProcessError):
        run_stages(commands, tmp_path)  # "second" reruns with an unchanged mark, and fails
    flag.unlink()
    assert run_stages(commands, tmp_path) == ["second"]


def test_the_bench_scripts_take_overrides_of_the_params_file():
    args = seed_args("bench\n", ["--params", str(TINY_PARAMS), "--set", "opd.warmup_steps=7", "--set", "sft.lr=0.5"])
    params = load_params(args.params)
    assert params["opd"]["warmup_steps"] == 7 and params["sft"]["lr"] == 0.5
    assert {k: v for k, v in params.items() if k not in ("opd", "sft")} == \
        {k: v for k, v in yaml.safe_load(TINY_PARAMS.read_text()).items() if k not in ("opd", "sft")}
    assert str(args.params) == f"{TINY_PARAMS} --set opd.warmup_steps=7 --set sft.lr=0.5"
