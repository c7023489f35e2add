"""Offline on-policy distillation: train the SFT student against the cached teacher signal only.

    python -m stages.opd --params params.yaml --sft-model models/sft --rollouts data/rollouts --teacher-cache data/teacher_cache --models models/base --prompts data/prompts --rounds data/opd_rounds --out models/opd

No teacher is loaded: the loss (opd.loss) uses the teacher log-probs and top-k stored by the
teacher_logprobs stage. With `opd.refresh_every: N` training runs in rounds of N optimizer steps:
round 0 trains on that offline cache; before each later round the current student samples the next
prompts and the teacher scores them (the rollouts and teacher_logprobs stages' code and params), the
new shards are written under `--rounds` as `round-<r>/{rollouts,teacher_cache}` with full
provenance, and training moves on to them. N = 1 is standard online OPD. A killed run resumes from
the last finished round (or the last checkpoint) and writes exactly what an uninterrupted run does. Training refuses a cache scored by another teacher than the one that wrote
the SFT data (the paper's teacher-consistency condition), a teacher whose tokenizer differs from the
student's, a cache of other rollouts, and a top_k above the cache's k.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_schemas import SchemaError, teacher_cache
from data_schemas import rollouts as rollouts_schema
from pipeline import cli, data, engines, models, shards, training
from pipeline.config import (ConfigError, EngineConfig, OpdConfig, SamplingConfig, TeacherLogprobsConfig,
                             load_section)
from stages import rollouts as rollouts_stage
from stages import teacher_logprobs as teacher_stage
from stages.prompts import read_split

log = logging.getLogger("opd")


def _read_pair(rollout_path: Path, cache_path: Path) -> tuple[pa.Table, pa.Table, dict]:
    """One rollout shard and its cache shard, validated, checked to belong together, aligned row by row."""
    rollouts, _ = shards.read_shard(rollout_path, rollouts_schema)
    cache, provenance = shards.read_shard(cache_path, teacher_cache)
    if provenance.get("rollouts_sha256") != shards.file_sha256(rollout_path):
        raise SchemaError(
            f"{cache_path} was scored from other rollouts than {rollout_path}. "
            f"Fix: rerun the teacher_logprobs stage on these rollouts.",
            cache_path,
        )
    teacher_cache.check_aligned(cache, rollouts, cache_path, rollout_path)
    return rollouts, cache, provenance


def shard_rows(rollouts: pa.Table, cache: pa.Table) -> list[dict]:
    """Training rows of one shard pair: per-row numpy views (tokens, behaviour and teacher signal)."""
    k = teacher_cache.k_of(cache)
    columns = {
        "prompt_ids": data.row_arrays(rollouts["prompt_ids"]),
        "response_ids": data.row_arrays(rollouts["response_ids"]),
        "behavior_logprobs": data.row_arrays(rollouts["behavior_logprobs"]),
        "teacher_logprobs": data.row_arrays(cache["teacher_token_logprobs"]),
        "teacher_topk_ids": data.row_arrays(cache["teacher_topk_ids"], k),
        "teacher_topk_logprobs": data.row_arrays(cache["teacher_topk_logprobs"], k),
    }
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def open_cache(rollouts_dir: Path, cache_dir: Path, max_shards_in_memory: int = 8, vocab_size: int | None = None):
    """Check every shard pair before training starts (a bad shard fails now, not hours in): each one's
    checksum, schema, alignment and k, and with `vocab_size` (the student's) its top-k ids. Returns the
    streaming dataset over them, each row's length (for bucketing) and the cache's provenance."""
    cache_paths = shards.list_shards(cache_dir)
    rollout_paths = shards.list_shards(rollouts_dir)
    if len(cache_paths) != len(rollout_paths) or not cache_paths:
        raise SchemaError(
            f"{cache_dir} has {len(cache_paths)} shards but {rollouts_dir} has {len(rollout_paths)}: "
            f"the cache is incomplete or from other rollouts. Fix: rerun the teacher_logprobs stage.",
            cache_dir,
        )
    sizes, lengths, cache_provenance, first_k = [], [], None, None
    for rollout_path, cache_path in zip(rollout_paths, cache_paths):
        rollouts, cache, provenance = _read_pair(rollout_path, cache_path)
        k = teacher_cache.k_of(cache, cache_path)
        first_k = first_k or k
        if k != first_k or provenance.get("k") != k:
            raise SchemaError(f"{cache_path} holds top-k {k} (its provenance says {provenance.get('k')}) but "
                              f"{cache_paths[0]} holds {first_k}: the shards come from different runs. "
                              f"Fix: delete {cache_dir} and rerun the teacher_logprobs stage.", cache_path)
        if vocab_size is not None:
            teacher_cache.check_ids_below(cache, vocab_size, cache_path)
        sizes.append(rollouts.num_rows)
        lengths.extend(pc.add(pc.list_value_length(rollouts["prompt_ids"]),
                              pc.list_value_length(rollouts["response_ids"])).to_pylist())
        cache_provenance = cache_provenance or provenance
    def load(i: int) -> list[dict]:  # checked above: while training, a shard is only read again
        return shard_rows(shards.read_shard(rollout_paths[i], rollouts_schema)[0],
                          shards.read_shard(cache_paths[i], teacher_cache)[0])

    dataset = data.ShardedRows(sizes, load, max_shards_in_memory)
    return dataset, lengths, cache_provenance


def check_consistency(cfg: OpdConfig, sft_provenance: dict, cache_provenance: dict) -> None:
    """Refuse a cache whose teacher differs from the SFT-data teacher, whose tokenizer differs from the
    student's, or whose k is too small."""
    sft_teacher, cache_teacher = sft_provenance["sft_data_teacher"], cache_provenance["teacher"]
    if sft_teacher["weights_sha256"] != cache_teacher["weights_sha256"]:
        message = (
            f"teacher inconsistency: the SFT data was written by {sft_teacher['id']} "
            f"(weights {sft_teacher['weights_sha256'][:12]}) but the cache was scored by {cache_teacher['id']} "
            f"(weights {cache_teacher['weights_sha256'][:12]}). Fix: rerun teacher_logprobs with the SFT teacher, "
            f"or set opd.allow_teacher_mismatch: true to train anyway (biased; recorded in the metrics)."
        )
        if not cfg.allow_teacher_mismatch:
            raise ConfigError(message)
        log.warning("%s (allowed by opd.allow_teacher_mismatch)", message)
    student_tok, teacher_tok = sft_provenance["base"]["tokenizer_sha256"], cache_teacher["tokenizer_sha256"]
    if student_tok != teacher_tok:
        raise ConfigError(
            f"tokenizer mismatch: the student ({sft_provenance['base']['id']}, tokenizer {student_tok[:12]}) and the "
            f"cache's teacher ({cache_teacher['id']}, tokenizer {teacher_tok[:12]}) map tokens to different ids, so "
            f"the cached top-k ids mean other tokens to the student. Fix: use a student and teacher of one "
            f"tokenizer family (same vocabulary and token-to-id mapping) in the models section."
        )
    if cfg.top_k is not None and cfg.top_k > cache_provenance["k"]:
        raise ConfigError(
            f"opd.top_k is {cfg.top_k} but the teacher cache holds k={cache_provenance['k']}. "
            f"Fix: lower opd.top_k, or raise teacher_logprobs.top_k and rerun teacher_logprobs."
        )


@dataclass
class Refresh:
    """What refresh rounds (opd.refresh_every > 0) need besides the offline inputs."""

    rollouts: SamplingConfig
    teacher_logprobs: TeacherLogprobsConfig
    engine: EngineConfig
    models_dir: Path
    prompts_dir: Path


ROUNDS_MANIFEST = "rounds.json"


def round_prompts(prompts: list[dict], round_: int, count: int) -> list[dict]:
    """Round r >= 1 samples the next `count` prompts, cycling through the opd split (round 0 is the
    offline cache, which covers all of it)."""
    count = min(count, len(prompts))
    start = (round_ - 1) * count
    return [prompts[(start + i) % len(prompts)] for i in range(count)]


class _Rounds:
    """Writes the data of refresh rounds: the current student samples, the teacher scores."""

    def __init__(self, cfg: OpdConfig, refresh: Refresh, rounds_dir: Path, tokenizer):
        self.refresh, self.dir, self.tokenizer = refresh, rounds_dir, tokenizer
        self.prompts = read_split(refresh.prompts_dir, "opd")
        samples = cfg.refresh_every * cfg.batch_size * cfg.accumulate_grad_batches * cfg.devices
        self.per_round = math.ceil(samples / refresh.rollouts.n)
        self.teacher = None  # loaded once, kept for every round
        self.seconds = {"rollouts_s": 0.0, "scoring_s": 0.0}

    def dirs(self, round_: int) -> tuple[Path, Path]:
        return self.dir / f"round-{round_:03d}" / "rollouts", self.dir / f"round-{round_:03d}" / "teacher_cache"

    def write(self, round_: int, student, step: int) -> tuple[Path, Path]:
        """Round `round_`'s rollouts from `student` (the weights at optimizer step `step`) and their scores;
        finished shards of an interrupted earlier attempt are kept."""
        rollouts_dir, cache_dir = self.dirs(round_)
        refresh = self.refresh
        start = time.perf_counter()
        # The policy is saved as a model directory so that any engine samples it and the rollouts
        # record its weights hash; it is deleted after (the training checkpoints hold its weights).
        policy = self.dir / f"round-{round_:03d}" / f"student-step-{step:06d}"
        shutil.rmtree(policy, ignore_errors=True)
        models.save_model(student, self.tokenizer, policy)
        rollouts_stage.run(refresh.rollouts, refresh.engine, policy, refresh.prompts_dir, rollouts_dir, round_=round_,
                           replace_stale=True, prompts=round_prompts(self.prompts, round_, self.per_round))
        shutil.rmtree(policy)
        self.seconds["rollouts_s"] += time.perf_counter() - start
        start = time.perf_counter()
        if self.teacher is None:
            teacher = models.read_manifest(refresh.models_dir)["teacher"]
            self.teacher = engines.load_engine(teacher["path"], refresh.engine, refresh.teacher_logprobs.top_k)
        teacher_stage.run(refresh.teacher_logprobs, refresh.engine, refresh.models_dir, rollouts_dir, cache_dir,
                          replace_stale=True, engine=self.teacher)
        self.seconds["scoring_s"] += time.perf_counter() - start
        return rollouts_dir, cache_dir

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()


class RoundsData(L.LightningDataModule):
    """OPD batches, one round per Lightning epoch (the trainer reloads the data every epoch): round r
    is `opd.steps_per_round` optimizer steps on the offline cache (r = 0) or on the rollouts the current
    student samples, and the teacher scores, as the round begins."""

    reload_every_epoch = True  # training.train reloads the data each epoch: the next round

    def __init__(self, cfg: OpdConfig, offline: tuple[data.ShardedRows, list[int]], pad_id: int, check,
                 rounds: _Rounds | None):
        """`offline`: round 0's rows and lengths (open_cache); `check(provenance)` vets a new round's cache."""
        super().__init__()
        self.cfg, self.offline, self.pad_id, self.check, self.rounds = cfg, offline, pad_id, check, rounds

    def train_dataloader(self):
        trainer, cfg = self.trainer, self.cfg
        round_ = trainer.current_epoch
        start_step = round_ * cfg.steps_per_round
        if round_ == 0:
            rows, lengths = self.offline
        else:
            if trainer.global_step > start_step:  # resumed inside the round: its data was complete before it began
                dirs = self.rounds.dirs(round_)
            else:
                dirs = self.rounds.write(round_, trainer.lightning_module.model, start_step)
            rows, lengths, provenance = open_cache(*dirs, cfg.max_shards_in_memory)
            self.check(provenance)
        return data.batch_loader(rows, lengths, cfg.batch_size, self.pad_id, cfg.seed, trainer, start_step,
                                 cfg.steps_per_round * trainer.accumulate_grad_batches)


def run(cfg: OpdConfig, sft_model: Path, rollouts_dir: Path, cache_dir: Path, out: Path,
        rounds_dir: Path | None = None, refresh: Refresh | None = None) -> Path:
    if cfg.refresh_every and (refresh is None or rounds_dir is None):
        raise ConfigError("opd.refresh_every needs --models, --prompts and --rounds (see dvc.yaml's opd stage)")
    sft_provenance = models.read_provenance(sft_model)
    rows, lengths, cache_provenance = open_cache(rollouts_dir, cache_dir, cfg.max_shards_in_memory,
                                                 models.model_config(sft_model).vocab_size)
    check_consistency(cfg, sft_provenance, cache_provenance)
    model = models.load_model(sft_model)
    tokenizer = models.load_tokenizer(sft_model)
    rounds = _Rounds(cfg, refresh, rounds_dir, tokenizer) if cfg.refresh_every else None
    num_rounds = math.ceil(cfg.steps / cfg.steps_per_round)
    if rounds_dir is not None:
        _remove_rounds_beyond(rounds_dir, num_rounds)
    batches = RoundsData(cfg, (rows, lengths), tokenizer.pad_token_id,
                         lambda provenance: check_consistency(cfg, sft_provenance, provenance), rounds)
    start = time.perf_counter()
    try:
        training.train(model, batches, cfg, out / "logs", loss=cfg.loss, checkpoint_dir=training.checkpoint_dir_for(out),
                       fingerprint=training.inputs_fingerprint(cfg, models.weights_hash(sft_model), [rollouts_dir, cache_dir]))
    finally:
        if rounds is not None:
            rounds.close()
    seconds = rounds.seconds if rounds else {"rollouts_s": 0.0, "scoring_s": 0.0}
    seconds["training_s"] = time.perf_counter() - start - seconds["rollouts_s"] - seconds["scoring_s"]
    models.save_model(model, tokenizer, out)
    (out / "timings.json").write_text(json.dumps(seconds, indent=2) + "\n")
    record = [_round_record(r, (rollouts_dir, cache_dir) if r == 0 else rounds.dirs(r), cfg) for r in range(num_rounds)]
    if rounds_dir is not None:
        rounds_dir.mkdir(parents=True, exist_ok=True)
        (rounds_dir / ROUNDS_MANIFEST).write_text(json.dumps({"refresh_every": cfg.refresh_every, "rounds": record},
                                                             indent=2) + "\n")
    models.write_provenance(
        out,
        {
            "stage": "opd",
            "base": sft_provenance,
            "sft_data_teacher": sft_provenance["sft_data_teacher"],
            "cache_teacher": cache_provenance["teacher"],
            "teacher_mismatch_allowed": cfg.allow_teacher_mismatch,
            "rounds": num_rounds,
            "config": vars(cfg),
        },
    )
    log.info("%s: OPD student trained for %d steps in %d round(s), on %d rollouts (loss %s)", out, cfg.steps,
             num_rounds, sum(r["rows"] for r in record), cfg.loss)
    return out


def _round_record(round_: int, dirs: tuple[Path, Path], cfg: OpdConfig) -> dict:
    steps_per_round = cfg.steps_per_round
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in shards.list_shards(dirs[0]))
    return {"round": round_, "steps": [round_ * steps_per_round, min((round_ + 1) * steps_per_round, cfg.steps)],
            "rows": rows, "rollouts": str(dirs[0]), "teacher_cache": str(dirs[1])}


def _remove_rounds_beyond(rounds_dir: Path, num_rounds: int) -> None:
    """Round directories a run with more rounds left behind (dvc keeps this persistent output in place)."""
    for path in sorted(rounds_dir.glob("round-*")):
        if int(path.name.split("-")[1]) >= num_rounds:
            shutil.rmtree(path)


def main(argv=None):
    args = cli.stage_args(__doc__, argv, "sft_model", "rollouts", "teacher_cache", "models", "prompts", "rounds", "out")
    params = args.params
    refresh = Refresh(load_section("rollouts", params), load_section("teacher_logprobs", params),
                      load_section("engine", params), args.models, args.prompts)
    cfg = load_section("opd", params)
    run(cfg, args.sft_model, args.rollouts, args.teacher_cache, args.out, args.rounds, refresh)
    cli.summary(args, f"{cfg.steps:,} steps")


if __name__ == "__main__":
    main()
