"""Each stage's real run() on tiny models: outputs, schemas, provenance, resume and refusals."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from data_schemas import SchemaError, sft_samples, teacher_cache
from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from pipeline import models, shards, toy_task
from pipeline.config import ConfigError
from tests.conftest import ROOT, TINY_PARAMS, section


def test_prompts_are_disjoint_splits_with_answers(tiny_run):
    table, provenance = shards.read_shards(tiny_run / "data/prompts", prompts_schema)
    rows = table.to_pylist()
    task = section("task")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("teacher_train", "sft", "opd", "eval")}
    assert counts == {"teacher_train": task.teacher_train_prompts, "sft": task.sft_prompts,
                      "opd": task.opd_prompts, "eval": task.eval_prompts}
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert all(r["answer"] == toy_task.solve(r["prompt"]) for r in rows)
    assert provenance["config"]["n_digits"] == task.n_digits


def test_models_manifest_records_hashes_and_loads(tiny_run):
    manifest = models.read_manifest(tiny_run / "models/base")
    for role in ("teacher", "student"):
        info = manifest[role]
        assert info["weights_sha256"] == models.weights_hash(info["path"])
        assert len(info["tokenizer_sha256"]) == 64
        model = models.load_model(info["path"])
        assert model.config.vocab_size == len(toy_task.build_tokenizer())
    assert manifest["teacher"]["tokenizer_sha256"] == manifest["student"]["tokenizer_sha256"]


def test_sft_data_holds_teacher_answers(tiny_run):
    table, provenance = shards.read_shards(tiny_run / "data/sft", sft_samples)
    manifest = models.read_manifest(tiny_run / "models/base")
    assert provenance["teacher"]["weights_sha256"] == manifest["teacher"]["weights_sha256"]
    eos = toy_task.build_tokenizer().eos_token_id
    assert table.num_rows > 0
    assert all(r[-1] == eos for r in table["response_ids"].to_pylist())
    assert len(shards.list_shards(tiny_run / "data/sft")) == 3  # 24 prompts, 10 per shard


def test_rollouts_have_logprobs_and_finish_reasons(tiny_run):
    table, provenance = shards.read_shards(tiny_run / "data/rollouts", rollouts_schema)
    cfg = section("rollouts")
    assert table.num_rows == section("task").opd_prompts * cfg.n
    assert sorted(set(table["sample_idx"].to_pylist())) == list(range(cfg.n))
    for row in table.to_pylist():
        assert len(row["behavior_logprobs"]) == len(row["response_ids"]) <= cfg.max_new_tokens
        assert all(lp <= 0 for lp in row["behavior_logprobs"])
        assert row["finish_reason"] == ("stop" if row["response_ids"][-1] == 2 else "length")
    assert provenance["logprob_mode"] == "raw"


def test_rollout_logprobs_match_the_policy(tiny_run):
    """The stored behaviour log-probs are the policy's own log-probs of the sampled tokens."""
    import torch

    table, _ = shards.read_shards(tiny_run / "data/rollouts", rollouts_schema)
    model = models.load_model(tiny_run / "models/sft")
    row = table.slice(0, 1).to_pylist()[0]
    ids = torch.tensor([row["prompt_ids"] + row["response_ids"]], device=model.device)  # cuda where present
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0]
    p = len(row["prompt_ids"])
    expected = [logprobs[p - 1 + j, tok].item() for j, tok in enumerate(row["response_ids"])]
    assert row["behavior_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_teacher_cache_matches_a_direct_teacher_forward(tiny_run):
    import torch

    cache, provenance = shards.read_shards(tiny_run / "data/teacher_cache", teacher_cache)
    rollouts, _ = shards.read_shards(tiny_run / "data/rollouts", rollouts_schema)
    k = section("teacher_logprobs").top_k
    assert teacher_cache.k_of(cache) == k == provenance["k"]
    teacher = models.load_model(models.read_manifest(tiny_run / "models/base")["teacher"]["path"])
    for i in (0, rollouts.num_rows - 1):
        row, cached = rollouts.slice(i, 1).to_pylist()[0], cache.slice(i, 1).to_pylist()[0]
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]], device=teacher.device)
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(ids).logits.float(), -1)[0]
        p = len(row["prompt_ids"])
        positions = range(p - 1, p - 1 + len(row["response_ids"]))
        expected = [logprobs[t, tok].item() for t, tok in zip(positions, row["response_ids"])]
        assert cached["teacher_token_logprobs"] == pytest.approx(expected, abs=1e-5)
        top = logprobs[p - 1].topk(k)
        assert cached["teacher_topk_ids"][0] == top.indices.tolist()
        assert cached["teacher_topk_logprobs"][0] == pytest.approx(top.values.tolist(), abs=2e-3)  # float16


def test_teacher_cache_is_readable_with_polars(tiny_run):
    k = section("teacher_logprobs").top_k
    frame = pl.scan_parquet(str(tiny_run / "data/teacher_cache" / "*.parquet")).collect()
    assert frame.schema["teacher_topk_ids"] == pl.List(pl.Array(pl.Int32, k))
    assert frame.schema["teacher_topk_logprobs"] == pl.List(pl.Array(pl.Float16, k))
    assert frame.schema["teacher_token_logprobs"] == pl.List(pl.Float32)
    lengths = frame.select(pl.col("teacher_token_logprobs").list.len()).to_series()
    assert (lengths == frame.select(pl.col("teacher_topk_ids").list.len()).to_series()).all()


def test_opd_and_evaluate_outputs(tiny_run):
    provenance = models.read_provenance(tiny_run / "models/opd")
    assert provenance["cache_teacher"] == provenance["sft_data_teacher"]
    assert models.weights_hash(tiny_run / "models/opd") != models.weights_hash(tiny_run / "models/sft")
    metrics = json.loads((tiny_run / "metrics/eval.json").read_text())
    assert metrics["n_prompts"] == section("task").eval_prompts
    for role in ("teacher", "sft_student", "control", "opd_student"):
        assert 0.0 <= metrics[role]["accuracy"] <= 1.0
        assert metrics[role]["mean_response_tokens"] > 0


def test_control_is_the_sft_student_trained_on_the_teachers_answers_to_the_opd_prompts_with_opds_settings(tiny_run):
    """Equal compute: the control starts from the SFT student and trains with the opd section's TrainConfig."""
    from pipeline.config import TrainConfig

    data, provenance = shards.read_shards(tiny_run / "data/control_sft", sft_samples)
    prompts, _ = shards.read_shards(tiny_run / "data/prompts", prompts_schema)
    opd_ids = {r["prompt_id"] for r in prompts.to_pylist() if r["split"] == "opd"}
    assert provenance["split"] == "opd" and set(data["prompt_id"].to_pylist()) <= opd_ids
    assert provenance["teacher"] == models.identity(models.read_manifest(tiny_run / "models/base")["teacher"])
    control = models.read_provenance(tiny_run / "models/control")
    assert control["stage"] == "control"
    assert control["base"]["weights_sha256"] == models.weights_hash(tiny_run / "models/sft")
    assert control["config"] == vars(section("opd").training())
    assert models.weights_hash(tiny_run / "models/control") != models.weights_hash(tiny_run / "models/sft")
    assert set(control["config"]) == set(TrainConfig.__dataclass_fields__)


def test_rerun_of_a_finished_stage_recomputes_nothing(run_copy):
    from stages import teacher_logprobs

    before = {p: p.stat().st_mtime_ns for p in (run_copy / "data/teacher_cache").glob("*.parquet")}
    written = teacher_logprobs.run(section("teacher_logprobs"), section("engine"), run_copy / "models/base",
                                   run_copy / "data/rollouts", run_copy / "data/teacher_cache")
    assert written == 0
    assert before == {p: p.stat().st_mtime_ns for p in (run_copy / "data/teacher_cache").glob("*.parquet")}


def test_changed_config_refuses_stale_shards_or_replaces_them_when_asked(run_copy, tmp_path):
    from stages import teacher_logprobs

    cfg = section("teacher_logprobs")
    cfg.top_k = 3
    args = (cfg, section("engine"), run_copy / "models/base", run_copy / "data/rollouts")
    with pytest.raises(SchemaError, match="another configuration.*--replace-stale"):
        teacher_logprobs.run(*args, run_copy / "data/teacher_cache")
    written = teacher_logprobs.run(*args, run_copy / "data/teacher_cache", replace_stale=True)
    assert written == len(list((run_copy / "data/teacher_cache").glob("*.parquet")))  # every shard recomputed
    teacher_logprobs.run(*args, tmp_path / "fresh")
    for path in sorted((tmp_path / "fresh").glob("*.parquet")):
        assert pq.read_table(path).equals(pq.read_table(run_copy / "data/teacher_cache" / path.name))


KILL_AFTER = """
import os, signal, sys
import pipeline.shards as shards
stop_at = int(sys.argv[1]); real_replace = os.replace; done = []
def replace(src, dst):
    if len(done) == stop_at:  # die with the shard written under its temp name, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst); done.append(dst)
shards.os.replace = replace
from stages.teacher_logprobs import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("stop_at", [0, 1, 2])
def test_killed_teacher_logprobs_resumes_to_the_same_cache(run_copy, stop_at):
    cache = run_copy / "data/teacher_cache"
    reference = {p.name: pq.read_table(p) for p in sorted(cache.glob("*.parquet"))}
    for name in list(reference)[stop_at:]:
        (cache / name).unlink()  # the state of a run killed earlier: keep shards before `stop_at`
    args = ["--params", str(TINY_PARAMS), "--models", str(run_copy / "models/base"),
            "--rollouts", str(run_copy / "data/rollouts"), "--out", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, "0", *args], env=env, cwd=ROOT, capture_output=True)
    assert killed.returncode == -9
    assert len(list(cache.glob("*.parquet"))) == stop_at  # the killed write left no final shard
    assert list(cache.glob(".part-*"))  # but a temp file
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.parquet")}
    subprocess.run([sys.executable, "-m", "stages.teacher_logprobs", *args], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    assert not list(cache.glob(".part-*"))
    assert {n: (cache / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not recomputed
    resumed = {p.name: pq.read_table(p) for p in sorted(cache.glob("*.parquet"))}
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert resumed[name].equals(reference[name])


def _run_and_kill(args: list[str], env: dict, after_writes: int, delay: float) -> int:
    """Start a stage and SIGKILL it `delay` seconds after its `after_writes`-th finished shard (0: after
    it logged that it started): a kill at an arbitrary moment of the write loop, mid-write included."""
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        seen += "wrote shard" in line
        if seen >= after_writes:
            time.sleep(delay)
            proc.kill()
            break
    proc.communicate()
    return proc.returncode


@pytest.mark.parametrize("stage", ["rollouts", "teacher_logprobs"])
def test_kill_at_random_moments_then_rerun_gives_the_uninterrupted_result(tiny_run, tmp_path, stage):
    """Fault injection: kill -9 at several random moments, checking after each kill that every final
    shard on disk is complete and exact; a last rerun must end with exactly the uninterrupted output."""
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["rollouts"]["rows_per_shard"] = 2  # 10 shards: many moments to die between and inside writes
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rollout_args = ["stages.rollouts", "--params", str(params_file), "--policy", str(tiny_run / "models/sft"),
                    "--prompts", str(tiny_run / "data/prompts")]
    subprocess.run([*[sys.executable, "-m"], *rollout_args, "--out", str(tmp_path / "rollouts")], env=env, cwd=ROOT,
                   check=True)
    if stage == "rollouts":
        args, reference_dir = rollout_args, tmp_path / "rollouts"
    else:
        args = ["stages.teacher_logprobs", "--params", str(params_file), "--models", str(tiny_run / "models/base"),
                "--rollouts", str(tmp_path / "rollouts")]
        reference_dir = tmp_path / "reference"
        subprocess.run([sys.executable, "-m", *args, "--out", str(reference_dir)], env=env, cwd=ROOT, check=True)
    reference = {p.name: pq.read_table(p) for p in sorted(reference_dir.glob("*.parquet"))}
    assert len(reference) == 10
    out = tmp_path / "killed"
    rng = random.Random(f"{stage}-0")
    points = sorted(rng.sample(range(1, 9), 3))  # shards finished before each kill, then a random delay
    for after in points:
        done = len(list(out.glob("*.parquet")))
        assert _run_and_kill([*args, "--out", str(out)], env, after - done, rng.uniform(0, 0.02)) == -9
        assert done <= len(list(out.glob("*.parquet")))  # killed while running, keeping its finished shards
        for path in out.glob("*.parquet"):  # whatever the kill interrupted, no final shard is partial
            assert pq.read_table(path).equals(reference[path.name])
    subprocess.run([sys.executable, "-m", *args, "--out", str(out)], env=env, cwd=ROOT, check=True, capture_output=True)
    assert not [p for p in out.iterdir() if p.suffix != ".parquet"]  # no temp file left behind
    resumed = {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert resumed[name].equals(reference[name])


def test_opd_refuses_a_cache_from_another_teacher(run_copy):
    from stages import opd

    path = run_copy / "models/sft" / models.PROVENANCE
    provenance = json.loads(path.read_text())
    provenance["sft_data_teacher"]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(provenance))
    args = (run_copy / "models/sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
            run_copy / "models/opd2")
    with pytest.raises(ConfigError, match="teacher inconsistency.*allow_teacher_mismatch"):
        opd.run(section("opd"), *args)
    cfg = section("opd")
    cfg.allow_teacher_mismatch = True
    opd.run(cfg, *args)
    assert models.read_provenance(run_copy / "models/opd2")["teacher_mismatch_allowed"] is True


def test_opd_refuses_a_teacher_with_another_tokenizer(run_copy):
    from stages import opd

    path = run_copy / "models/sft" / models.PROVENANCE
    provenance = json.loads(path.read_text())
    provenance["base"]["tokenizer_sha256"] = "f" * 64
    path.write_text(json.dumps(provenance))
    with pytest.raises(ConfigError, match="tokenizer mismatch.*same vocabulary and token-to-id mapping"):
        opd.run(section("opd"), run_copy / "models/sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
                run_copy / "models/opd2")


def test_tokenizer_hash_sees_the_token_to_id_mapping(tmp_path):
    tokenizer = toy_task.build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "a")
    swapped = toy_task.build_tokenizer()
    vocab = swapped.get_vocab()
    assert models.tokenizer_hash(tmp_path / "a") == models.tokenizer_hash(tmp_path / "a")
    from tokenizers import models as tok_models

    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]  # same tokens, two ids swapped
    swapped.backend_tokenizer.model = tok_models.WordLevel(vocab, unk_token="<unk>")
    swapped.save_pretrained(tmp_path / "b")
    assert models.tokenizer_hash(tmp_path / "a") != models.tokenizer_hash(tmp_path / "b")


def test_opd_refuses_top_k_above_the_cache(run_copy):
    from stages import opd

    cfg = section("opd")
    cfg.top_k = section("teacher_logprobs").top_k + 1
    with pytest.raises(ConfigError, match="opd.top_k"):
        opd.run(cfg, run_copy / "models/sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
                run_copy / "models/opd2")


def test_opd_refuses_a_cache_of_other_rollouts(run_copy):
    from stages import opd

    first = shards.shard_path(run_copy / "data/rollouts", 0)
    table = pq.read_table(first)
    first.unlink()
    shards.write_parquet(table.slice(1), first)  # other rollouts under the same name
    with pytest.raises(SchemaError, match="other rollouts"):
        opd.run(section("opd"), run_copy / "models/sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
                run_copy / "models/opd2")


def test_cli_lists_stages_and_runs_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listing = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")]
    assert names == ["prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "control_data", "control",
                     "opd", "evaluate", "inspect"]
    out = tmp_path / "prompts"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "prompts", "--params", str(TINY_PARAMS), "--out", str(out)],
                   env=env, check=True, capture_output=True)
    assert shards.read_shards(out, prompts_schema)[0].num_rows == 254


def test_models_stage_records_real_models_by_path(tiny_run, tmp_path):
    """Configured (non-toy) models are resolved and recorded with their hashes, not copied or trained."""
    from stages import models as models_stage

    teacher_dir, student_dir = tiny_run / "models/base/teacher", tiny_run / "models/base/student"
    cfg = section("models")
    cfg.teacher, cfg.student = str(teacher_dir), str(student_dir)
    manifest = models_stage.run(cfg, section("task"), tiny_run / "data/prompts", tmp_path / "base")
    assert manifest["teacher"]["path"] == str(teacher_dir)
    assert manifest["teacher"]["weights_sha256"] == models.weights_hash(teacher_dir)
    assert models.read_manifest(tmp_path / "base")["student"]["path"] == str(student_dir)
    assert not (tmp_path / "base" / "teacher").exists()


def test_missing_local_model_is_named(tmp_path):
    with pytest.raises(ConfigError,
                       match="models.teacher: model directory .*nope does not exist.*Fix: set models.teacher"):
        models.resolve_model_dir(str(tmp_path / "nope"), "models.teacher")


@pytest.mark.parametrize("num_workers", [2, 3])
def test_sharded_workers_write_exactly_the_rows_of_one_worker(tiny_run, tmp_path, num_workers):
    from stages import rollouts, teacher_logprobs

    engine, cfg = section("engine"), section("rollouts")
    for worker in range(num_workers):
        rollouts.run(cfg, engine, tiny_run / "models/sft", tiny_run / "data/prompts", tmp_path / "rollouts",
                     worker=(worker, num_workers))
    for worker in reversed(range(num_workers)):  # order does not matter
        teacher_logprobs.run(section("teacher_logprobs"), engine, tiny_run / "models/base", tmp_path / "rollouts",
                             tmp_path / "cache", worker=(worker, num_workers))
    for name in ("rollouts", "teacher_cache"):
        one = sorted((tiny_run / "data" / name).glob("*.parquet"))
        many = sorted((tmp_path / ("cache" if name == "teacher_cache" else name)).glob("*.parquet"))
        assert [p.name for p in many] == [p.name for p in one]
        for a, b in zip(one, many):
            assert pq.read_table(a).equals(pq.read_table(b))


def test_a_worker_writes_only_its_own_shards(tiny_run, tmp_path):
    from stages import rollouts

    written = rollouts.run(section("rollouts"), section("engine"), tiny_run / "models/sft", tiny_run / "data/prompts",
                           tmp_path / "rollouts", worker=(1, 2))
    assert [p.name for p in shards.list_shards(tmp_path / "rollouts")] == ["part-00001.parquet"] and written == 1
    with pytest.raises(ValueError, match="--shard must be in"):
        rollouts.run(section("rollouts"), section("engine"), tiny_run / "models/sft", tiny_run / "data/prompts",
                     tmp_path / "rollouts", worker=(2, 2))


def test_scoring_refuses_incomplete_rollouts(run_copy):
    from stages import teacher_logprobs

    shards.shard_path(run_copy / "data/rollouts", 1).unlink()
    with pytest.raises(SchemaError, match=r"part-00001\.parquet is missing .*the rollouts stage"):
        teacher_logprobs.run(section("teacher_logprobs"), section("engine"), run_copy / "models/base",
                             run_copy / "data/rollouts", run_copy / "cache2")


def test_a_killed_models_stage_resumes_its_teacher_to_the_uninterrupted_weights(tiny_run, tmp_path, monkeypatch,
                                                                                 crash_at_step):
    """The toy teacher's training (the longest stage on a CPU) checkpoints every teacher_training.checkpoint_every
    steps beside models/base; a crash, then a rerun: the teacher of an uninterrupted run, bit for bit."""
    from dataclasses import replace

    from stages import models as models_stage

    cfg = section("models")
    cfg = replace(cfg, teacher_training=replace(cfg.teacher_training, checkpoint_every=20))
    out = tmp_path / "models/base"
    crash_at_step(45)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models_stage.run(cfg, section("task"), tiny_run / "data/prompts", out)
    assert (tmp_path / "models/base.checkpoints/last.ckpt").exists()
    monkeypatch.undo()
    manifest = models_stage.run(cfg, section("task"), tiny_run / "data/prompts", out)
    reference = models.read_manifest(tiny_run / "models/base")["teacher"]["weights_sha256"]
    assert manifest["teacher"]["weights_sha256"] == reference
    assert not (tmp_path / "models/base.checkpoints").exists()  # removed once training completed
