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
    commands = stage_commands(params_a, tmp_path)
    b_commands = teacher_consistency.teacher_b_commands(commands, params_a, params_b, tmp_path)
    assert [name for name, _ in b_commands] == [f"{name}_B" for name in ("models", *teacher_consistency.B_STAGES)]
    models_b = dict(b_commands)["models_B"]
    assert models_b[models_b.index("--out") + 1] == str(tmp_path / "models_B")
    a_only = {str(params_a), str(tmp_path / "models/base"),
              *(str(tmp_path / path) for path in teacher_consistency.B_OUTPUTS)}
    for _, cmd in b_commands:
        assert not a_only & set(cmd)
        assert cmd[cmd.index("--params") + 1] == str(params_b)
    opd = dict(b_commands)["opd_B"]
    assert opd[opd.index("--sft-model") + 1] == str(tmp_path / "models/sft")  # A's SFT student and rollouts
    assert opd[opd.index("--rollouts") + 1] == str(tmp_path / "data/rollouts")
    assert opd[opd.index("--teacher-cache") + 1] == str(tmp_path / "data/teacher_cache_B")
    assert opd[opd.index("--models") + 1] == str(tmp_path / "models_B")  # refresh rounds are scored by B


def test_an_output_without_a_b_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.delitem(teacher_consistency.B_OUTPUTS, "models/opd")
    params = tmp_path / "params.yaml"
    with pytest.raises(RuntimeError, match="models/opd"):
        teacher_consistency.teacher_b_commands(stage_commands(params, tmp_path), params, params, tmp_path)


@pytest.mark.parametrize("style, other", [(None, "units_first"), ("carry_first", "units_first"),
                                          ("units_first", "carry_first")])
def test_teacher_b_is_a_in_the_other_notation_and_opd_may_use_it(style, other):
    params = yaml.safe_load(TINY_PARAMS.read_text())
    if style:
        params["models"]["teacher_style"] = style
    b = teacher_consistency.teacher_b_params(params)
    assert b["models"]["teacher_style"] == other
    assert b["opd"]["allow_teacher_mismatch"] is True
    assert b["models"]["teacher_training"]["lr"] == teacher_consistency.B_LR
    b["models"].pop("teacher_style"), b["opd"].pop("allow_teacher_mismatch"), b["models"]["teacher_training"].pop("lr")
    params["models"].pop("teacher_style", None), params["models"]["teacher_training"].pop("lr", None)
    assert b == params  # nothing else differs: same size, data, seeds and steps


@pytest.mark.slow  # five stage processes after the shared seed run: about a minute on 2 CPU cores
def test_consistent_and_inconsistent_opd_on_tiny_params(tiny_seed_root):
    report = teacher_consistency.run(TINY_PARAMS, [0], tiny_seed_root)
    saved = json.loads((tiny_seed_root / "teacher_consistency.json").read_text())
    seed0 = saved["seeds"]["0"]
    assert set(seed0) == set(teacher_consistency.COLUMNS)
    assert all(0 <= seed0[key] <= 1 for key in teacher_consistency.COLUMNS if not key.startswith("logprob"))
    assert all(seed0[key] < 0 for key in ("logprob_A", "logprob_B"))
    assert saved["mean"] == {key: seed0[key] for key in teacher_consistency.COLUMNS}

    out = tiny_seed_root / "seed0"
    teacher_a, teacher_b = cache_teacher(out / "data/teacher_cache"), cache_teacher(out / "data/teacher_cache_B")
    manifest_b = models.read_manifest(out / "models_B")["teacher"]
    assert teacher_b["weights_sha256"] == manifest_b["weights_sha256"] != teacher_a["weights_sha256"]
    assert (teacher_a["style"], teacher_b["style"]) == ("carry_first", "units_first")
    opd_b = models.read_provenance(out / "models/opd_B")
    assert opd_b["teacher_mismatch_allowed"] is True
    assert opd_b["cache_teacher"]["weights_sha256"] == teacher_b["weights_sha256"]
    assert opd_b["sft_data_teacher"]["weights_sha256"] == teacher_a["weights_sha256"]
    assert models.read_provenance(out / "models/opd")["teacher_mismatch_allowed"] is False

    before = mtimes(out)
    assert teacher_consistency.run(TINY_PARAMS, [0], tiny_seed_root) == report
    assert mtimes(out) == before
    b_stages = [f"{name}_B" for name in ("models", *teacher_consistency.B_STAGES)]
    stages = [*yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"], *b_stages]
    assert set(stages) <= {p.name for p in (out / ".done").iterdir()}
