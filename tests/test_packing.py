"""Packed batches (TrainConfig.pack_tokens): rows packed into token budgets, collated into one row with
attention kept within each sequence, give the padded batch's loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import data, models, toy_task
from pipeline.config import ConfigError, OpdConfig, ToyModelConfig, TrainConfig
from pipeline.training import DistillModule
from tests.test_training import _toy_opd_rows


def _rows(vocab, n=7, seed=1):
    """OPD rows with prompts and responses of different lengths (so padding differs between rows)."""
    rng = np.random.default_rng(seed)
    rows = _toy_opd_rows(vocab, n=n, seed=seed)
    return [{**row, "prompt_ids": rng.integers(3, vocab, rng.integers(1, 8))} for row in rows]


def test_packed_collate_lays_sequences_end_to_end_with_their_teacher_signal():
    rows = [
        {"prompt_ids": [1, 5, 6], "response_ids": [7, 2], "teacher_logprobs": np.array([-0.5, -0.1], np.float32),
         "teacher_topk_ids": np.array([[7, 8], [2, 3]]), "teacher_topk_logprobs": np.array([[-0.5, -1], [-0.1, -3]])},
        {"prompt_ids": [1, 9], "response_ids": [4, 4, 2], "teacher_logprobs": np.array([-1, -2, -3], np.float32),
         "teacher_topk_ids": np.array([[4, 5], [4, 6], [2, 4]]), "teacher_topk_logprobs": np.zeros((3, 2))},
    ]
    batch = data.collate(rows, pad_id=0, packed=True)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 1, 9, 4, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["targets"].tolist() == [[5, 6, 7, 2, 9, 4, 4, 2]]
    assert batch["mask"].tolist() == [[False, False, True, True, False, True, True, True]]
    assert batch["teacher_logprobs"][0, batch["mask"][0]].tolist() == pytest.approx([-0.5, -0.1, -1, -2, -3])
    assert batch["teacher_topk_ids"][0, batch["mask"][0]].tolist() == [[7, 8], [2, 3], [4, 5], [4, 6], [2, 4]]
    padded = data.collate(rows, pad_id=0)
    for key in ("targets", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
        assert torch.equal(padded[key][padded["mask"]], batch[key][batch["mask"]]), key


def _qwen3(vocab):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("loss, options", [
    ("sft", {}),
    ("opd", {}),
    ("topk_fkl", {}),
    ("opd+topk_jsd", {"token_fraction": 0.5, "sft_weight": 0.1}),
])
def test_a_packed_batch_gives_the_padded_loss_and_gradients(architecture, attention, chunk, loss, options):
    """The same rows, padded or packed: equal loss and parameter gradients (float32 tolerance), through
    DistillModule's real step, with the chunked loss and the full logits; token selection too (its ties
    break by position order, which packing keeps)."""
    tokenizer = toy_task.build_tokenizer()
    model = (models.build_toy_model(ToyModelConfig(64, 2, 64, 2), tokenizer, seed=0) if architecture == "llama"
             else _qwen3(len(tokenizer)))
    model.set_attn_implementation(attention)
    rows = _rows(len(tokenizer))
    cfg = OpdConfig(steps=1, loss=loss, loss_chunk_tokens=chunk, **options)
    results = []
    for packed in (False, True):
        batch = data.collate(rows, tokenizer.pad_token_id, packed=packed)
        model.zero_grad()
        value = DistillModule(model, cfg, loss).training_step(batch, 0)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_packing_changes_the_model_input_not_just_the_layout():
    """Control for the test above: the same packed row without position_ids (one long sequence, attention
    across rows) gives another loss, so the equality above is attention kept within each sequence."""
    tokenizer = toy_task.build_tokenizer()
    model = models.build_toy_model(ToyModelConfig(64, 2, 64, 2), tokenizer, seed=0)
    rows, cfg = _rows(len(tokenizer)), OpdConfig(steps=1, loss="sft")
    batch = data.collate(rows, tokenizer.pad_token_id, packed=True)
    padded = DistillModule(model, cfg, "sft").training_step(data.collate(rows, tokenizer.pad_token_id), 0)
    crossed = DistillModule(model, cfg, "sft").training_step({k: v for k, v in batch.items() if k != "position_ids"}, 0)
    assert abs(crossed.item() - padded.item()) > 1e-3


LENGTHS = np.random.default_rng(0).integers(5, 60, 90)
SIZES = [40, 20, 30]


def test_packed_batches_hold_every_row_once_within_the_budget():
    sampler = data.ShardBatchSampler(LENGTHS, SIZES, batch_size=4, seed=0, pack_tokens=100)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert len(epoch0) == len(sampler) == len(epoch1)
    for batches in (epoch0, epoch1):
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(sum(SIZES)))  # every row once: nothing dropped, nothing padded
        assert all(LENGTHS[b].sum() <= 100 for b in batches)
        starts = np.cumsum([0] + SIZES)
        assert all(len({np.searchsorted(starts, i, side="right") for i in b}) == 1 for b in batches)  # one shard
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1)) and epoch0 != epoch1  # same bins, new order
    fill = LENGTHS.sum() / (len(epoch0) * 100)
    assert fill > 0.9, fill  # first-fit decreasing leaves little of the budget unused
    again = data.ShardBatchSampler(LENGTHS, SIZES, batch_size=4, seed=0, pack_tokens=100)
    assert list(again) == epoch0
    again.resume_at(len(epoch0) + 3)
    assert list(again) == epoch1[3:]


def test_a_row_longer_than_the_budget_is_named_with_the_fix():
    lengths = np.array([10, 20, 30, 80, 12])
    with pytest.raises(ValueError, match=r"row 0 of shard 1 has 80 tokens .* more than pack_tokens = 64 .*"
                                         r"set pack_tokens to at least 80"):
        data.ShardBatchSampler(lengths, [3, 2], batch_size=2, seed=0, pack_tokens=64)
    with pytest.raises(ConfigError, match="pack_tokens must be >= 0"):
        TrainConfig(pack_tokens=-1)


def test_packed_training_runs_and_matches_its_own_rerun(tmp_path, monkeypatch):
    """A real Lightning run with pack_tokens: each step's batch is one packed row; two runs are identical."""
    from pipeline import training

    tokenizer = toy_task.build_tokenizer()
    rows = _rows(len(tokenizer), n=16)
    cfg = OpdConfig(steps=4, lr=1e-2, loss="opd+topk_fkl", pack_tokens=32)
    seen, step = [], DistillModule.training_step

    def run(name):
        model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
        training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg,
                       tmp_path / name, loss=cfg.loss)
        return [p.detach().clone() for p in model.parameters()]

    def record(self, batch, batch_idx):
        seen.append(batch["input_ids"].shape)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DistillModule, "training_step", record)
    first = run("a")
    monkeypatch.undo()
    assert len(seen) == 4 and all(shape[0] == 1 and 1 < shape[1] <= 32 for shape in seen)
    assert all(torch.equal(a, b) for a, b in zip(first, run("b")))
