"""bench/engines.py end to end at tiny sizes: the side-by-side table, the utilisation run, the conversion cost.

No timing is asserted: these check that each mode runs and reports what it claims to measure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/engines.py", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_side_by_side_table_has_both_hf_scorers():
    out = _bench("--size", "toy", "--prompts", "8", "--new-tokens", "8", "--engines", "hf-padded", "hf")
    header = next(line for line in out.splitlines() if "hf/hf-padded" in line)
    assert header.split() == ["hf-padded", "hf", "hf/hf-padded"]
    score = next(line for line in out.splitlines() if line.startswith("scoring tokens/s")).split()[2:]
    peak = next(line for line in out.splitlines() if line.startswith("scoring peak (MiB)")).split()[3:]
    assert len(score) == len(peak) == 3 and all(float(v) > 0 for v in score)
    rollout = next(line for line in out.splitlines() if line.startswith("rollout tokens/s")).split()[2:]
    assert rollout[0] == "-" and float(rollout[1]) > 0  # hf-padded's rollouts are hf's: not timed twice
    assert "320 scored" in out  # 8 prompts x (32 + 8) tokens, by each engine


def test_utilisation_runs_at_a_tiny_size_on_the_cpu():
    out = _bench("--utilisation", "--util-size", "tiny", "--seq-len", "128", "--sequences", "3", "--k", "64",
                 "--chunk", "32")
    match = re.search(r"tiny \(([\d.]+)M parameters, float32\) on cpu: 384 tokens in [\d.]+ s, (\d+) tokens/s, "
                      r"utilisation ([\d.e+-]+)% of 989 TFLOP/s", out)
    assert match, out
    # 4,096 x 64 tied embeddings (0.26M) and two layers of 37k; the utilisation counts 2 x parameters x tokens
    assert 0.26 < float(match.group(1)) < 0.5 and int(match.group(2)) > 0 and float(match.group(3)) > 0


@pytest.mark.vllm
def test_conversion_cost_times_both_vllm_containers_and_ours():
    out = _bench("--conversion", "--k", "8", "--positions", "64")
    match = re.search(r"vLLM builds dicts ([\d.]+), flat lists ([\d.]+) .*flat -> arrays ([\d.]+)", out)
    assert match, out
    assert all(float(v) > 0 for v in match.groups())
