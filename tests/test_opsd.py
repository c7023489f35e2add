"""Self-distillation with privileged context: teacher_logprobs.model (teacher or the SFT student) and
teacher_logprobs.teacher_prompt (the scorer's own prompt, filled in with the prompt's text and reference answer),
their provenance, the checks of the opd stage that read it, and the refusals."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from data_schemas import SchemaError, teacher_cache
from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from pipeline import models, shards
from pipeline.config import ConfigError, TeacherLogprobsConfig, from_dict
from pipeline.inspect_cache import summarise
from pipeline.prompts import fill_teacher_prompt, prompts_sha256
from stages import opd, teacher_logprobs
from tests.conftest import TINY_PARAMS, section

TEMPLATE = "{prompt}{answer}{prompt}"
"""In the toy tokenizer's characters: the question, its worked answer, the question again; the response follows."""


def _cfg(**overrides) -> TeacherLogprobsConfig:
    return dataclasses.replace(section("teacher_logprobs"), **overrides)


def _score(run_dir, out, cfg: TeacherLogprobsConfig, **kwargs) -> int:
    return teacher_logprobs.run(cfg, section("engine"), run_dir / "models/base", run_dir / "data/rollouts", out,
                                sft_model=run_dir / "models/sft", prompts_dir=run_dir / "data/prompts", **kwargs)


@pytest.fixture(scope="module")
def opsd_cache(tiny_run, tmp_path_factory):
    """The tiny run's rollouts scored by the SFT student under TEMPLATE (self-distillation)."""
    out = tmp_path_factory.mktemp("opsd") / "teacher_cache"
    _score(tiny_run, out, _cfg(model="sft", teacher_prompt=TEMPLATE))
    return out


def _direct_check(run_dir, cache_dir, model_dir, prompt_ids_of) -> None:
    """Every row of `cache_dir` equals `model_dir`'s own forward pass on prompt_ids_of(row) + the response: the
    sampled tokens' log-probs, and at every position the top-k ids and (float16) log-probs."""
    cache, _ = shards.read_shards(cache_dir, teacher_cache)
    rollouts, _ = shards.read_shards(run_dir / "data/rollouts", rollouts_schema)
    k = teacher_cache.k_of(cache)
    model = models.load_model(model_dir)
    for row, cached in zip(rollouts.to_pylist(), cache.to_pylist()):
        prompt = prompt_ids_of(row)
        ids = torch.tensor([prompt + row["response_ids"]], device=model.device)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0]
        positions = torch.arange(len(row["response_ids"])) + len(prompt) - 1
        expected = logprobs[positions, torch.tensor(row["response_ids"])]
        assert cached["teacher_token_logprobs"] == pytest.approx(expected.tolist(), abs=1e-5)
        top = logprobs[positions].topk(k)
        assert cached["teacher_topk_ids"] == top.indices.tolist()
        # float16 rounds to within 2^-11 relative; the rest is float32 summation order (packed vs one sequence)
        assert cached["teacher_topk_logprobs"] == [pytest.approx(v, rel=1e-3, abs=1e-3) for v in top.values.tolist()]


def _templated_ids(run_dir):
    """The templated prompt ids, built by hand: the toy prompts are plain text (no chat template), so the ids are
    the tokenizer's encoding of prompt + answer + prompt."""
    table, _ = shards.read_shards(run_dir / "data/prompts", prompts_schema)
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    tokenizer = models.load_tokenizer(run_dir / "models/sft")

    def ids(row):
        prompt = rows[row["prompt_id"]]
        return tokenizer(prompt["prompt"] + prompt["answer"] + prompt["prompt"])["input_ids"]

    return ids


def test_templated_scores_are_the_sft_students_own_forward_on_the_templated_ids(tiny_run, opsd_cache):
    _direct_check(tiny_run, opsd_cache, tiny_run / "models/sft", _templated_ids(tiny_run))
    _, provenance = shards.read_shards(opsd_cache, teacher_cache)
    assert provenance["scorer"] == "sft" and provenance["teacher_prompt"] == TEMPLATE
    assert provenance["teacher"] == models.identity(models.describe("sft", tiny_run / "models/sft"))
    assert provenance["prompts_sha256"] == shards.files_sha256(shards.list_shards(tiny_run / "data/prompts"))


def test_the_teacher_scores_under_the_template_too(tiny_run, tmp_path):
    _score(tiny_run, tmp_path / "cache", _cfg(teacher_prompt=TEMPLATE))
    teacher = models.read_manifest(tiny_run / "models/base")["teacher"]
    _direct_check(tiny_run, tmp_path / "cache", teacher["path"], _templated_ids(tiny_run))


def test_model_sft_without_a_template_scores_the_students_prompt_ids_with_the_sft_model(tiny_run, tmp_path):
    _score(tiny_run, tmp_path / "cache", _cfg(model="sft"))
    _direct_check(tiny_run, tmp_path / "cache", tiny_run / "models/sft", lambda row: row["prompt_ids"])


def test_no_template_scores_exactly_as_without_the_new_inputs(tiny_run, tmp_path):
    """Defaults (model teacher, teacher_prompt null), given --sft-model and --prompts as dvc.yaml passes them: the
    same shards, bit for bit in every column, as the tiny run's cache scored without them, but the rows' domain,
    which the prompts give (add; null without them)."""
    assert _score(tiny_run, tmp_path / "cache", _cfg()) > 0
    fresh, reference = shards.list_shards(tmp_path / "cache"), shards.list_shards(tiny_run / "data/teacher_cache")
    assert [p.name for p in fresh] == [p.name for p in reference]
    for a, b in zip(fresh, reference):
        table, without = pq.read_table(a), pq.read_table(b)
        assert set(table["domain"].to_pylist()) == {"add"} and set(without["domain"].to_pylist()) == {None}
        assert table.drop_columns(["domain"]).equals(without.drop_columns(["domain"]))
        provenance = shards.read_shard(a, teacher_cache)[1]
        assert provenance.pop("prompts_sha256") == prompts_sha256(tiny_run / "data/prompts")
        assert provenance == shards.read_shard(b, teacher_cache)[1]
    provenance = shards.read_shard(fresh[0], teacher_cache)[1]
    assert provenance["scorer"] == "teacher" and provenance["teacher_prompt"] is None


def test_a_changed_template_or_scorer_makes_the_cache_stale(run_copy, tmp_path):
    """Like any other provenance field: refused without --replace-stale, every shard rescored with it, and the
    result equals a fresh run's."""
    cache = run_copy / "data/teacher_cache"
    count = len(shards.list_shards(cache))
    for cfg in (_cfg(teacher_prompt=TEMPLATE), _cfg(teacher_prompt="{answer}{prompt}"),
                _cfg(model="sft", teacher_prompt="{answer}{prompt}")):
        with pytest.raises(SchemaError, match="another configuration.*--replace-stale"):
            _score(run_copy, cache, cfg)
        assert _score(run_copy, cache, cfg, replace_stale=True) == count
        assert _score(run_copy, cache, cfg) == 0  # resumed: nothing left to do
    _score(run_copy, tmp_path / "fresh", cfg)
    for path in shards.list_shards(tmp_path / "fresh"):
        assert pq.read_table(path).equals(pq.read_table(cache / path.name))
    assert summarise(cache)["teacher_prompt"] == "{answer}{prompt}" and summarise(cache)["scorer"] == "sft"


def test_opd_trains_on_a_self_distilled_cache_and_refuses_it_from_another_student(run_copy, opsd_cache):
    """The teacher-consistency guard: a cache the SFT student scored is consistent with OPD from that student
    (whatever teacher wrote the SFT data), not with OPD from another model (here the control, the SFT student
    trained further)."""
    refresh = opd.Refresh(section("rollouts"), _cfg(model="sft", teacher_prompt=TEMPLATE), section("engine"),
                          run_copy / "models/base", run_copy / "data/prompts")
    opd.run(section("opd"), run_copy / "models/sft", run_copy / "data/rollouts", opsd_cache, run_copy / "models/opsd",
            refresh=refresh)
    provenance = models.read_provenance(run_copy / "models/opsd")
    assert provenance["cache_scorer"] == "sft" and provenance["cache_teacher_prompt"] == TEMPLATE
    assert provenance["cache_teacher"]["weights_sha256"] == models.weights_hash(run_copy / "models/sft")
    with pytest.raises(ConfigError, match="self-distillation inconsistency.*--sft-model .*models/control"):
        opd.run(section("opd"), run_copy / "models/control", run_copy / "data/rollouts", opsd_cache,
                run_copy / "models/opd2", refresh=refresh)


def test_opd_refuses_a_cache_scored_otherwise_than_the_params_say(run_copy, opsd_cache):
    args = (run_copy / "models/sft", run_copy / "data/rollouts")
    for cfg, said in ((_cfg(), "teacher_logprobs.model 'sft' \\(params: 'teacher'\\)"),
                      (_cfg(model="sft", teacher_prompt="{prompt}{answer}"),
                       "teacher_prompt '{prompt}{answer}{prompt}' \\(params: '{prompt}{answer}'\\)")):
        refresh = opd.Refresh(section("rollouts"), cfg, section("engine"), run_copy / "models/base",
                              run_copy / "data/prompts")
        with pytest.raises(ConfigError, match=f"scored with .*{said}.*stale.*dvc repro teacher_logprobs"):
            opd.run(section("opd"), *args, opsd_cache, run_copy / "models/opd2", refresh=refresh)
    # and the default cache under a template param
    refresh = opd.Refresh(section("rollouts"), _cfg(teacher_prompt=TEMPLATE), section("engine"),
                          run_copy / "models/base", run_copy / "data/prompts")
    with pytest.raises(ConfigError, match="teacher_prompt None \\(params: '{prompt}{answer}{prompt}'\\)"):
        opd.run(section("opd"), *args, run_copy / "data/teacher_cache", run_copy / "models/opd2", refresh=refresh)


def test_refresh_rounds_are_scored_by_the_sft_student_under_the_template(run_copy, opsd_cache):
    refresh = opd.Refresh(section("rollouts"), _cfg(model="sft", teacher_prompt=TEMPLATE), section("engine"),
                          run_copy / "models/base", run_copy / "data/prompts")
    cfg = dataclasses.replace(section("opd"), steps=2, refresh_every=1)
    rounds = run_copy / "data/opsd_rounds"
    opd.run(cfg, run_copy / "models/sft", run_copy / "data/rollouts", opsd_cache, run_copy / "models/opsd", rounds,
            refresh)
    _, provenance = shards.read_shards(rounds / "round-001/teacher_cache", teacher_cache)
    assert provenance["scorer"] == "sft" and provenance["teacher_prompt"] == TEMPLATE
    assert provenance["teacher"]["weights_sha256"] == models.weights_hash(run_copy / "models/sft")  # not the student's


def test_a_templated_prompt_too_long_for_the_scorer_is_refused_before_any_shard(tiny_run, tmp_path):
    limit = models.model_config(tiny_run / "models/sft").max_position_embeddings
    filler = "0" * limit
    with pytest.raises(ConfigError) as error:
        _score(tiny_run, tmp_path / "cache", _cfg(model="sft", teacher_prompt="{prompt}" + filler))
    message = str(error.value)
    rollouts, _ = shards.read_shard(shards.list_shards(tiny_run / "data/rollouts")[0], rollouts_schema)
    first = rollouts.slice(0, 1).to_pylist()[0]
    prompt_tokens = len(first["prompt_ids"]) + limit  # the prompt's ids (BOS included) and the filler
    response_tokens = len(first["response_ids"])
    for part in (f"prompt_id {first['prompt_id']!r}", f"has {prompt_tokens} tokens and its response {response_tokens}",
                 f"{prompt_tokens + response_tokens} in all, over the {limit} positions",
                 "Fix: shorten teacher_logprobs.teacher_prompt"):
        assert part in message, (part, message)
    assert not (tmp_path / "cache").exists()


def test_unknown_placeholders_and_malformed_templates_are_refused_at_config_load(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("teacher_logprobs: {teacher_prompt: '{prompt} Reference: {solution}'}\n")
    from pipeline.config import load_section

    with pytest.raises(ConfigError, match=r"teacher_logprobs: teacher_logprobs.teacher_prompt .* unknown "
                                          r"placeholder\(s\) \{solution\}; the placeholders are \{prompt\} and "
                                          r"\{answer\}"):
        load_section("teacher_logprobs", path)
    for template, problem in (("{prompt} {0}", "unknown placeholder"), ("{prompt} {}", "unknown placeholder"),
                              ("{prompt.upper}", "unknown placeholder"), ("{prompt", "not a valid template"),
                              ("{prompt} }", "not a valid template"), ("{prompt!r}", "format spec or conversion"),
                              ("{answer:>9}{prompt}", "format spec or conversion"), ("{answer}", "has no {prompt}")):
        with pytest.raises(ConfigError, match=problem):
            from_dict(TeacherLogprobsConfig, {"teacher_prompt": template}, "teacher_logprobs")
    with pytest.raises(ConfigError, match="model must be one of"):
        from_dict(TeacherLogprobsConfig, {"model": "student"}, "teacher_logprobs")
    cfg = from_dict(TeacherLogprobsConfig, {"model": "sft", "teacher_prompt": "{{x}} {prompt} {answer}"}, "t")
    assert fill_teacher_prompt(cfg.teacher_prompt, {"prompt_id": "p", "prompt": "1+1", "answer": "2"},
                               tmp_path) == "{x} 1+1 2"


def test_a_template_showing_a_missing_answer_is_refused_with_the_prompt_id(tmp_path):
    row = {"prompt_id": "p7", "prompt": "1+1", "answer": None}
    assert fill_teacher_prompt("Q: {prompt}", row, tmp_path) == "Q: 1+1"
    with pytest.raises(ConfigError, match="prompt_id 'p7' has no reference answer.*Fix: give every prompt an answer"):
        fill_teacher_prompt("{prompt} {answer}", row, tmp_path)


def test_the_inputs_a_setting_needs_are_named_and_rollouts_of_other_prompts_refused(tiny_run, tmp_path):
    from stages import prompts

    args = (section("engine"), tiny_run / "models/base", tiny_run / "data/rollouts", tmp_path / "cache")
    with pytest.raises(ConfigError, match="model is sft, but no SFT model was given. Fix: pass --sft-model"):
        teacher_logprobs.run(_cfg(model="sft"), *args, prompts_dir=tiny_run / "data/prompts")
    with pytest.raises(ConfigError, match="no prompts were given to fill it in. Fix: pass --prompts"):
        teacher_logprobs.run(_cfg(teacher_prompt=TEMPLATE), *args, sft_model=tiny_run / "models/sft")
    task = dataclasses.replace(section("task"), seed=1)
    prompts.run(task, tmp_path / "other_prompts")
    with pytest.raises(SchemaError, match="sampled from other prompts than .*other_prompts"):
        teacher_logprobs.run(_cfg(teacher_prompt=TEMPLATE), *args, prompts_dir=tmp_path / "other_prompts")
    assert not (tmp_path / "cache").exists()


def test_the_stage_command_line_takes_the_settings_as_dvc_runs_it(tiny_run, opsd_cache, tmp_path, capsys):
    out = tmp_path / "cache"
    teacher_logprobs.main(["--params", str(TINY_PARAMS), "--models", str(tiny_run / "models/base"),
                           "--rollouts", str(tiny_run / "data/rollouts"), "--out", str(out),
                           "--sft-model", str(tiny_run / "models/sft"), "--prompts", str(tiny_run / "data/prompts"),
                           "--set", "teacher_logprobs.model=sft",
                           "--set", f"teacher_logprobs.teacher_prompt='{TEMPLATE}'"])
    for path in shards.list_shards(opsd_cache):
        assert pq.read_table(out / path.name).equals(pq.read_table(path))
    summary = summarise(out)
    assert summary["scorer"] == "sft" and summary["teacher_prompt"] == TEMPLATE
