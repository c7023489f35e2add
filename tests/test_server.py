"""The `server` engine: its JSON conversion and retries, and real `vllm serve` (the CPU build) on a loopback port.

The server (bench.engines.VLLMServer) is vLLM's OpenAI-compatible API server bound to 127.0.0.1 only, on the
tiny pipeline's teacher, stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from bench.engines import VLLMServer, free_port
from data_schemas import teacher_cache
from pipeline import engines
from pipeline.config import ConfigError, EngineConfig
from tests.conftest import ROOT, TINY_PARAMS
from tests.test_vllm import _table, assert_scores_match


def _position(target: int, top: list[tuple[int, float]], target_lp: float = 0.0, target_rank: int = 0) -> dict:
    """One position as vLLM's server writes it: the top entries (rank 1..), plus the target if outside them."""
    entries = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": "x"} for rank, (tid, lp) in enumerate(top, 1)}
    if str(target) not in entries:
        entries = {str(target): {"logprob": target_lp, "rank": target_rank, "decoded_token": "x"}, **entries}
    return entries


def test_scores_from_json_prompt_logprobs_in_and_outside_top_k():
    token_ids = [1, 5, 7, 9]
    positions = [None, _position(5, [(5, -0.1), (6, -2.5)]), _position(7, [(8, -0.2), (7, -1.9)]),
                 _position(9, [(3, -0.3), (4, -1.5)], target_lp=-6.0, target_rank=17)]
    s = engines.scores_from_json_prompt_logprobs(positions, token_ids, prompt_len=2, k=2)
    np.testing.assert_array_equal(s.token_logprobs, np.array([-1.9, -6.0], dtype=np.float32))
    np.testing.assert_array_equal(s.topk_ids, [[8, 7], [3, 4]])
    np.testing.assert_array_equal(s.topk_logprobs, np.array([[-0.2, -1.9], [-0.3, -1.5]], dtype=np.float32))
    assert s.topk_ids.dtype == np.int32 and s.topk_logprobs.dtype == s.token_logprobs.dtype == np.float32


def test_scores_from_json_prompt_logprobs_rejects_malformed_output():
    with pytest.raises(ValueError, match="must support prompt_logprobs"):
        engines.scores_from_json_prompt_logprobs(None, [1, 2], prompt_len=1, k=1)
    with pytest.raises(ValueError, match="position 1: .* expected the token 2 and the top-2"):
        engines.scores_from_json_prompt_logprobs([None, _position(2, [(2, -0.1)])], [1, 2], prompt_len=1, k=2)


def test_server_settings_are_validated():
    with pytest.raises(ConfigError, match="engine.url"):
        EngineConfig(name="server")
    with pytest.raises(ConfigError, match="retries"):
        EngineConfig(name="server", url="http://127.0.0.1:1/v1", retries=-1)


def test_unreachable_server_is_retried_then_named_with_the_fix():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"{url}/models: no answer after 3 attempts .*Fix: start the server"):
        engines.ServerEngine(None, EngineConfig(name="server", url=url, retries=2))
    assert time.perf_counter() - start >= 3  # waited 1 s, then 2 s


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    served = VLLMServer(tiny_run / "models/base/teacher", tmp_path_factory.mktemp("server") / "server.log",
                        ["--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "8", "--max-logprobs", "8"])
    served.start()
    yield served
    served.stop()


def _server_params(tmp_path: Path, url: str) -> Path:
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["engine"] = {**params["engine"], "name": "server", "url": url, "retries": 1, "max_concurrency": 4}
    path = tmp_path / "params_server.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _scoring(params: Path, tiny_run: Path, out: Path) -> list[str]:
    args = ["--params", str(params), "--models", str(tiny_run / "models/base"), "--rollouts",
            str(tiny_run / "data/rollouts"), "--out", str(out)]
    return [sys.executable, "-m", "stages.teacher_logprobs", *args]


@pytest.mark.vllm
def test_server_scores_equal_transformers(tiny_run, server, tmp_path):
    """The teacher_logprobs stage through `vllm serve` writes the transformers engine's cache (same tolerance as
    the vLLM cross-check)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(_scoring(_server_params(tmp_path, server.url), tiny_run, tmp_path / "cache"), env=env,
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    hf = _table(tiny_run / "data/teacher_cache", teacher_cache)
    assert_scores_match(hf, _table(tmp_path / "cache", teacher_cache))


@pytest.mark.vllm
def test_server_dying_mid_stage_leaves_finished_shards_and_the_rerun_resumes(tiny_run, server, tmp_path):
    params, out = _server_params(tmp_path, server.url), tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_scoring(params, tiny_run, out), env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "wrote shard" in line:
            server.stop()  # dies after the first shard, while the stage goes on
            break
    _, rest = proc.communicate()
    assert proc.returncode != 0
    assert "no answer after 2 attempts" in rest and "a rerun keeps the shards already written" in rest
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    total = len(list((tiny_run / "data/teacher_cache").glob("*.parquet")))
    assert 1 <= len(kept) < total
    for name in kept:  # every shard on disk is whole and right
        reference = pq.read_table(tiny_run / "data/teacher_cache" / name).to_pydict()
        assert_scores_match(reference, pq.read_table(out / name).to_pydict())

    server.start()
    done = subprocess.run(_scoring(params, tiny_run, out), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not rescored
    assert_scores_match(_table(tiny_run / "data/teacher_cache", teacher_cache), _table(out, teacher_cache))
