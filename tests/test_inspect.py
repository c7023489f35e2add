"""`opd inspect` summarises shard directories; numbers checked against direct pyarrow/numpy sums."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_schemas import rollouts as rollouts_schema
from data_schemas import teacher_cache
from pipeline import shards
from pipeline.inspect_cache import summarise
from tests.conftest import ROOT, section


def test_teacher_cache_summary_matches_direct_computation(tiny_run):
    cache_dir = tiny_run / "data/teacher_cache"
    table, provenance = shards.read_shards(cache_dir, teacher_cache)
    summary = summarise(cache_dir)
    token_lps = np.concatenate([np.asarray(x, dtype=np.float64) for x in table["teacher_token_logprobs"].to_pylist()])
    topk = np.concatenate([np.asarray(x, dtype=np.float32) for x in table["teacher_topk_logprobs"].to_pylist()])
    mass = np.exp(topk).sum(-1)
    assert summary["artefact"] == "teacher_cache"
    assert summary["rows"] == table.num_rows
    assert summary["shards"] == len(shards.list_shards(cache_dir))
    assert summary["tokens"] == len(token_lps)
    assert summary["k"] == section("teacher_logprobs").top_k
    assert summary["teacher_weights_sha256"] == provenance["teacher"]["weights_sha256"]
    assert summary["mean_teacher_logprob"] == pytest.approx(token_lps.mean(), abs=1e-3)
    assert summary["topk_mass_mean"] == pytest.approx(mass.mean(), abs=1e-3)
    assert summary["tokens_teacher_below_1pct"] == pytest.approx((token_lps < np.log(0.01)).mean(), abs=1e-4)
    assert 0 < summary["topk_mass_p05"] <= summary["topk_mass_mean"] <= 1.001
    assert summary["size_bytes"] == sum(p.stat().st_size for p in shards.list_shards(cache_dir))
    assert sum(summary["response_length_histogram"].values()) == table.num_rows


def test_inspect_cli_on_rollouts(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(tiny_run / "data/rollouts")],
                          env=env, capture_output=True, text=True, check=True)
    table, _ = shards.read_shards(tiny_run / "data/rollouts", rollouts_schema)
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert lines["artefact"] == "rollouts"
    assert int(lines["rows"]) == table.num_rows
    assert int(lines["tokens"]) == sum(len(r) for r in table["response_ids"].to_pylist())


def test_inspect_names_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no shards"):
        summarise(tmp_path)
