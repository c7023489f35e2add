"""Lightning wiring for every training stage: SFT (toy teacher, student) and OPD against the cache.

The module only wires model, batch and loss (pipeline/losses.py); the loop, precision, clipping,
accumulation and devices are Lightning's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch

from pipeline import losses
from pipeline.config import OpdConfig, TrainConfig
from pipeline.data import ShardedData


class DistillModule(L.LightningModule):
    """A causal LM trained with one of pipeline.losses.LOSSES on collated batches."""

    def __init__(self, model, cfg: TrainConfig, loss: str = "sft"):
        super().__init__()
        self.model, self.cfg, self.loss_name = model, cfg, loss
        self._tokens, self._t0 = 0, None

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cfg = self.cfg
        topk_ids, topk_lp = batch.get("teacher_topk_ids"), batch.get("teacher_topk_logprobs")
        options = {}  # the SFT stages train with compute_loss's defaults
        if isinstance(cfg, OpdConfig):
            if cfg.top_k is not None and topk_ids is not None:
                topk_ids, topk_lp = topk_ids[..., : cfg.top_k], topk_lp[..., : cfg.top_k]
            options = dict(
                clip_eps=cfg.clip_eps,
                importance_cap=cfg.importance_cap,
                vopd=cfg.vopd,
                jsd_beta=cfg.jsd_beta,
                tail=cfg.topk_tail,
                token_fraction=cfg.token_fraction,
                token_select=cfg.token_select,
                temperature=cfg.temperature,
                sft_weight=cfg.sft_weight,
            )
        # out: the loss, each term, clip_fraction, entropy and reverse_kl, all logged below.
        out = losses.compute_loss(
            self.loss_name,
            student_logits=logits,
            targets=batch["targets"],
            mask=batch["mask"],
            behavior_logprobs=batch.get("behavior_logprobs"),
            teacher_logprobs=batch.get("teacher_logprobs"),
            teacher_topk_ids=topk_ids,
            teacher_topk_logprobs=topk_lp,
            **options,
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


def train(model, data: ShardedData, cfg: TrainConfig, log_dir: Path, loss: str = "sft"):
    """Train `model` in place on `data` for `cfg.steps` optimizer steps; CSV logs go to `log_dir`."""
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
        log_every_n_steps=min(10, cfg.steps),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        deterministic=True,
    )
    module = DistillModule(model, cfg, loss)
    model.train()
    trainer.fit(module, datamodule=data)
    model.eval()
    return trainer
