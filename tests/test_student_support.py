"""The student's support in the cache (rollouts.student_top_k, opd.topk_support union), stage by stage on the tiny
pipeline's models: the behaviour top-k_s the rollouts keep, the teacher's log-probs at them, OPD steps on the union,
and the refusals (old schema versions, caches without the columns, scorers that cannot gather at given ids)."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest

from data_schemas import rollouts as rollouts_schema
from data_schemas import teacher_cache
from pipeline import cache, engines, models, shards
from pipeline.config import ConfigError, EngineConfig
from pipeline.inspect_cache import summarise
from stages import opd, rollouts, teacher_logprobs
from tests.conftest import section

K_S = 3


@pytest.fixture(scope="module")
def support_run(tiny_run, tmp_path_factory):
    """Rollouts of the tiny SFT student with student_top_k 3, and the teacher's cache of them."""
    d = tmp_path_factory.mktemp("support")
    engine = section("engine")
    rollouts.run(dataclasses.replace(section("rollouts"), student_top_k=K_S), engine, tiny_run / "models/sft",
                 tiny_run / "data/prompts", d / "rollouts")
    teacher_logprobs.run(section("teacher_logprobs"), engine, tiny_run / "models/base", d / "rollouts", d / "cache")
    return d


def _per_token(rows, key, width: int) -> np.ndarray:
    """Column `key` of every row, one `width`-wide line a response token."""
    return np.concatenate([np.asarray(r[key], dtype=np.float64).reshape(-1, width) for r in rows])


def test_rollouts_keep_the_policys_top_k_at_each_response_token(tiny_run, support_run):
    table, provenance = shards.read_shards(support_run / "rollouts", rollouts_schema)
    assert rollouts_schema.student_k_of(table) == K_S and provenance["config"]["student_top_k"] == K_S
    assert table.schema.field("behavior_topk_ids").type.value_type.list_size == K_S
    rows = table.to_pylist()
    # The policy's log-probs at the stored ids are its top-3 log-probs, by rank (robust to ties among equal values).
    policy = engines.HFEngine(tiny_run / "models/sft", EngineConfig(batch_size=64))
    at = [np.asarray(r["behavior_topk_ids"], dtype=np.int64) for r in rows]
    scores = policy.score([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], K_S, at)
    got = np.concatenate([s.at_ids_logprobs for s in scores])
    np.testing.assert_allclose(got, np.concatenate([s.topk_logprobs for s in scores]), atol=1e-4)
    # and the stored behaviour log-prob of the sampled token is still the policy's
    np.testing.assert_allclose(np.concatenate([s.token_logprobs for s in scores]),
                               _per_token(rows, "behavior_logprobs", 1)[:, 0], atol=1e-4)


def test_teacher_cache_holds_the_teachers_log_probs_at_the_behaviour_ids(tiny_run, support_run):
    cache_table, provenance = shards.read_shards(support_run / "cache", teacher_cache)
    rollout_table, _ = shards.read_shards(support_run / "rollouts", rollouts_schema)
    assert provenance["student_k"] == teacher_cache.student_k_of(cache_table) == K_S
    teacher = engines.HFEngine(models.read_manifest(tiny_run / "models/base")["teacher"]["path"],
                               EngineConfig(batch_size=64))
    rows = rollout_table.to_pylist()
    log_softmax = teacher.score([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                                teacher.model.config.vocab_size)  # the whole vocabulary, by rank
    ids = np.concatenate([r["behavior_topk_ids"] for r in rows])
    full = np.full((len(ids), teacher.model.config.vocab_size), np.nan)
    all_ids, all_lp = (np.concatenate([getattr(s, key) for s in log_softmax]) for key in ("topk_ids", "topk_logprobs"))
    np.put_along_axis(full, all_ids, all_lp, axis=1)
    expected = np.take_along_axis(full, ids, axis=1)
    got = _per_token(cache_table.to_pylist(), teacher_cache.BEHAVIOR_TOPK, K_S)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())  # float16 storage
    # opd inspect shows k_s for both artefacts, and nothing for a cache without it
    assert summarise(support_run / "cache")["student_k"] == summarise(support_run / "rollouts")["student_k"] == K_S
    assert "student_k" not in summarise(tiny_run / "data/teacher_cache")


def test_opd_trains_on_the_union_support(tiny_run, support_run):
    cfg = dataclasses.replace(section("opd"), loss="opd+topk_rkl", topk_support="union", topk_tail="rest_bucket",
                              steps=2)
    out = support_run / "opd"
    opd.run(cfg, tiny_run / "models/sft", support_run / "rollouts", support_run / "cache", out)
    assert models.weights_hash(out) != models.weights_hash(tiny_run / "models/sft")
    assert models.read_provenance(out)["config"]["topk_support"] == "union"
    with open(out / "logs" / "metrics.csv") as f:
        logged = [float(row["train/topk_rkl"]) for row in csv.DictReader(f) if row.get("train/topk_rkl")]
    assert logged and all(math.isfinite(v) and v >= 0 for v in logged)  # logged every min(10, steps) steps


def test_opd_refuses_the_union_on_rollouts_without_the_behaviour_top_k(tiny_run, tmp_path):
    cfg = dataclasses.replace(section("opd"), loss="topk_rkl", topk_support="union", topk_tail="rest_bucket")
    with pytest.raises(ConfigError, match=r"part-00000.parquet: rollouts v2 without behavior_topk_ids.*"
                                          r"set rollouts.student_top_k"):
        opd.run(cfg, tiny_run / "models/sft", tiny_run / "data/rollouts", tiny_run / "data/teacher_cache",
                tmp_path / "opd")


def test_version_1_shards_are_read_without_the_feature_and_refused_with_it(tiny_run, tmp_path, monkeypatch):
    """Shards written by the schemas of before (v1: no behaviour top-k) still train a teacher-support loss."""
    monkeypatch.setattr(rollouts_schema, "VERSION", 1)
    monkeypatch.setattr(teacher_cache, "VERSION", 1)
    engine = section("engine")
    rollouts.run(section("rollouts"), engine, tiny_run / "models/sft", tiny_run / "data/prompts", tmp_path / "r")
    teacher_logprobs.run(section("teacher_logprobs"), engine, tiny_run / "models/base", tmp_path / "r", tmp_path / "c")
    monkeypatch.undo()
    first = shards.list_shards(tmp_path / "r")[0]
    assert shards.checked_schema(first, rollouts_schema).metadata[b"opd.schema_version"] == b"1"
    rows, _, provenance = cache.open_cache(tmp_path / "r", tmp_path / "c")
    assert "behavior_topk_ids" not in rows[0] and provenance["k"] == section("teacher_logprobs").top_k
    with pytest.raises(ConfigError, match=rf"{first}: rollouts v1 without behavior_topk_ids"):
        cache.open_cache(tmp_path / "r", tmp_path / "c", student_support=True)


def test_scorers_that_cannot_gather_at_given_ids_are_refused_before_loading(tiny_run, support_run, tmp_path):
    for name, extra in (("vllm", {}), ("server", {"url": "http://127.0.0.1:9"})):
        with pytest.raises(ConfigError, match=rf"engine.name {name} cannot score .* engine.name hf"):
            teacher_logprobs.run(section("teacher_logprobs"), EngineConfig(name=name, **extra),
                                 tiny_run / "models/base", support_run / "rollouts", tmp_path / name)
        assert not (tmp_path / name).exists()


def test_refresh_rounds_keep_the_behaviour_top_k_for_the_union(tiny_run, support_run, tmp_path):
    cfg = dataclasses.replace(section("opd"), loss="topk_rkl", topk_support="union", topk_tail="rest_bucket",
                              steps=2, refresh_every=1)
    args = (tiny_run / "models/sft", support_run / "rollouts", support_run / "cache", tmp_path / "opd",
            tmp_path / "rounds")

    def refresh(student_k: int) -> opd.Refresh:
        return opd.Refresh(dataclasses.replace(section("rollouts"), student_top_k=student_k),
                           section("teacher_logprobs"), section("engine"), tiny_run / "models/base",
                           tiny_run / "data/prompts")

    with pytest.raises(ConfigError, match="refresh rounds' rollouts need the behaviour top-k"):
        opd.run(cfg, *args, refresh(0))
    opd.run(cfg, *args, refresh(K_S))
    round_rollouts, _ = shards.read_shards(tmp_path / "rounds/round-001/rollouts", rollouts_schema)
    round_cache, provenance = shards.read_shards(tmp_path / "rounds/round-001/teacher_cache", teacher_cache)
    assert rollouts_schema.student_k_of(round_rollouts) == teacher_cache.student_k_of(round_cache) == K_S
    assert provenance["student_k"] == K_S and round_rollouts["round"].to_pylist()[0] == 1
