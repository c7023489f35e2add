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
    name, candidate = teacher_consistency.candidate_command(commands, params_a, params_b, tmp_path, 1007)
    assert name == "models_B1007"
    assert candidate[candidate.index("--out") + 1] == str(tmp_path / "models_B1007")
    b_commands = teacher_consistency.teacher_b_commands(commands, params_a, params_b, tmp_path, 1007)
    assert [name for name, _ in b_commands] == [f"{name}_B" for name in teacher_consistency.B_STAGES]
    a_only = {str(params_a), str(tmp_path / "models/base"), *(str(tmp_path / path) for path in teacher_consistency.B_OUTPUTS)}
    for _, cmd in [(name, candidate), *b_commands]:
        assert not a_only & set(cmd)
        assert cmd[cmd.index("--params") + 1] == str(params_b)
    opd = dict(b_commands)["opd_B"]
    assert opd[opd.index("--sft-model") + 1] == str(tmp_path / "models/sft")  # A's SFT student and rollouts
    assert opd[opd.index("--rollouts") + 1] == str(tmp_path / "data/rollouts")
    assert opd[opd.index("--teacher-cache") + 1] == str(tmp_path / "data/teacher_cache_B")
    assert opd[opd.index("--models") + 1] == str(tmp_path / "models_B1007")  # refresh rounds are scored by B


def test_an_output_without_a_b_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.delitem(teacher_consistency.B_OUTPUTS, "models/opd")
    params = tmp_path / "params.yaml"
    with pytest.raises(RuntimeError, match="models/opd"):
        teacher_consistency.teacher_b_commands(stage_commands(params, tmp_path), params, params, tmp_path, 1000)


@pytest.mark.parametrize("accuracies, chosen, tried", [
    ([0.58, 0.86, 0.90], 1001, 2),  # the first at most 0.05 below A's 0.89, and no further candidate is trained
    ([0.89], 1000, 1),
    ([0.5, 1.0], 1001, 2),  # a stronger B is accepted: it works against finding the paper's effect
    ([0.2, 0.5, 0.7, 0.6], 1002, 4),  # none close enough: the most accurate of all B_CANDIDATES
])
def test_teacher_b_is_the_first_candidate_about_as_accurate_as_a(tmp_path, monkeypatch, accuracies, chosen, tried):
    """The choice of B among candidates, with the candidates' training and evaluation replaced by their
    accuracies (the slow test below runs the real stages)."""
    trained = []
    monkeypatch.setattr(teacher_consistency, "B_CANDIDATES", 4)
    monkeypatch.setattr(teacher_consistency, "run_stages", lambda commands, out: trained.append(commands[-1][0]))
    monkeypatch.setattr(teacher_consistency, "teacher_accuracy", lambda models_dir, params, prompts: accuracies[len(trained) - 1])
    params_a = tmp_path / "params.yaml"
    params_a.write_text(TINY_PARAMS.read_text())
    b_seed, candidates = teacher_consistency.choose_teacher_b(stage_commands(params_a, tmp_path), params_a, tmp_path, 0, 0.89)
    assert b_seed == chosen
    assert trained == [f"models_B{1000 + i}" for i in range(tried)]
    assert candidates == {1000 + i: a for i, a in enumerate(accuracies[:tried])}
    b_params = yaml.safe_load((tmp_path / f"params_B{chosen}.yaml").read_text())
    assert b_params["models"]["seed"] == b_params["models"]["teacher_training"]["seed"] == chosen
    assert b_params["opd"]["allow_teacher_mismatch"] is True


@pytest.mark.slow  # four stage processes after the shared seed run: about a minute on 2 CPU cores
def test_consistent_and_inconsistent_opd_on_tiny_params(tiny_seed_root):
    report = teacher_consistency.run(TINY_PARAMS, [0], tiny_seed_root)
    saved = json.loads((tiny_seed_root / "teacher_consistency.json").read_text())
    seed0 = saved["seeds"]["0"]
    assert set(seed0) == {*teacher_consistency.COLUMNS, "teacher_B_seed", "candidates"}
    assert all(0 <= seed0[key] <= 1 for key in teacher_consistency.COLUMNS)
    assert saved["mean"] == {key: seed0[key] for key in teacher_consistency.COLUMNS}
    # the tiny teachers answer nothing right, so the first candidate B is as accurate as A
    assert seed0["teacher_A"] == seed0["teacher_B"] and seed0["teacher_B_seed"] == 1000
    assert seed0["candidates"] == {"1000": seed0["teacher_B"]}

    out = tiny_seed_root / "seed0"
    teacher_a, teacher_b = cache_teacher(out / "data/teacher_cache"), cache_teacher(out / "data/teacher_cache_B")
    assert teacher_b["weights_sha256"] == models.read_manifest(out / "models_B1000")["teacher"]["weights_sha256"]
    assert teacher_b["weights_sha256"] != teacher_a["weights_sha256"]
    opd_b = models.read_provenance(out / "models/opd_B")
    assert opd_b["teacher_mismatch_allowed"] is True
    assert opd_b["cache_teacher"]["weights_sha256"] == teacher_b["weights_sha256"]
    assert opd_b["sft_data_teacher"]["weights_sha256"] == teacher_a["weights_sha256"]
    assert models.read_provenance(out / "models/opd")["teacher_mismatch_allowed"] is False

    before = mtimes(out)
    assert teacher_consistency.run(TINY_PARAMS, [0], tiny_seed_root) == report
    assert mtimes(out) == before
    b_stages = ["models_B1000", *(f"{name}_B" for name in teacher_consistency.B_STAGES)]
    stages = [*yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"], *b_stages]
    assert set(stages) <= {p.name for p in (out / ".done").iterdir()}
