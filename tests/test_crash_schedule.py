"""Crashes anywhere: bench/crash_schedule.py SIGKILLs the process group of a real `dvc repro` (tiny params,
fixed seed) in every stage and once in the rerun that resumes a killed stage; the final rerun must equal an
uninterrupted run in every output file, with no temp file left."""

from __future__ import annotations

import pytest
import yaml

from bench.crash_schedule import crash_schedule, stage_names
from tests.conftest import ROOT, TINY_PARAMS


@pytest.mark.slow
def test_sigkills_of_dvc_repro_in_every_stage_end_in_the_uninterrupted_outputs(tmp_path):
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["models"]["teacher_training"]["checkpoint_every"] = 20  # a kill after one resumes a checkpointed run
    result = crash_schedule(params, tmp_path, seed=0, log=lambda *_: None)
    assert result["diff"] == {}  # every file under every declared output, sha256 for sha256
    assert result["metrics_equal"]
    assert result["temp_files"] == []
    assert result["files"] > 50
    kills = result["kills"]
    assert set(stage_names(ROOT)) <= {kill.run.killed_in for kill in kills}  # every stage killed while running
    assert any(kill.rerun_of_killed and kill.run.killed_in == kill.target for kill in kills)  # and a resumed rerun
    assert all(kill.run.returncode == -9 for kill in kills)  # dvc died by the kill, not of its own failure
    assert result["runs"][-1].returncode == 0
