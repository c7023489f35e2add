"""The streaming OPD data path: shard-at-a-time rows, the shard batch sampler, and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import ShardBatchSampler, ShardedRows, collate

SIZES = [10, 7, 12]  # rows per shard


def _lengths(seed=0):
    return np.random.default_rng(seed).integers(5, 50, sum(SIZES)).tolist()


def _shard_of(index):
    return int(np.searchsorted(np.cumsum(SIZES), index, side="right"))


def test_an_epoch_visits_each_shard_once_with_batches_inside_one_shard():
    sampler = ShardBatchSampler(_lengths(), SIZES, batch_size=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(n // 3 for n in SIZES)
    shards_in_order = [_shard_of(b[0]) for b in batches]
    assert all(_shard_of(i) == _shard_of(b[0]) for b in batches for i in b)  # no batch crosses shards
    # each shard's batches are contiguous: one shard in memory at a time suffices
    assert ([s for i, s in enumerate(shards_in_order) if i == 0 or s != shards_in_order[i - 1]]
            == sorted(set(shards_in_order), key=shards_in_order.index))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no row twice; only each shard's last partial batch is dropped
    assert len(flat) == sum(n - n % 3 for n in SIZES)


def test_epochs_are_reproducible_and_differ():
    a = ShardBatchSampler(_lengths(), SIZES, batch_size=3, seed=7)
    b = ShardBatchSampler(_lengths(), SIZES, batch_size=3, seed=7)
    assert list(a) == list(b)  # epoch 0
    assert list(a) == list(b)  # epoch 1, both advanced by iterating
    b.set_epoch(0)
    assert list(b) != list(a)  # b is at epoch 0 again, a at epoch 2
    b.set_epoch(2)
    a.set_epoch(2)
    assert list(a) == list(b)


def test_batches_are_length_bucketed():
    lengths = _lengths()
    sampler = ShardBatchSampler(lengths, [sum(SIZES)], batch_size=4, seed=0)
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in sampler])
    rng = np.random.default_rng(1)
    random_spread = np.mean([np.ptp(rng.choice(lengths, 4, replace=False)) for _ in range(200)])
    assert spread < random_spread / 2


def test_replicas_split_the_batches_evenly():
    one = list(ShardBatchSampler(_lengths(), SIZES, batch_size=2, seed=3))
    parts = [list(ShardBatchSampler(_lengths(), SIZES, batch_size=2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(one) // 2
    assert sorted(map(tuple, parts[0] + parts[1])) == sorted(map(tuple, one[: 2 * (len(one) // 2)]))


def test_sharded_rows_load_lazily_and_keep_a_bounded_number_of_shards():
    loads = []

    def load(shard):
        loads.append(shard)
        start = sum(SIZES[:shard])
        return [{"index": start + i} for i in range(SIZES[shard])]

    rows = ShardedRows(SIZES, load, max_shards_in_memory=1)
    assert len(rows) == sum(SIZES) and loads == []
    sampler = ShardBatchSampler(_lengths(), SIZES, batch_size=3, seed=0)
    for batch in sampler:
        assert [rows[i]["index"] for i in batch] == batch
    assert sorted(loads) == [0, 1, 2]  # one shard in memory, yet each loaded once per epoch
    assert len(rows._loaded) == 1
    with pytest.raises(ValueError, match="empty"):
        ShardedRows([0], load)


def test_collate_takes_numpy_rows_and_keeps_stored_dtypes_apart_from_ids():
    rows = [{"prompt_ids": np.array([1, 5], np.int32), "response_ids": np.array([7, 2], np.int32),
             "teacher_topk_ids": np.array([[7, 3], [2, 1]], np.int32),
             "teacher_topk_logprobs": np.array([[-0.1, -2.5], [-0.2, -3.0]], np.float16)}]
    batch = collate(rows, pad_id=0)
    assert batch["teacher_topk_ids"].dtype == torch.long and batch["teacher_topk_logprobs"].dtype == torch.float32
    assert batch["input_ids"].tolist() == [[1, 5, 7]] and batch["targets"].tolist() == [[5, 7, 2]]
    assert batch["teacher_topk_ids"][0, 1:].tolist() == [[7, 3], [2, 1]]
