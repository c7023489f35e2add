"""Lightning wiring for every training stage: SFT (toy teacher, student) and OPD against the cache.

The module only wires model, batch and loss (pipeline/losses.py); the loop, precision, clipping,
accumulation and devices are Lightning's.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline import losses, progress
from pipeline.config import TrainConfig

log = logging.getLogger(__name__)


class DistillModule(L.LightningModule):
    """A causal LM trained on collated batches with its config's objective (pipeline.losses.Objective)."""

    def __init__(self, model, cfg: TrainConfig, loss: str | None = None):
        """``loss`` (one of pipeline.losses.LOSSES) in place of the config's own: opd.loss, or sft for a TrainConfig."""
        super().__init__()
        self.model, self.cfg = model, cfg
        self.objective = losses.Objective(cfg.objective(loss))
        self._tokens, self._t0 = 0, None
        if cfg.loss_chunk_tokens:  # the chunked loss applies the LM head's weight and bias, nothing more
            config = model.config
            if any(getattr(config, key, None) not in (None, 1.0)
                   for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
                raise ValueError(f"{config.model_type} transforms its LM head's output: train with loss_chunk_tokens 0")

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """The objective's dict for a collated batch. Called as self(batch), so that under FSDP2 this module,
        the root of the sharding (configure_model), has its parameters (embeddings, final norm, LM head)
        gathered for it, and the chunked loss reads the whole LM head."""
        # Packed batches (pipeline.data.collate) come with position_ids and no attention_mask, from which
        # transformers builds attention within each sequence, but only without a KV cache: use_cache off.
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        inputs["use_cache"] = False
        if self.cfg.loss_chunk_tokens:
            # The loss makes the logits of loss_chunk_tokens response positions at a time: never [B, T, V].
            head = self.model.get_output_embeddings()
            student = dict(hidden=self.model.base_model(**inputs).last_hidden_state, lm_head_weight=head.weight,
                           lm_head_bias=head.bias, chunk_size=self.cfg.loss_chunk_tokens)
        else:
            student = dict(student_logits=self.model(**inputs).logits)
        # the loss, each term, clip_fraction, entropy and reverse_kl, all logged by training_step
        return self.objective(
            **student,
            targets=batch["targets"],
            mask=batch["mask"],
            behavior_logprobs=batch.get("behavior_logprobs"),
            teacher_logprobs=batch.get("teacher_logprobs"),
            teacher_topk_ids=batch.get("teacher_topk_ids"),
            teacher_topk_logprobs=batch.get("teacher_topk_logprobs"),
            behavior_topk_ids=batch.get("behavior_topk_ids"),
            teacher_behavior_topk_logprobs=batch.get("teacher_behavior_topk_logprobs"),
        )

    def training_step(self, batch, batch_idx):
        out = self(batch)
        self._tokens += int(batch["mask"].sum())
        self._t0 = self._t0 or time.perf_counter()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        logs = {f"train/{k}": v for k, v in out.items()}
        logs["train/tokens_per_s"] = self._tokens / elapsed
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=batch["input_ids"].shape[0])
        self.log("loss", out["loss"], prog_bar=True, on_step=True, logger=False)
        self.log("tokens/s", logs["train/tokens_per_s"], prog_bar=True, on_step=True, logger=False)
        return out["loss"]

    def configure_model(self):
        """Activation checkpointing, and under fsdp the sharding: FSDP2's fully_shard on each decoder layer, then
        on this module, the root, which holds the rest (embeddings, final norm, LM head) and gathers it for
        forward (self(batch)); the root's parameters are not resharded between forward and backward."""
        if self.cfg.activation_checkpointing:
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        if self.cfg.strategy != "fsdp" or isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        # bf16-mixed: layers gathered and computed in bf16, gradients reduced in float32 (FSDP2's mixed precision)
        bf16 = self.trainer.precision == "bf16-mixed"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in [m for m in self.model.modules() if type(m).__name__ in self.model._no_split_modules]:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self, mesh=mesh, mp_policy=policy)

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


def train(model, data: L.LightningDataModule, cfg: TrainConfig, log_dir: Path, loss: str = "sft",
          checkpoint_dir: Path | None = None, fingerprint: dict | None = None, callbacks: list | None = None,
          reload_every_epoch: bool = False):
    """Train `model` in place on `data` for `cfg.steps` optimizer steps; CSV logs go to `log_dir`.

    With `cfg.checkpoint_every` and a `checkpoint_dir`, Lightning saves `last.ckpt` there every N
    steps and a rerun resumes from it exactly (weights, optimizer, schedule, position in the data),
    but only if it was written for the same `fingerprint` (config and inputs); otherwise it is
    deleted. The directory is removed once training completes. `callbacks`: more Lightning callbacks (a bench's).
    `reload_every_epoch`: ask `data` for a new dataloader each epoch (pipeline.data.RoundsData's rounds).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    callbacks, resume_from = list(callbacks or []), None
    checkpointing = bool(cfg.checkpoint_every and checkpoint_dir is not None)
    live_logs = Path(log_dir)
    if checkpointing:
        resume_from = _checkpoint_to_resume(Path(checkpoint_dir), fingerprint or {})
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=cfg.checkpoint_every,
                                         save_top_k=0, save_last=True))
        # dvc deletes a stage's outputs, log_dir among them, before it reruns a killed stage: a checkpointed run
        # logs beside its checkpoints, which survive, so a resumed run's logs hold every step; they move to
        # log_dir when training completes
        live_logs = Path(checkpoint_dir) / "logs"
        if resume_from is not None:
            callbacks.append(TrimLogs(live_logs))
        elif rank_zero_only.rank == 0:  # DDP workers start later, beside a running rank 0: they leave its logs be
            shutil.rmtree(live_logs, ignore_errors=True)
    # On a terminal Lightning's bar; in a log its carriage returns would make one endless line: log lines there.
    terminal = progress.is_terminal()
    if not terminal:
        callbacks.append(LogProgress())
    strategy = cfg.strategy
    if strategy == "fsdp":  # FSDP2 over every device: data parallel, no tensor parallel
        strategy = ModelParallelStrategy(data_parallel_size=cfg.devices * cfg.num_nodes, tensor_parallel_size=1)
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="auto",
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        # the CSV log flushed at every logged step, so that a kill loses none of the rows before its checkpoint
        logger=[L.pytorch.loggers.CSVLogger(str(live_logs), name="", version="", flush_logs_every_n_steps=1),
                _dvclive_logger(live_logs, resume_from)],
        log_every_n_steps=min(10, cfg.steps),
        callbacks=callbacks,
        use_distributed_sampler=False,  # ShardBatchSampler gives each replica its own batches
        # An OPD refresh round is an epoch, on data sampled as it begins. Only then: a reload re-iterates the
        # finished loader, which would move the epoch order of a ShardBatchSampler that counts its own passes.
        reload_dataloaders_every_n_epochs=int(reload_every_epoch),
        enable_checkpointing=checkpointing,
        enable_model_summary=False,
        enable_progress_bar=terminal,
        deterministic=True,
    )
    # fsdp shards the module it trains in place (DTensor parameters): it trains a copy, whose full weights
    # are copied back into `model` at the end, so that the caller saves a plain model; `model` waits on the CPU.
    module = DistillModule(copy.deepcopy(model) if cfg.strategy == "fsdp" else model, cfg, loss)
    if module.model is not model:
        model.to("cpu")
    model.train()
    with warnings.catch_warnings():
        # ShardedData resumes from the restored step count, which Lightning cannot see
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        # a resumed run: TrimLogs hands the rows of the run it continues back to the CSV logger
        warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    if module.model is not model:
        # every rank gathers each parameter (a collective), one at a time, onto the CPU
        model.load_state_dict({name: (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
                               for name, value in module.model.state_dict().items()})
    model.eval()
    if checkpointing and trainer.is_global_zero:
        shutil.copytree(live_logs, log_dir, dirs_exist_ok=True)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return trainer


class TrimLogs(L.Callback):
    """A resumed run keeps the rows its killed run logged before the checkpoint it resumes from and drops the rest:
    it logs those steps again. Rows of step s come from the optimizer step that made global_step s + 1. Lightning's
    CSV logger deletes the metrics.csv it finds when it starts, so its rows are read first and handed back to it."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        path = log_dir / "metrics.csv"
        self.csv_rows = list(csv.DictReader(path.open(newline=""))) if path.exists() else []

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for path in sorted((self.log_dir / "dvclive" / "plots").rglob("*.tsv")):
            header, *rows = path.read_text().splitlines(keepends=True)
            column = header.rstrip("\n").split("\t").index("step")
            path.write_text("".join([header, *(row for row in rows if int(row.split("\t")[column]) < step)]))
        writer = next(lg for lg in trainer.loggers if isinstance(lg, L.pytorch.loggers.CSVLogger)).experiment
        writer.metrics[:0] = [row for row in self.csv_rows if int(row["step"]) < step]


class LogProgress(L.Callback):
    """Training progress as periodic log lines (pipeline.progress): step/max_steps, loss, tokens/s, ETA.
    Tokens are this process's response tokens (with DDP, one replica's share)."""

    def on_train_start(self, trainer, pl_module):
        # initial: a resumed run's rate and ETA count only the steps it trains now
        self.progress = progress.Progress("train", trainer.max_steps, "steps", initial=trainer.global_step, tty=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            # with gradient accumulation a batch may end without an optimizer step: n = 0, its tokens still count
            loss = trainer.callback_metrics.get("loss")
            values = {} if loss is None else {"loss": float(loss)}
            self.progress.update(trainer.global_step - self.progress.done, tokens=int(batch["mask"].sum()), **values)


def _dvclive_logger(log_dir: Path, resume_from: str | None):
    """Per-step metrics as DVCLive TSV files under `log_dir/dvclive/plots/metrics`, which dvc.yaml's
    `plots` show (`dvc plots show`)."""
    from dvclive import Live
    from dvclive.lightning import DVCLiveLogger

    class FilesOnlyLive(Live):
        """DVCLive's files without its repository integration: the stage already runs under dvc, whose
        dvc.yaml declares the plots. (That integration runs `dvc init` in a git repository without DVC,
        and fails in a git repository without commits.)"""

        def _init_dvc(self):
            self._dvc_file = self._init_dvc_file()

    live = FilesOnlyLive(dir=str(Path(log_dir) / "dvclive"), resume=resume_from is not None, save_dvc_exp=False,
                         dvcyaml=None, report=None)
    return DVCLiveLogger(experiment=live)


FINGERPRINT = "fingerprint.json"


def checkpoint_dir_for(out: Path) -> Path:
    """Where a training stage keeps its checkpoints: beside its output, which dvc deletes before a rerun."""
    return Path(out).with_name(Path(out).name + ".checkpoints")


def inputs_fingerprint(cfg: TrainConfig, weights_sha256: str, data_dirs: list[Path]) -> dict:
    """What a checkpoint must match to be resumed: the config, the starting weights, the data shards."""
    from pipeline import shards

    return {"config": vars(cfg), "weights": weights_sha256,
            "data": [shards.file_sha256(path) for d in data_dirs for path in shards.list_shards(d)]}


def _checkpoint_to_resume(checkpoint_dir: Path, fingerprint: dict) -> str | None:
    """`last.ckpt` if it was written for this fingerprint; a stale checkpoint directory is deleted."""
    recorded = checkpoint_dir / FINGERPRINT
    wanted = json.dumps(fingerprint, sort_keys=True, default=str)
    if checkpoint_dir.exists() and (not recorded.exists() or recorded.read_text() != wanted):
        log.warning("%s: checkpoints of another configuration or input; deleting them", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(wanted)
    last = checkpoint_dir / "last.ckpt"
    if last.exists():
        log.info("%s: resuming from its last checkpoint", last)
        return str(last)
    return None
