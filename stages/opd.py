r"""Offline on-policy distillation: train the SFT student against the cached teacher signal only.

    python -m stages.opd --params params.yaml --sft-model models/sft --rollouts data/rollouts \
        --teacher-cache data/teacher_cache --models models/base --prompts data/prompts \
        --rounds data/opd_rounds --out models/opd

No teacher is loaded: the loss (opd.loss) uses the teacher log-probs and top-k stored by the
teacher_logprobs stage. With `opd.refresh_every: N` training runs in rounds of N optimizer steps:
round 0 trains on that offline cache; before each later round the current student samples the next
prompts and the teacher scores them (the rollouts and teacher_logprobs stages' code and params), the
new shards are written under `--rounds` as `round-<r>/{rollouts,teacher_cache}` with full
provenance, and training moves on to them. N = 1 is standard online OPD. A killed run resumes from
the last finished round (or the last checkpoint) and writes exactly what an uninterrupted run does.
Training refuses a cache scored by another teacher than the one that wrote
the SFT data (the paper's teacher-consistency condition, checked domain by domain with models.teachers;
self-distilled, teacher_logprobs.model sft: by another
model than this SFT student), a cache scored otherwise than teacher_logprobs now says (scorer, teacher
prompt), a teacher whose tokenizer differs from the student's, a cache of other rollouts, a top_k above
the cache's k, and opd.topk_support union on rollouts without the behaviour top-k (rollouts.student_top_k 0).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import cache, cli, data, engines, models, shards, training
from pipeline.config import ConfigError, EngineConfig, OpdConfig, RolloutsConfig, TeacherLogprobsConfig, load_section
from pipeline.prompts import read_split
from stages import rollouts as rollouts_stage
from stages import teacher_logprobs as teacher_stage

log = logging.getLogger("opd")


@dataclass
class Refresh:
    """What refresh rounds (opd.refresh_every > 0) need besides the offline inputs."""

    rollouts: RolloutsConfig
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
    """The rows of each round: round 0 the offline cache; before each later round (opd.refresh_every) the
    current student samples the next prompts and the teacher scores them, written under `rounds_dir`."""

    def __init__(self, cfg: OpdConfig, offline: tuple[data.ShardedRows, list[int]], check, refresh: Refresh | None,
                 rounds_dir: Path | None, tokenizer, sft_model: Path):
        """`offline`: round 0's rows and lengths (open_cache); `check(provenance)` vets a new round's cache;
        `sft_model`: the scorer with teacher_logprobs.model sft."""
        self.cfg, self.offline, self.check, self.refresh, self.dir, self.tokenizer = (cfg, offline, check, refresh,
                                                                                     rounds_dir, tokenizer)
        self.sft_model = sft_model
        self.prompts = read_split(refresh.prompts_dir, "opd") if cfg.refresh_every else []
        samples = cfg.refresh_every * cfg.batch_size * cfg.accumulate_grad_batches * cfg.devices
        self.per_round = math.ceil(samples / refresh.rollouts.n) if cfg.refresh_every else 0
        self.teachers = None  # each loaded once, kept for every round
        self.seconds = {"rollouts_s": 0.0, "scoring_s": 0.0}

    def rows(self, round_: int, start_step: int, trainer) -> tuple[data.ShardedRows, list[int]]:
        """pipeline.data.RoundsData's rows of round `round_`, which starts at optimizer step `start_step`."""
        if round_ == 0:
            return self.offline
        if trainer.global_step > start_step:  # resumed inside the round: its data was complete before it began
            dirs = self.dirs(round_)
        else:
            dirs = self.write(round_, trainer.lightning_module.model, start_step)
        rows, lengths, provenance = cache.open_cache(*dirs, self.cfg.max_shards_in_memory,
                                                     student_support=self.cfg.topk_support == "union")
        self.check(provenance)
        return rows, lengths

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
        if self.teachers is None:  # the offline scorers (each domain's teacher; with teacher_logprobs.model sft the
            # SFT student, not this one), loaded by teacher_logprobs when a round first needs them
            self.teachers = engines.LazyEngines(refresh.engine, refresh.teacher_logprobs.top_k)
        teacher_stage.run(refresh.teacher_logprobs, refresh.engine, refresh.models_dir, rollouts_dir, cache_dir,
                          replace_stale=True, engines_=self.teachers, sft_model=self.sft_model,
                          prompts_dir=refresh.prompts_dir)
        self.seconds["scoring_s"] += time.perf_counter() - start
        return rollouts_dir, cache_dir

    def close(self) -> None:
        if self.teachers is not None:
            self.teachers.close()


def run(cfg: OpdConfig, sft_model: Path, rollouts_dir: Path, cache_dir: Path, out: Path,
        rounds_dir: Path | None = None, refresh: Refresh | None = None) -> Path:
    if cfg.refresh_every and (refresh is None or rounds_dir is None):
        raise ConfigError("opd.refresh_every needs --models, --prompts and --rounds (see dvc.yaml's opd stage)")
    union = cfg.topk_support == "union"
    if union and cfg.refresh_every and not refresh.rollouts.student_top_k:
        raise ConfigError("opd.topk_support union with opd.refresh_every: the refresh rounds' rollouts need the "
                          "behaviour top-k too. Fix: set rollouts.student_top_k (e.g. 8), or opd.topk_support: teacher")
    sft_provenance = models.read_provenance(sft_model)
    rows, lengths, cache_provenance = cache.open_cache(rollouts_dir, cache_dir, cfg.max_shards_in_memory,
                                                       models.model_config(sft_model).vocab_size, union)
    sft_weights = models.weights_hash(sft_model)

    def check(provenance: dict) -> None:
        cache.check_consistency(cfg, sft_provenance, provenance, sft_weights, sft_model)

    check(cache_provenance)
    if refresh is not None:  # the cache must be what teacher_logprobs' params score now (refresh rounds score so too)
        cache.check_scoring(refresh.teacher_logprobs, cache_provenance, cache_dir)
    model = models.load_model(sft_model)
    tokenizer = models.load_tokenizer(sft_model)
    rounds = _Rounds(cfg, (rows, lengths), check, refresh, rounds_dir, tokenizer, sft_model)
    num_rounds = math.ceil(cfg.steps / cfg.steps_per_round)
    if rounds_dir is not None:
        _remove_rounds_beyond(rounds_dir, num_rounds)
    batches = data.RoundsData(rounds.rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed, cfg.steps_per_round)
    start = time.perf_counter()
    try:
        training.train(model, batches, cfg, out / "logs", loss=cfg.loss,
                       checkpoint_dir=training.checkpoint_dir_for(out),
                       fingerprint=training.inputs_fingerprint(cfg, sft_weights, [rollouts_dir, cache_dir]),
                       reload_every_epoch=True)
    finally:
        rounds.close()
    seconds = rounds.seconds
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
            "cache_teacher": cache_provenance.get("teacher"),  # null: a teacher per domain (cache_teachers)
            "cache_teachers": {"*" if domain is None else domain: teacher
                               for domain, teacher in cache_provenance["domain_teachers"].items()},
            "cache_scorer": cache_provenance.get("scorer", "teacher"),
            "cache_teacher_prompt": cache_provenance.get("teacher_prompt"),
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
    args = cli.stage_args("opd", __doc__, argv, "sft_model", "rollouts", "teacher_cache", "models", "prompts",
                          "rounds", "out")
    params = args.params
    refresh = Refresh(load_section("rollouts", params), load_section("teacher_logprobs", params),
                      load_section("engine", params), args.models, args.prompts)
    cfg = load_section("opd", params)
    run(cfg, args.sft_model, args.rollouts, args.teacher_cache, args.out, args.rounds, refresh)
    cli.summary(args, f"{cfg.steps:,} steps")


if __name__ == "__main__":
    main()
