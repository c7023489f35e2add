"""bench/teacher_consistency.py on the tiny pipeline: teacher B really scores the cache, OPD on it runs only
through the explicit override, and a second call reuses every finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import teacher_consistency
from bench.seeds import stage_commands
from data_schemas import teacher_cache
from pipeline import models, shards
from tests.conftest import ROOT, TINY_PARAMS


def cache_teacher(cache_dir: Path) -> dict:
    return shards.read_shard(shards.list_shards(cache_dir)[0], teacher_cache)[1]["teacher"]


def mtimes(out: Path) -> dict[Path, int]:
    """Every file of a seed's run but its params files, which each call writes again."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("params")}


def test_teacher_b_commands_replace_every_output_of_a_by_b(tmp_path):
    params_a, params_b = tmp_path / "params.yaml", tmp_path / "params_B.yaml"
    commands = teacher_consistency.teacher_b_commands(stage_commands(params_a, tmp_path), params_a, params_b, tmp_path)
    assert [name for name, _ in commands] == [f"{name}_B" for name in teacher_consistency.B_STAGES]
    a_only = {str(params_a), *(str(tmp_path / path) for path in teacher_consistency.B_OUTPUTS)}
    for _, cmd in commands:
        assert not a_only & set(cmd)
        assert cmd[cmd.index("--params") + 1] == str(params_b)
    opd = dict(commands)["opd_B"]
    assert opd[opd.index("--sft-model") + 1] == str(tmp_path / "models/sft")  # A's SFT student and rollouts
    assert opd[opd.index("--rollouts") + 1] == str(tmp_path / "data/rollouts")
    assert opd[opd.index("--teacher-cache") + 1] == str(tmp_path / "data/teacher_cache_B")


def test_an_output_without_a_b_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.delitem(teacher_consistency.B_OUTPUTS, "models/opd")
    params = tmp_path / "params.yaml"
    with pytest.raises(RuntimeError, match="models/opd"):
        teacher_consistency.teacher_b_commands(stage_commands(params, tmp_path), params, params, tmp_path)


@pytest.mark.slow  # twelve stage processes: about 2-3 minutes on 2 busy CPU cores
def test_consistent_and_inconsistent_opd_on_tiny_params(tmp_path):
    report = teacher_consistency.run(TINY_PARAMS, [0], tmp_path)
    saved = json.loads((tmp_path / "teacher_consistency.json").read_text())
    assert set(saved["seeds"]["0"]) == set(teacher_consistency.COLUMNS)
    assert all(0 <= accuracy <= 1 for accuracy in saved["seeds"]["0"].values())
    assert saved["mean"] == saved["seeds"]["0"]

    out = tmp_path / "seed0"
    teacher_a, teacher_b = cache_teacher(out / "data/teacher_cache"), cache_teacher(out / "data/teacher_cache_B")
    assert teacher_b["weights_sha256"] == models.read_manifest(out / "models_B")["teacher"]["weights_sha256"]
    assert teacher_b["weights_sha256"] != teacher_a["weights_sha256"]
    opd_b = models.read_provenance(out / "models/opd_B")
    assert opd_b["teacher_mismatch_allowed"] is True
    assert opd_b["cache_teacher"]["weights_sha256"] == teacher_b["weights_sha256"]
    assert opd_b["sft_data_teacher"]["weights_sha256"] == teacher_a["weights_sha256"]
    assert models.read_provenance(out / "models/opd")["teacher_mismatch_allowed"] is False

    before = mtimes(out)
    assert teacher_consistency.run(TINY_PARAMS, [0], tmp_path) == report
    assert mtimes(out) == before
    b_stages = [f"{name}_B" for name in teacher_consistency.B_STAGES]
    stages = [*yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"], *b_stages]
    assert sorted(p.name for p in (out / ".done").iterdir()) == sorted(stages)
