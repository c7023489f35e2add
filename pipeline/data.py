"""OPD training data streamed from Parquet shards: one shard pair (rollouts + teacher cache) in memory
at a time, shuffled and length-bucketed within it, reproducible per epoch from a seed.

Memory is bounded by `max_shards_in_memory` shard pairs, not by the whole cache, so a cache larger
than RAM trains the same way as the toy one. Shards are validated before training starts
(pipeline.cache.open_cache); here they are only read.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

BUCKET_BATCHES = 16
"""Length bucketing: rows are sorted by length within windows of this many batches (after a shuffle),
so a batch pads to similar lengths while batches still mix the whole shard."""


class ShardedRows(Dataset):
    """Rows of many shards, addressed by one global index; a shard is loaded (by `load_shard(i)`, a
    list of row dicts) when first touched and kept in a small LRU of `max_shards_in_memory`."""

    def __init__(self, shard_sizes: list[int], load_shard: Callable[[int], list[dict]], max_shards_in_memory: int = 2):
        if not shard_sizes or sum(shard_sizes) == 0:
            raise ValueError("no training rows: the input artefact is empty")
        self.shard_sizes, self.load_shard, self.capacity = list(shard_sizes), load_shard, max(1, max_shards_in_memory)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).tolist()
        self._loaded: OrderedDict[int, list[dict]] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(index)
        if shard not in self._loaded:
            rows = self.load_shard(shard)
            if len(rows) != self.shard_sizes[shard]:
                raise RuntimeError(f"shard {shard} changed while training: {len(rows)} rows, "
                                   f"expected {self.shard_sizes[shard]}")
            self._loaded[shard] = rows
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(shard)
        return self._loaded[shard][row]


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of global indices for ShardedRows, epoch after epoch, deterministic in (seed, epoch).

    Each epoch visits the shards in a shuffled order and finishes one before starting the next, so
    only the current shard needs to be in memory. Within a shard the rows are shuffled, sorted by
    length in windows of BUCKET_BATCHES batches, cut into batches, and the batches shuffled. A
    shard's last partial batch is dropped when the shard holds at least one full batch.
    With `pack_tokens`, a batch is instead a bin of rows holding at most that many tokens in all
    (pack_rows), collated into one packed row; each shard is packed once, so every epoch has the
    same batches (each row in exactly one), in a new order.
    With `num_replicas` > 1 (DDP), replica r takes every num_replicas-th batch, from equally many.
    """

    def __init__(self, lengths: list[int], shard_sizes: list[int], batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0, num_batches: int | None = None, pack_tokens: int = 0):
        """`num_batches`: one iteration yields exactly this many batches, from as many passes over the
        rows as it takes (each pass a new epoch's order): an OPD round of a fixed number of steps.
        `pack_tokens` (TrainConfig.pack_tokens): 0 for batches of `batch_size` rows, else the token budget."""
        self.lengths, self.shard_sizes, self.batch_size, self.seed = np.asarray(lengths), shard_sizes, batch_size, seed
        self.num_replicas, self.rank, self.epoch, self.num_batches = num_replicas, rank, 0, num_batches
        self.skip = 0  # batches of the next iteration already trained on (resume from a mid-epoch checkpoint)
        self.starts = np.concatenate([[0], np.cumsum(shard_sizes)])
        self.packed = None
        if pack_tokens:
            too_long = np.flatnonzero(self.lengths > pack_tokens)
            if len(too_long):
                shard = int(np.searchsorted(self.starts, too_long[0], side="right")) - 1
                raise ValueError(
                    f"row {too_long[0] - self.starts[shard]} of shard {shard} has {self.lengths[too_long[0]]} tokens "
                    f"(prompt + response), more than pack_tokens = {pack_tokens} (rows over it: {len(too_long)}; the "
                    f"longest has {self.lengths.max()}). Fix: set pack_tokens to at least {self.lengths.max()} in "
                    f"this training section, or 0 for padded batches of batch_size rows")
            rng = np.random.default_rng(seed)  # not the epochs' [seed, epoch]: packed once for every epoch
            self.packed = [pack_rows(self.starts[shard] + rng.permutation(size), self.lengths, pack_tokens)
                           for shard, size in enumerate(shard_sizes)]

    def resume_at(self, batches_done: int) -> None:
        """Continue after `batches_done` batches (all epochs counted) of an earlier run with this seed."""
        if self.num_batches is None:
            self.epoch, self.skip = divmod(batches_done, len(self))
        else:
            self.skip = batches_done

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for shard in rng.permutation(len(self.shard_sizes)):
            if self.packed is not None:
                batches.extend(self.packed[shard][i] for i in rng.permutation(len(self.packed[shard])))
                continue
            index = self.starts[shard] + rng.permutation(self.shard_sizes[shard])
            window = self.batch_size * BUCKET_BATCHES
            for a in range(0, len(index), window):
                chunk = index[a : a + window]
                index[a : a + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            full = len(index) - len(index) % self.batch_size if len(index) >= self.batch_size else len(index)
            shard_batches = [index[a : a + self.batch_size].tolist() for a in range(0, full, self.batch_size)]
            batches.extend(shard_batches[i] for i in rng.permutation(len(shard_batches)))
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        if self.num_batches is not None:
            passes = (batch for epoch in itertools.count(self.epoch) for batch in self._batches(epoch))
            return itertools.islice(passes, skip, self.num_batches)
        batches = self._batches(self.epoch)[skip:]
        self.epoch += 1  # the next pass is a new epoch (also without set_epoch)
        return iter(batches)

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        if self.packed is not None:
            return sum(map(len, self.packed)) // self.num_replicas
        per_shard = [n // self.batch_size if n >= self.batch_size else int(n > 0) for n in self.shard_sizes]
        return sum(per_shard) // self.num_replicas


def pack_rows(index: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """The rows `index` in bins whose `lengths` sum to at most `budget` (each row at most `budget`): first-fit
    decreasing within consecutive windows of BUCKET_BATCHES budgets' worth of rows, so the bins are nearly
    full yet each mixes rows from one stretch of `index` (a shuffle), not the shard's longest ones together."""
    windows = np.cumsum(lengths[index]) // (budget * BUCKET_BATCHES)
    bins: list[list[int]] = []
    for window in np.split(index, np.flatnonzero(np.diff(windows)) + 1):
        free, members = [], []
        for row in window[np.argsort(-lengths[window], kind="stable")]:
            n = lengths[row]
            fit = next((b for b, room in enumerate(free) if room >= n), None)
            if fit is None:
                free.append(budget)
                members.append([])
                fit = len(free) - 1
            free[fit] -= n
            members[fit].append(int(row))
        bins.extend(members)
    return bins


def batch_loader(rows: ShardedRows, lengths: list[int], batch_size: int, pad_id: int, seed: int, trainer,
                 start_step: int = 0, num_batches: int | None = None) -> DataLoader:
    """Collated batches of `rows` for `trainer`'s replica (ShardBatchSampler), resumed where the
    trainer's restored step count says, counted from `start_step` (the step these rows start at).
    Packed into batches of `pack_tokens` tokens when the training config of the trainer's module
    (pipeline.training.DistillModule.cfg) sets TrainConfig.pack_tokens."""
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    pack_tokens = trainer.lightning_module.cfg.pack_tokens if trainer is not None else 0
    sampler = ShardBatchSampler(lengths, rows.shard_sizes, batch_size, seed, replicas, rank, num_batches, pack_tokens)
    if trainer is not None and trainer.global_step > start_step:  # restored from a checkpoint: skip what it trained on
        sampler.resume_at((trainer.global_step - start_step) * trainer.accumulate_grad_batches)
    return DataLoader(rows, batch_sampler=sampler,
                      collate_fn=functools.partial(collate, pad_id=pad_id, packed=bool(pack_tokens)))


class ShardedData(L.LightningDataModule):
    """The training DataModule of the SFT stages: ShardedRows batched by ShardBatchSampler, collated,
    one replica's share of the batches under DDP."""

    def __init__(self, rows: ShardedRows, lengths: list[int], batch_size: int, pad_id: int, seed: int):
        super().__init__()
        self.rows, self.lengths, self.batch_size, self.pad_id, self.seed = rows, lengths, batch_size, pad_id, seed

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.rows, self.lengths, self.batch_size, self.pad_id, self.seed, self.trainer)


class RoundsData(L.LightningDataModule):
    """Batches in rounds, one per Lightning epoch (so train with `reload_every_epoch`): round r is
    `steps_per_round` optimizer steps on the rows `round_rows(r, start_step, trainer)` returns, a ShardedRows
    and its row lengths, asked for as the round begins (OPD refresh rounds sample them then)."""

    def __init__(self, round_rows: Callable, batch_size: int, pad_id: int, seed: int, steps_per_round: int):
        super().__init__()
        self.round_rows, self.batch_size, self.pad_id, self.seed = round_rows, batch_size, pad_id, seed
        self.steps_per_round = steps_per_round

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start_step = trainer.current_epoch * self.steps_per_round
        rows, lengths = self.round_rows(trainer.current_epoch, start_step, trainer)
        return batch_loader(rows, lengths, self.batch_size, self.pad_id, self.seed, trainer, start_step,
                            self.steps_per_round * trainer.accumulate_grad_batches)


def in_memory(rows: list[dict], batch_size: int, pad_id: int, seed: int) -> ShardedData:
    """A DataModule over rows already in memory (SFT data): one shard."""
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    return ShardedData(ShardedRows([len(rows)], lambda _: rows), lengths, batch_size, pad_id, seed)


def collate(rows: list[dict], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs and per-position targets/teacher signal (positions = inputs) of `rows`.

    Position t of `input_ids` predicts `targets[t]`; only response tokens are in `mask`. A row of n
    tokens gives n - 1 positions. Padded (default): one row per sequence, right-padded, with an
    `attention_mask`. `packed`: every sequence's positions one after another in a single row [1, N],
    N = sum of (n - 1), no padding, and `position_ids` restarting at 0 with each sequence, which is how
    transformers keeps attention within each sequence (masking_utils' packed-sequence detection, used
    when no attention_mask is given; flash-attention's variable-length path). The positions come in the
    same order as the padded batch's masked ones, so the losses (token means) are the same.
    Optional row fields: `behavior_logprobs` [R], `teacher_logprobs` [R], `teacher_topk_ids`/
    `teacher_topk_logprobs` [R, k], `behavior_topk_ids`/`teacher_behavior_topk_logprobs` [R, k_s], all aligned
    with `response_ids`. Rows may hold lists or numpy
    arrays; the batch is assembled in numpy (slice copies, no per-token Python) and shared with torch.
    """
    prompt_lens = np.array([len(r["prompt_ids"]) for r in rows])
    seq_lens = prompt_lens + np.array([len(r["response_ids"]) for r in rows])
    positions = seq_lens - 1
    # Every position as (sequence, column), in order, so each field is one gather or scatter, not a loop over rows.
    seq_of = np.repeat(np.arange(len(rows)), positions)
    cols = np.arange(positions.sum()) - np.repeat(np.cumsum(positions) - positions, positions)
    tokens = np.concatenate([np.concatenate([r["prompt_ids"], r["response_ids"]]) for r in rows]).astype(np.int64)
    at = np.repeat(np.cumsum(seq_lens) - seq_lens, positions) + cols  # each position's token in `tokens`
    flat = {"input_ids": tokens[at], "targets": tokens[at + 1],
            "mask": cols >= np.repeat(prompt_lens - 1, positions)}  # position p - 1 predicts the first response token
    for key in (k for k in RESPONSE_FIELDS if k in rows[0]):
        values = np.concatenate([np.asarray(r[key]) for r in rows])
        dtype = np.int64 if key.endswith("_ids") else np.float32
        flat[key] = np.zeros((len(cols), *values.shape[1:]), dtype=dtype)
        flat[key][flat["mask"]] = values  # response tokens are the masked positions, in the same order
    if packed:
        batch = {key: value[None] for key, value in flat.items()}
        batch["position_ids"] = cols[None]
    else:
        batch = {}
        for key, value in flat.items():
            fill = pad_id if key in ("input_ids", "targets") else 0
            batch[key] = np.full((len(rows), positions.max(), *value.shape[1:]), fill, dtype=value.dtype)
            batch[key][seq_of, cols] = value
        batch["attention_mask"] = (np.arange(positions.max()) < positions[:, None]).astype(np.int64)
    return {key: torch.from_numpy(value) for key, value in batch.items()}


RESPONSE_FIELDS = ("behavior_logprobs", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
                   "behavior_topk_ids", "teacher_behavior_topk_logprobs")
"""Optional per-response-token row fields, placed at the response's positions by `collate`."""
