"""The `hf` engine's packed, chunked scoring: equal to the padded full-logits reference, and memory-bound."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from bench.engines import padded_score, save_random_model
from pipeline import engines
from pipeline.config import EngineConfig
from tests.conftest import ROOT


def _llama(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                              bos_token_id=2, eos_token_id=3, pad_token_id=1), **kw})


def _qwen3(vocab: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1, tie_word_embeddings=False)


def _sequences(vocab: int, n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[2] + [rng.randrange(4, vocab) for _ in range(rng.randrange(0, 9))] for _ in range(n)]
    responses = [[rng.randrange(4, vocab) for _ in range(rng.randrange(0, 8))] for _ in range(n)]
    responses[3] = []  # a response with no tokens: empty arrays
    prompts[5] = [2] + [rng.randrange(4, vocab) for _ in range(30)]  # the longest: a row of its own
    return prompts, responses


def test_pack_fills_rows_first_fit_longest_first():
    assert engines.pack([3, 4, 2, 9, 1, 1], 7) == [[3], [1, 0], [2, 4, 5]]
    assert engines.pack([], 7) == []
    assert engines.pack([7, 7], 7) == [[0], [1]]


@pytest.mark.parametrize("config", [_llama, _qwen3], ids=["llama", "qwen3"])
def test_packed_chunked_scores_equal_padded_full_logits(config, tmp_path):
    """Passes of two rows, rows of several sequences (one alone), filler tails, and chunks that straddle sequences
    give the padded [B, L, V] path's values: attention stays within each sequence and every position is scored."""
    vocab, k = 97, 5
    save_random_model(config(vocab), tmp_path / "model")
    prompts, responses = _sequences(vocab, 12)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    engine = engines.HFEngine(tmp_path / "model", EngineConfig(batch_size=4, score_pass_tokens=2 * max(lengths),
                                                               score_chunk_tokens=3))
    rows = engines.pack(lengths, max(lengths))
    assert len(rows) > 2 and rows[0] == [5] and max(len(row) for row in rows) > 2
    got = engine.score(prompts, responses, k)
    want = padded_score(engine, prompts, responses, k)
    assert len(got) == len(want) == len(prompts)
    for g, w, r in zip(got, want, responses):
        assert g.token_logprobs.shape == (len(r),) and g.topk_ids.shape == g.topk_logprobs.shape == (len(r), k)
        assert g.token_logprobs.dtype == g.topk_logprobs.dtype == np.float32 and g.topk_ids.dtype == np.int32
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=1e-5)
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=1e-5)
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
    # At given ids (the behaviour top-k_s), in their order: the teacher's own top-k reversed gives its log-probs
    # reversed, through the same packed rows and chunks.
    at = engine.score(prompts, responses, k, [w.topk_ids[:, ::-1] for w in want])
    for g, w in zip(at, want):
        assert g.at_ids_logprobs.shape == w.topk_ids.shape and g.at_ids_logprobs.dtype == np.float32
        np.testing.assert_allclose(g.at_ids_logprobs, w.topk_logprobs[:, ::-1], atol=1e-5)


def test_bfloat16_scores_are_close_to_the_padded_path(tmp_path):
    """In bfloat16 the forward and head product run in bfloat16 (the engine's dtype), the log-softmax in float32."""
    vocab = 97
    save_random_model(_llama(vocab, tie_word_embeddings=True), tmp_path / "model")
    prompts, responses = _sequences(vocab, 8, seed=1)
    engine = engines.HFEngine(tmp_path / "model", EngineConfig(dtype="bfloat16", score_pass_tokens=64,
                                                               score_chunk_tokens=4))
    got = np.concatenate([s.token_logprobs for s in engine.score(prompts, responses, 3)])
    want = np.concatenate([s.token_logprobs for s in padded_score(engine, prompts, responses, 3)])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)  # bfloat16 sums in another order: a few ulps of ~4.6


PEAK_SCRIPT = """
import json, sys
from bench.engines import peak_during
from pipeline import engines
from pipeline.config import EngineConfig

model_dir, pass_tokens, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = engines.HFEngine(model_dir, EngineConfig(score_pass_tokens=pass_tokens, score_chunk_tokens=chunk))
prompts = [[2] + list(range(4, 19)) for _ in range(2)]
responses = [[4 + (7 * i + s) % 150_000 for i in range(2048 - 16)] for s in range(2)]
engine.score(prompts[:1], [responses[0][:8]], 64)  # warm-up: allocator, lazy imports
scores, peak = peak_during(lambda: engine.score(prompts, responses, 64))
print("RESULT " + json.dumps({"peak_over_rss_mib": peak, "rows": [len(s.token_logprobs) for s in scores],
                              "finite": all(bool(abs(s.token_logprobs).max() < 1e9) for s in scores)}))
"""


def test_scoring_a_qwen_sized_vocabulary_stays_within_the_chunk_bound(tmp_path):
    """V = 151,936, two 2,048-token sequences in one pass of two rows, k = 64: the peak RSS while scoring (a fresh
    process; Linux's VmHWM reset before scoring) stays under 600 MiB (measured: 299; 2,374 with 2,048-token
    chunks). The padded path's logits alone would be
    2 x 2,048 x V float32 = 2,374 MiB, and one sequence's float32 log-softmax another 1,187 MiB; the chunked
    path holds about 3 x 256 x V x 4 bytes = 445 MiB of logits at once, plus the pass's activations."""
    save_random_model(_llama(151_936, tie_word_embeddings=True, num_hidden_layers=1), tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "model"), "4096", "256"],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["rows"] == [2032, 2032] and result["finite"]
    assert result["peak_over_rss_mib"] < 600, result
