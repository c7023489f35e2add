"""Periodic online refresh (opd.refresh_every): rounds written with provenance, resumed after a crash."""

from __future__ import annotations

import json

import pytest
import torch

from data_schemas import rollouts as rollouts_schema
from data_schemas import teacher_cache
from pipeline import models, shards, training
from pipeline.config import ConfigError, OpdConfig, from_dict
from pipeline.prompts import read_split
from stages import opd
from tests.conftest import section


def _refresh(run_dir) -> opd.Refresh:
    return opd.Refresh(section("rollouts"), section("teacher_logprobs"), section("engine"), run_dir / "models/base",
                       run_dir / "data/prompts")


def _run(run_dir, cfg: OpdConfig, name: str):
    out, rounds = run_dir / f"models/{name}", run_dir / f"data/{name}_rounds"
    opd.run(cfg, run_dir / "models/sft", run_dir / "data/rollouts", run_dir / "data/teacher_cache", out, rounds,
            _refresh(run_dir))
    return out, rounds


def _cfg(**overrides) -> OpdConfig:
    cfg = section("opd")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _round_contents(rounds_dir):
    """Every round shard's rows and provenance, by path (what an uninterrupted run must reproduce)."""
    contents = {}
    for artefact, name in ((rollouts_schema, "rollouts"), (teacher_cache, "teacher_cache")):
        for path in sorted(rounds_dir.glob(f"round-*/{name}/*.parquet")):
            table, provenance = shards.read_shard(path, artefact)
            contents[str(path.relative_to(rounds_dir))] = (table.to_pylist(), provenance)
    return contents


def test_round_prompts_take_the_next_prompts_cyclically():
    prompts = list(range(10))
    assert opd.round_prompts(prompts, 1, 4) == [0, 1, 2, 3]
    assert opd.round_prompts(prompts, 2, 4) == [4, 5, 6, 7]
    assert opd.round_prompts(prompts, 3, 4) == [8, 9, 0, 1]
    assert opd.round_prompts(prompts, 5, 40) == prompts  # never more than the split


def test_refresh_writes_rounds_sampled_by_the_current_student(run_copy):
    cfg = _cfg(steps=4, refresh_every=2)
    out, rounds = _run(run_copy, cfg, "opd_refresh")
    manifest = json.loads((rounds / opd.ROUNDS_MANIFEST).read_text())
    assert [r["round"] for r in manifest["rounds"]] == [0, 1]
    assert [r["steps"] for r in manifest["rounds"]] == [[0, 2], [2, 4]]
    table, provenance = shards.read_shards(rounds / "round-001/rollouts", rollouts_schema)
    # 2 steps x 8 rows a batch, 2 samples a prompt: the first 8 opd prompts
    expected_prompts = [p["prompt_id"] for p in read_split(run_copy / "data/prompts", "opd")[:8]]
    assert sorted(set(table["prompt_id"].to_pylist())) == sorted(expected_prompts)
    assert table.num_rows == 16 and set(table["round"].to_pylist()) == {1}
    assert provenance["round"] == 1 and provenance["policy"]["id"] == "student-step-000002"
    assert provenance["policy"]["weights_sha256"] != models.weights_hash(run_copy / "models/sft")  # the student moved
    assert not list(rounds.glob("round-001/student-step-*"))  # the policy's weights are not kept
    for path in shards.list_shards(rounds / "round-001/teacher_cache"):
        _, cache_provenance = shards.read_shard(path, teacher_cache)
        assert cache_provenance["rollouts_sha256"] == shards.file_sha256(rounds / "round-001/rollouts" / path.name)
        assert (cache_provenance["teacher"]["weights_sha256"]
                == models.read_manifest(run_copy / "models/base")["teacher"]["weights_sha256"])
    timings = json.loads((out / "timings.json").read_text())
    assert timings["rollouts_s"] > 0 and timings["scoring_s"] > 0 and timings["training_s"] > 0
    assert models.read_provenance(out)["rounds"] == 2
    assert not training.checkpoint_dir_for(out).exists()


def test_without_refresh_the_rounds_manifest_lists_the_offline_cache_only(run_copy):
    out, rounds = _run(run_copy, _cfg(), "opd_offline")
    manifest = json.loads((rounds / opd.ROUNDS_MANIFEST).read_text())
    assert manifest["refresh_every"] == 0 and len(manifest["rounds"]) == 1
    assert json.loads((out / "timings.json").read_text())["rollouts_s"] == 0


@pytest.mark.parametrize("crash", ["scoring", "training"])
def test_a_refresh_run_killed_mid_way_resumes_to_the_uninterrupted_result(run_copy, monkeypatch, crash_at_step, crash):
    """Online OPD (refresh every step) for 4 steps: a crash while the teacher scores round 2, or while
    round 3 trains, then a rerun: same rounds, row for row, and the same final weights, bit for bit."""
    cfg = _cfg(steps=4, refresh_every=1, checkpoint_every=1)
    reference_out, reference_rounds = _run(run_copy, cfg, "reference")
    reference = models.load_model(reference_out).state_dict()

    if crash == "scoring":
        score = opd.teacher_stage.run

        def crash_in_round_2(*args, **kwargs):
            if "round-002" in str(args[3]):
                raise RuntimeError("simulated crash")
            return score(*args, **kwargs)

        monkeypatch.setattr(opd.teacher_stage, "run", crash_in_round_2)
    else:
        crash_at_step(3)  # round 3 trains optimizer step 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(run_copy, cfg, "resumed")
    monkeypatch.undo()
    out, rounds = _run(run_copy, cfg, "resumed")
    assert _round_contents(rounds) == _round_contents(reference_rounds)
    assert len(_round_contents(rounds)) == 2 * 3  # rounds 1-3, one rollout and one cache shard each
    resumed = models.load_model(out).state_dict()
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_refresh_config_is_checked():
    with pytest.raises(ConfigError, match="opd.refresh_every must be >= 0"):
        from_dict(OpdConfig, {"refresh_every": -1}, "opd")
    with pytest.raises(ConfigError, match="on one device for now"):
        from_dict(OpdConfig, {"refresh_every": 2, "devices": 2}, "opd")
    with pytest.raises(ConfigError, match="needs --models, --prompts and --rounds"):
        opd.run(_cfg(refresh_every=1), *["unused"] * 4)
