"""bench/cache.py: the synthetic teacher cache is an exact top-k of a normalised distribution, and every
lossless layout gives back the ids and the float16 log-probs exactly."""

from __future__ import annotations

import numpy as np
import pytest

from bench.cache import (
    BETAS,
    LAYOUTS,
    LOSSY_STEP,
    TOPIC_SIZE,
    Layout,
    V,
    bit_deltas,
    dequantise,
    draw_positions,
    from_bit_deltas,
    id_gaps,
    ids_from_gaps,
    make_vocab,
    measure,
    quantise,
    round_trip_error,
    score_positions,
    synthetic_cache,
)


@pytest.fixture(scope="module")
def vocab():
    return make_vocab(0)


def dense_logprobs(vocab, beta_step, context, boost) -> np.ndarray:
    """The generator's definition, over all V: beta * prior, plus each context token's largest boost."""
    beta = BETAS[beta_step]
    logits = beta * vocab.log_prior
    np.maximum.at(logits, context, beta * vocab.log_prior[context] + boost)
    return logits - np.logaddexp.reduce(logits)


def test_topk_and_sampled_token_are_exact_for_the_full_distribution(vocab):
    rng = np.random.default_rng(3)
    k = 16
    topics = vocab.id_of_rank[rng.integers(0, 5000, (300, TOPIC_SIZE))]
    beta_step, context, boost = draw_positions(vocab, rng, topics)
    ids, logprobs, token, token_logprob = score_positions(vocab, rng, beta_step, context, boost, k)
    rank = np.argsort(vocab.id_of_rank)
    from_the_rest = np.flatnonzero(~(context == token[:, None]).any(1) & (rank[token] >= k))
    assert len(from_the_rest) > 0  # the draw outside the candidates is exercised below
    for i in [0, 1, 2, *from_the_rest[:3]]:
        dense = dense_logprobs(vocab, beta_step[i], context[i], boost[i])
        assert np.logaddexp.reduce(dense) == pytest.approx(0.0, abs=1e-9)
        top = np.argsort(-dense, kind="stable")[:k]
        assert ids[i].tolist() == top.tolist()
        np.testing.assert_allclose(logprobs[i], dense[top], rtol=0, atol=1e-9)
        assert token_logprob[i] == pytest.approx(dense[token[i]], abs=1e-9)


def test_draws_outside_the_candidates_never_return_a_boosted_token(vocab):
    # Weak boosts on popular tokens: most draws fall outside the candidates, often on a boosted token first.
    rng = np.random.default_rng(4)
    n, k = 500, 16
    beta_step = rng.integers(0, len(BETAS), n)
    context = vocab.id_of_rank[rng.integers(k, 300, (n, 64))]
    boost = rng.uniform(0.1, 1.0, (n, 64))
    ids, logprobs, token, token_logprob = score_positions(vocab, rng, beta_step, context, boost, k)
    rank = np.argsort(vocab.id_of_rank)
    assert (rank[token] >= k).mean() > 0.5

    def logit(i, v):
        return BETAS[beta_step[i]] * vocab.log_prior[v] + boost[i][context[i] == v].max(initial=0.0)

    for i in range(n):  # the sampled token's log-prob: its logit under the definition minus the top-1's log Z
        log_z = logit(i, ids[i, 0]) - logprobs[i, 0]
        assert token_logprob[i] == pytest.approx(logit(i, token[i]) - log_z, abs=1e-9)


def test_synthetic_cache_is_seeded_sorted_and_normalised():
    cache = synthetic_cache(4, seed=1, k=16)
    again = synthetic_cache(4, seed=1, k=16)
    other = synthetic_cache(4, seed=2, k=16)
    assert np.array_equal(cache.topk_ids, again.topk_ids) and np.array_equal(cache.topk_logprobs, again.topk_logprobs)
    assert not np.array_equal(cache.topk_logprobs[:100], other.topk_logprobs[:100])
    assert ((50 <= cache.lengths) & (cache.lengths <= 1000)).all()
    assert cache.topk_ids.shape == (cache.lengths.sum(), 16) == cache.topk_logprobs.shape
    assert cache.token_logprobs.shape == (cache.lengths.sum(),) and (cache.token_logprobs <= 0).all()
    assert ((0 <= cache.topk_ids) & (cache.topk_ids < V)).all()
    assert all(len(set(row)) == 16 for row in cache.topk_ids.tolist())
    assert (np.diff(cache.topk_logprobs, axis=1) <= 0).all()
    assert (np.exp(cache.topk_logprobs.astype(np.float64)).sum(1) <= 1 + 1e-6).all()
    assert np.array_equal(cache.top(8).topk_ids, cache.topk_ids[:, :8])


def test_bit_deltas_round_trip_every_float16_bit_pattern():
    bits = np.random.default_rng(0).permutation(np.arange(2**16, dtype=np.uint16)).reshape(-1, 64)
    assert np.array_equal(from_bit_deltas(bit_deltas(bits.view(np.float16))).view(np.uint16), bits)


def test_bit_deltas_are_small_for_sorted_log_probs():
    logprobs = -np.sort(np.random.default_rng(0).exponential(5, (100, 64)), axis=1).astype(np.float16)
    assert (bit_deltas(logprobs)[:, 1:] < 2**15).all()  # non-negative as int16, so no wrap-around


def test_id_gaps_round_trip():
    ids = np.sort(np.random.default_rng(0).choice(V, (10, 64), replace=True).astype(np.int32), axis=1)
    gaps = id_gaps(ids)
    assert (gaps[:, 1:] >= 0).all()
    assert np.array_equal(ids_from_gaps(gaps), ids)


def test_round_trip_error_notices_wrong_ids_and_log_probs():
    cache = synthetic_cache(1, seed=0, k=8)
    layout = Layout("plain")
    ids, logprobs = cache.topk_ids.copy(), cache.topk_logprobs.astype(np.float16)
    assert round_trip_error(cache, layout, ids, logprobs) == {
        "max_abs_error": pytest.approx(np.abs(logprobs.astype(np.float32) - cache.topk_logprobs).max()),
        "float16_exact": 1.0,
        "ids_exact": True,
    }
    ids[5, 3] += 1
    logprobs.view(np.uint16)[7, 2] += 1  # one float16 step
    result = round_trip_error(cache, layout, ids, logprobs)
    assert not result["ids_exact"] and result["float16_exact"] == 1 - 1 / logprobs.size


def test_lossy_reference_error_is_half_a_step_above_the_clip():
    logprobs = np.linspace(-30, 0, 1001, dtype=np.float32).reshape(1, -1)
    assert np.abs(dequantise(quantise(logprobs)) - logprobs).max() <= LOSSY_STEP / 2 + 1e-6


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if not layout.lossy], ids=lambda layout: layout.name)
def test_lossless_layouts_round_trip_exactly(layout: Layout, tmp_path):
    cache = synthetic_cache(3, seed=0, k=8)
    result = measure(cache, layout, tmp_path, check_polars=True)
    assert result["ids_exact"]
    assert result["float16_exact"] == 1.0
    assert result["max_abs_error"] <= 0.016  # float16 rounding at |log-prob| < 64
    assert result["polars_ok"]
    assert 0 < result["bytes_per_entry"] < 8
