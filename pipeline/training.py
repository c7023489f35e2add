"""Lightning wiring for every training stage: SFT (toy teacher, student) and OPD against the cache.

The module only wires model, batch and loss (pipeline/losses.py); the loop, precision, clipping,
accumulation and devices are Lightning's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import losses
from pipeline.config import OpdConfig, TrainConfig


RESPONSE_FIELDS = ("behavior_logprobs", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
"""Optional per-response-token row fields, placed at the response's positions by `collate`."""


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs and per-position targets/teacher signal (positions = inputs).

    Position t of `input_ids` predicts `targets[t]`; only response tokens are in `mask`.
    Optional row fields: `behavior_logprobs` [R], `teacher_logprobs` [R], `teacher_topk_ids`/
    `teacher_topk_logprobs` [R, k], all aligned with `response_ids`. Rows may hold lists or numpy
    arrays; the batch is assembled in numpy (slice copies, no per-token Python) and shared with torch.
    """
    prompt_lens = [len(r["prompt_ids"]) for r in rows]
    seq_lens = [p + len(r["response_ids"]) for p, r in zip(prompt_lens, rows)]
    width = max(seq_lens) - 1
    tokens = np.full((len(rows), width + 1), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    present = [key for key in RESPONSE_FIELDS if key in rows[0]]
    fields = {
        key: np.zeros((len(rows), width, *np.shape(rows[0][key])[1:]),
                      dtype=np.int64 if key == "teacher_topk_ids" else np.float32)
        for key in present
    }
    for i, (row, p, n) in enumerate(zip(rows, prompt_lens, seq_lens)):
        tokens[i, :p] = row["prompt_ids"]
        tokens[i, p:n] = row["response_ids"]
        attention[i, : n - 1] = 1
        mask[i, p - 1 : n - 1] = True  # position p - 1 predicts the first response token
        for key in present:
            fields[key][i, p - 1 : n - 1] = row[key]
    inputs = np.where(attention == 1, tokens[:, :-1], pad_id)
    batch = {"input_ids": inputs, "attention_mask": attention, "targets": np.ascontiguousarray(tokens[:, 1:]), "mask": mask}
    return {key: torch.from_numpy(value) for key, value in {**batch, **fields}.items()}


class SequenceData(L.LightningDataModule):
    """In-memory rows (dicts of token lists and teacher arrays), reshuffled each epoch by seed."""

    def __init__(self, rows: list[dict], batch_size: int, pad_id: int, seed: int):
        super().__init__()
        if not rows:
            raise ValueError("no training rows: the input artefact is empty")
        self.rows, self.batch_size, self.pad_id, self.seed = rows, batch_size, pad_id, seed

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.rows) >= self.batch_size,
            generator=generator,
            collate_fn=lambda rows: collate(rows, self.pad_id),
        )


class DistillModule(L.LightningModule):
    """A causal LM trained with one of pipeline.losses.LOSSES on collated batches."""

    def __init__(self, model, cfg: TrainConfig, loss: str = "sft"):
        super().__init__()
        self.model, self.cfg, self.loss_name = model, cfg, loss
        self._tokens, self._t0 = 0, None

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        opd = isinstance(self.cfg, OpdConfig)
        topk_ids, topk_lp = batch.get("teacher_topk_ids"), batch.get("teacher_topk_logprobs")
        if opd and self.cfg.top_k is not None and topk_ids is not None:
            topk_ids, topk_lp = topk_ids[..., : self.cfg.top_k], topk_lp[..., : self.cfg.top_k]
        out = losses.compute_loss(
            self.loss_name,
            student_logits=logits,
            targets=batch["targets"],
            mask=batch["mask"],
            teacher_logprobs=batch.get("teacher_logprobs"),
            teacher_topk_ids=topk_ids,
            teacher_topk_logprobs=topk_lp,
            clip_eps=self.cfg.clip_eps if opd else None,
            sft_weight=self.cfg.sft_weight if opd else 0.0,
        )
        self._tokens += int(batch["mask"].sum())
        self._t0 = self._t0 or time.perf_counter()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        logs = {f"train/{k}": v for k, v in out.items()}
        logs["train/tokens_per_s"] = self._tokens / elapsed
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=batch["input_ids"].shape[0])
        self.log("loss", out["loss"], prog_bar=True, on_step=True, logger=False)
        return out["loss"]

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if not cfg.decay:
                return 1.0
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(model, rows: list[dict], cfg: TrainConfig, pad_id: int, log_dir: Path, loss: str = "sft"):
    """Train `model` in place for `cfg.steps` optimizer steps; CSV logs go to `log_dir`."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="auto",
        devices=1,
        precision=precision,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        logger=L.pytorch.loggers.CSVLogger(str(log_dir), name="", version=""),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        deterministic=True,
    )
    module = DistillModule(model, cfg, loss)
    model.train()
    trainer.fit(module, datamodule=SequenceData(rows, cfg.batch_size, pad_id, cfg.seed))
    model.eval()
    return trainer
