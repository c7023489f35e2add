"""collate aligns targets and teacher signal with the positions that predict them; the OPD module logs every term."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from pipeline.data import collate


def test_collate_aligns_response_fields_with_the_predicting_positions():
    rows = [
        {"prompt_ids": [1, 5, 6], "response_ids": [7, 2], "teacher_logprobs": np.array([-0.5, -0.1], np.float32),
         "teacher_topk_ids": np.array([[7, 8], [2, 3]]),
         "teacher_topk_logprobs": np.array([[-0.5, -1], [-0.1, -3]], np.float32)},
        {"prompt_ids": [1, 9], "response_ids": [4, 4, 2], "teacher_logprobs": np.array([-1, -2, -3], np.float32),
         "teacher_topk_ids": np.array([[4, 5], [4, 6], [2, 4]]), "teacher_topk_logprobs": np.zeros((3, 2), np.float32)},
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 4, 4]]
    assert batch["targets"].tolist() == [[5, 6, 7, 2], [9, 4, 4, 2]]
    assert batch["mask"].tolist() == [[False, False, True, True], [False, True, True, True]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # where the mask is on, the target is the response token the teacher fields describe
    assert batch["teacher_logprobs"][0, 2:].tolist() == [-0.5, -0.10000000149011612]
    assert batch["teacher_topk_ids"][1, 1:].tolist() == [[4, 5], [4, 6], [2, 4]]
    assert batch["teacher_topk_ids"].dtype == torch.long
    assert "behavior_logprobs" not in batch


def test_collate_pads_short_rows_on_the_right():
    batch = collate([{"prompt_ids": [1, 5], "response_ids": [2]}, {"prompt_ids": [1, 5, 6, 7], "response_ids": [8, 2]}],
                    pad_id=0)
    assert batch["input_ids"][0].tolist() == [1, 5, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0, 0]
    assert batch["mask"][0].tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("clip_against", ["current", "behavior"])
def test_opd_training_logs_every_term_per_step(tmp_path, clip_against):
    """A real Lightning run of the OPD module on in-memory rows: the CSV log has each loss term, the
    reverse-KL estimate, student entropy, clip fraction and tokens/s at every logged step. Against the
    current student the PPO ratio is 1 and never clipped; against behaviour log-probs far below the
    student's (rho >> 1) and a teacher above them (A > 0), it is."""
    import csv
    import math

    from pipeline import data, models, toy_task, training
    from pipeline.config import OpdConfig, ToyModelConfig

    tokenizer = toy_task.build_tokenizer()
    model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    rows = [{**row, "behavior_logprobs": row["behavior_logprobs"] - 10} for row in _toy_opd_rows(len(tokenizer))]
    cfg = OpdConfig(steps=4, batch_size=4, lr=1e-2, loss="opd+topk_fkl", clip_against=clip_against)
    training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg, tmp_path,
                   loss=cfg.loss)
    with open(tmp_path / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row["train/loss"]]
    assert logged, "nothing was logged"
    for key in ("loss", "opd", "topk_fkl", "clip_fraction", "entropy", "reverse_kl", "tokens_per_s"):
        assert all(math.isfinite(float(row[f"train/{key}"])) for row in logged), key
    clip_fractions = [float(row["train/clip_fraction"]) for row in logged]
    assert max(clip_fractions) > 0 if clip_against == "behavior" else max(clip_fractions) == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _toy_opd_rows(vocab, k=4, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"prompt_ids": rng.integers(3, vocab, 5), "response_ids": rng.integers(3, vocab, r),
         "behavior_logprobs": -rng.random(r).astype(np.float32), "teacher_logprobs": -rng.random(r).astype(np.float32),
         "teacher_topk_ids": rng.integers(0, vocab, (r, k)).astype(np.int32),
         "teacher_topk_logprobs": np.sort(-rng.exponential(1.0, (r, k)), axis=1)[:, ::-1].astype(np.float16)}
        for r in rng.integers(1, 6, n)
    ]


@pytest.mark.parametrize("pack_tokens", [0, 24])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, crash_at_step, pack_tokens):
    """16 rows in batches of 4 (or packed into bins of at most 24 tokens, 6 an epoch): a checkpoint at step 3
    is mid-epoch. A crash at step 5, then a rerun: the final weights equal those of one uninterrupted
    6-step run, bit for bit."""
    from pipeline import data, models, toy_task, training
    from pipeline.config import OpdConfig, ToyModelConfig

    tokenizer = toy_task.build_tokenizer()
    rows = _toy_opd_rows(len(tokenizer))
    cfg = OpdConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, loss="opd+topk_fkl", checkpoint_every=3,
                    pack_tokens=pack_tokens)

    def run(checkpoints):
        model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
        batches = data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
        training.train(model, batches, cfg, tmp_path / "logs", loss=cfg.loss, checkpoint_dir=checkpoints,
                       fingerprint={"run": 1})
        return [p.detach().clone() for p in model.parameters()]

    reference = run(tmp_path / "uninterrupted")
    assert not (tmp_path / "uninterrupted").exists()  # removed once training completed

    crash_at_step(4)  # optimizer step 5
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    monkeypatch.undo()
    resumed = run(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))


def test_a_resumed_run_logs_every_step_once_as_an_uninterrupted_run_does(tmp_path, monkeypatch, crash_at_step):
    """Rows are logged every 10 steps, a checkpoint at step 15; the run crashes at step 22, after logging step 19,
    and its log directory is deleted as dvc deletes a stage's outputs. The rerun's CSV and DVCLive logs equal the
    uninterrupted run's, throughput aside: the rows before the checkpoint kept, the ones after it logged once."""
    from pipeline import data, models, toy_task, training
    from pipeline.config import OpdConfig, ToyModelConfig

    tokenizer = toy_task.build_tokenizer()
    rows = _toy_opd_rows(len(tokenizer))
    cfg = OpdConfig(steps=30, batch_size=4, lr=1e-2, loss="opd+topk_fkl", checkpoint_every=15)

    def run(log_dir, checkpoints):
        model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
        training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg, log_dir,
                       loss=cfg.loss, checkpoint_dir=checkpoints, fingerprint={"run": 1})

    def logs(log_dir):
        with open(log_dir / "metrics.csv") as f:
            table = [{k: v for k, v in row.items() if k != "train/tokens_per_s"} for row in csv.DictReader(f)]
        plots = {p.relative_to(log_dir).as_posix(): p.read_text() for p in (log_dir / "dvclive").rglob("*.tsv")
                 if p.name != "tokens_per_s.tsv"}
        return table, plots

    run(tmp_path / "reference", tmp_path / "ref_ckpt")
    reference = logs(tmp_path / "reference")
    assert [row["step"] for row in reference[0]] == ["9", "19", "29"] and len(reference[1]) > 3

    crash_at_step(22)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "killed", tmp_path / "ckpt")
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "ckpt" / "logs" / "metrics.csv"))] == ["9", "19"]
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "killed", ignore_errors=True)
    run(tmp_path / "killed", tmp_path / "ckpt")
    assert logs(tmp_path / "killed") == reference
    assert not (tmp_path / "ckpt").exists()


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    from pipeline import training

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.ckpt").write_text("stale")
    (tmp_path / "ckpt" / training.FINGERPRINT).write_text('{"run": 0}')
    assert training._checkpoint_to_resume(tmp_path / "ckpt", {"run": 1}) is None
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from pipeline import data, models, toy_task, training
from pipeline.config import OpdConfig, ToyModelConfig
from tests.test_training import _toy_opd_rows

out = Path(sys.argv[1])
tokenizer = toy_task.build_tokenizer()
rows = _toy_opd_rows(len(tokenizer))
cfg = OpdConfig(steps=3, batch_size=2, lr=1e-2, loss="opd+topk_fkl", strategy="ddp", devices=2)
model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
trainer = training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg,
                         out / "logs", loss=cfg.loss)
torch.save({"world": trainer.world_size, "weights": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_one_model(tmp_path):
    """Lightning DDP, 2 processes on the CPU (gloo): each rank trains on its own batches and both
    end with the same weights, changed from the initial ones."""
    import os
    import subprocess
    import sys

    from pipeline import models, toy_task
    from pipeline.config import ToyModelConfig
    from tests.conftest import ROOT

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, also on a GPU machine
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    initial = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), toy_task.build_tokenizer(), seed=0).state_dict()
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    assert any(not torch.equal(v, initial[n]) for n, v in ranks[0]["weights"].items())


FSDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from pipeline import data, models, toy_task, training
from pipeline.config import OpdConfig, ToyModelConfig
from tests.test_training import FSDP_CONFIG, _toy_opd_rows

out = Path(sys.argv[1])
tokenizer = toy_task.build_tokenizer()
cfg = OpdConfig(**FSDP_CONFIG, strategy="fsdp", devices=2)
model = models.build_toy_model(ToyModelConfig(64, 2, 64, 1), tokenizer, seed=0)
trainer = training.train(model, data.in_memory(_toy_opd_rows(len(tokenizer)), cfg.batch_size, tokenizer.pad_token_id,
                                               cfg.seed), cfg, out / "logs", loss=cfg.loss)
torch.save({"world": trainer.world_size, "weights": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")
"""
FSDP_CONFIG = dict(steps=3, lr=1e-2, loss="opd+topk_fkl", loss_chunk_tokens=4, pack_tokens=24,
                   activation_checkpointing=True)


@pytest.mark.slow
def test_fsdp_with_the_chunked_loss_matches_single_process_training(tmp_path):
    """FSDP2 with 2 CPU processes (gloo), the chunked loss (4 positions a chunk), packed batches and activation
    checkpointing: both ranks end with the weights of one process training the same batches with 2-batch
    gradient accumulation (rank r takes every other batch, and FSDP averages the two ranks' gradients as
    accumulation averages two batches'), to float tolerance, and the caller's model holds them unsharded."""
    import os
    import subprocess
    import sys

    from pipeline import data, models, toy_task, training
    from pipeline.config import OpdConfig, ToyModelConfig
    from tests.conftest import ROOT

    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    tokenizer = toy_task.build_tokenizer()
    cfg = OpdConfig(**FSDP_CONFIG, accumulate_grad_batches=2)
    model = models.build_toy_model(ToyModelConfig(64, 2, 64, 1), tokenizer, seed=0)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    training.train(model, data.in_memory(_toy_opd_rows(len(tokenizer)), cfg.batch_size, tokenizer.pad_token_id,
                                         cfg.seed), cfg, tmp_path / "single", loss=cfg.loss)
    for name, value in model.state_dict().items():
        assert not isinstance(ranks[0]["weights"][name], torch.distributed.tensor.DTensor), name
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(value, initial[name]) for name, value in model.state_dict().items())


FSDP_RESUME_SCRIPT = """
import sys
from pathlib import Path
import torch
from pipeline import data, models, toy_task, training
from pipeline.config import OpdConfig, ToyModelConfig
from tests.test_training import FSDP_CONFIG, _toy_opd_rows

out, crash, name = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if crash >= 0:
    step = training.DistillModule.training_step

    def crashing(self, batch, batch_idx):
        if self.global_step == crash:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    training.DistillModule.training_step = crashing
tokenizer = toy_task.build_tokenizer()
cfg = OpdConfig(**{**FSDP_CONFIG, "steps": 6}, strategy="fsdp", devices=2, checkpoint_every=2)
model = models.build_toy_model(ToyModelConfig(64, 2, 64, 1), tokenizer, seed=0)
trainer = training.train(model, data.in_memory(_toy_opd_rows(len(tokenizer)), cfg.batch_size, tokenizer.pad_token_id,
                                               cfg.seed), cfg, out / "logs", loss=cfg.loss, checkpoint_dir=out / name,
                         fingerprint={"run": 1})
torch.save(model.state_dict(), out / f"{name}{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_fsdp_training_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """FSDP2 on 2 CPU processes saves sharded (torch.distributed.checkpoint) checkpoints every 2 steps; a crash
    at step 4 and a rerun end with the weights of an uninterrupted 6-step run, bit for bit."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "fsdp_resume.py"
    script.write_text(FSDP_RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}

    def run(crash, name):
        return subprocess.run([sys.executable, str(script), str(tmp_path), str(crash), name], cwd=ROOT, env=env,
                              capture_output=True, text=True)

    assert (done := run(-1, "uninterrupted")).returncode == 0, done.stderr[-3000:]
    assert run(3, "ckpt").returncode != 0  # optimizer step 4
    assert (tmp_path / "ckpt" / "last.ckpt").is_dir()  # one shard file per rank
    assert (done := run(-1, "ckpt")).returncode == 0, done.stderr[-3000:]
    reference, resumed = (torch.load(tmp_path / f"{name}0.pt") for name in ("uninterrupted", "ckpt"))
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    assert not (tmp_path / "ckpt").exists()  # removed once training completed


def test_training_sees_each_epoch_of_the_sampler_once_in_order(tmp_path, monkeypatch):
    """Across epoch boundaries the batches are exactly the sampler's epochs 0, 1, 2, ... (a dataloader
    reloaded or re-iterated by Lightning must not skip or repeat an epoch's order)."""
    from pipeline import data, models, toy_task, training
    from pipeline.config import ToyModelConfig, TrainConfig

    tokenizer = toy_task.build_tokenizer()
    rows = [{"prompt_ids": [1, 3 + i % 7], "response_ids": [3 + i % 11, 2]} for i in range(40)]
    cfg = TrainConfig(steps=10, batch_size=8)  # 5 batches an epoch: 10 steps cross two boundaries
    seen = []
    step = training.DistillModule.training_step

    def record(self, batch, batch_idx):
        seen.append(batch["input_ids"].tolist())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(training.DistillModule, "training_step", record)
    model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
    training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg, tmp_path)
    sampler = data.ShardBatchSampler([4] * len(rows), [len(rows)], cfg.batch_size, cfg.seed)
    expected = [index for epoch in range(2) for index in sampler._batches(epoch)]
    assert seen == [data.collate([rows[i] for i in batch], tokenizer.pad_token_id)["input_ids"].tolist()
                    for batch in expected]
