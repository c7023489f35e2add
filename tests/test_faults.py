"""The fault table: bad inputs a user can give, each refused with one line that names the file, key or
row and the fix (exit 2, no traceback), leaving every existing output as it was. README.md lists them."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_schemas import SchemaError
from pipeline import cli, shards, toy_task
from tests.conftest import TINY_PARAMS, section

VOCAB = len(toy_task.build_tokenizer())


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def params_file(tmp_path, text: str | None = None, **changes) -> str:
    """A params file: `text` as is, or the tiny params with `section={key: value}` changes merged in."""
    path = tmp_path / "params.yaml"
    if text is None:
        params = yaml.safe_load(TINY_PARAMS.read_text())
        for section, values in changes.items():
            params.setdefault(section, {}).update(values)
        text = yaml.safe_dump(params)
    path.write_text(text)
    return str(path)


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run `opd <argv>`; it must exit 2 with one error line holding every `expected` string."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{argv[0] if argv and argv[0] in cli.STAGES + tuple(cli.TOOLS) else 'opd'}: error: ")
    for text in expected:
        assert text in line, (text, line)
    return line


def prompts_argv(params: str, run) -> list[str]:
    return ["prompts", "--params", params, "--out", str(run / "data/prompts")]


def write_jsonl(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# -- params -------------------------------------------------------------------------------------------

PARAMS_FAULTS = {
    "unknown key": ({"task": {"n_digitz": 3}}, ["n_digitz", "task"]),
    "wrong type": ({"task": {"n_digits": "eight"}}, ["n_digits", "expected int"]),
    "zero size": ({"task": {"sft_prompts": 0}}, ["sft_prompts must be > 0, got 0"]),
    "negative size": ({"task": {"eval_prompts": -1}}, ["eval_prompts must be > 0, got -1"]),
    "prompts.splits of zero": ({"prompts": {"splits": {"sft": 0, "opd": 10, "eval": 2}}}, ["sft must be > 0"]),
}


@pytest.mark.parametrize("name", PARAMS_FAULTS)
def test_bad_params_values(run_copy, tmp_path, capsys, name):
    changes, expected = PARAMS_FAULTS[name]
    before = snapshot(run_copy)
    refused(capsys, prompts_argv(params_file(tmp_path, **changes), run_copy), "params.yaml", *expected)
    assert snapshot(run_copy) == before


PARAMS_FILES = {
    "invalid YAML": ("task: {n_digits: 2\nprompts: [", ["not valid YAML at line", "Fix: correct the YAML"]),
    "empty file": ("", ["is empty", "must be a mapping of sections", "Fix:"]),
    "a YAML list": ("- task\n- prompts\n", ["is a YAML list", "must be a mapping of sections"]),
    "a bare string": ("just some words\n", ["is a YAML str", "must be a mapping of sections"]),
    "a section that is a value": ("task: 3\n", ["task", "mapping"]),
}


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_bad_params_files(run_copy, tmp_path, capsys, name):
    text, expected = PARAMS_FILES[name]
    before = snapshot(run_copy)
    refused(capsys, prompts_argv(params_file(tmp_path, text), run_copy), "params.yaml", *expected)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("key, value", [("warmup_steps", -5), ("grad_clip", -1.0)])
def test_negative_training_knobs(run_copy, capsys, key, value):
    before = snapshot(run_copy)
    refused(capsys, ["sft", "--params", str(TINY_PARAMS), "--models", str(run_copy / "models/base"), "--sft-data",
                     str(run_copy / "data/sft"), "--out", str(run_copy / "models/sft"), "--set", f"sft.{key}={value}"],
            f"{key} must be >= 0", str(value))
    assert snapshot(run_copy) == before


# -- the command line ---------------------------------------------------------------------------------

def test_no_arguments(capsys):
    refused(capsys, [], "no stage given", "Fix: name one of the stages")


def test_unknown_stage(capsys):
    refused(capsys, ["rolouts"], "unknown stage 'rolouts'", "Fix:")


def test_missing_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["rollouts", "--params", str(TINY_PARAMS)])
    assert exit_.value.code == 2
    assert "the following arguments are required: --policy, --prompts, --out" in capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("task.n_digits", ["expected section.key=value"]),
    ("opd.lr=0.1", ["does not read the opd section", "Fix: pass it to the stage that reads opd"]),
    ("task.n_digits=two", ["n_digits", "expected int"]),
])
def test_bad_set(run_copy, capsys, override, expected):
    before = snapshot(run_copy)
    refused(capsys, [*prompts_argv(str(TINY_PARAMS), run_copy), "--set", override], override.split("=")[0], *expected)
    assert snapshot(run_copy) == before


# -- prompts ------------------------------------------------------------------------------------------

def source_params(tmp_path, source: str, **prompts) -> str:
    return params_file(tmp_path, prompts={"source": source, "answer_column": None,
                                          "splits": {"sft": 1, "opd": 1, "eval": 1}, **prompts})


PROMPT_SOURCES = {
    "missing file": (lambda d: str(d / "nope.jsonl"), {}, ["prompts.source", "nope.jsonl", "no such file", "Fix:"]),
    "missing path without extension": (lambda d: str(d / "raw" / "nope"), {},
                                       ["prompts.source", "no such file or directory", "Fix: correct the path"]),
    "a directory that is not a dataset": (lambda d: str(d), {}, ["prompts.source", "not one written by datasets' "
                                                                 "save_to_disk", "Fix:"]),
    "empty file": (lambda d: write_jsonl(d / "empty.jsonl", []), {}, ["empty.jsonl", "Fix:"]),
    "all rows bad": (lambda d: write_jsonl(d / "bad.jsonl", [b'{"prompt": 3}', b'{"prompt": ""}']), {},
                     ["bad.jsonl", "Fix:"]),
    "non-UTF-8 (strict)": (lambda d: write_jsonl(d / "latin.jsonl", ['{"prompt": "caf\xe9"}'.encode("latin-1")]),
                           {"strict": True}, ["latin.jsonl", "line 1", "UTF-8", "Fix: re-encode"]),
    "a 100k-character prompt (strict)": (
        lambda d: write_jsonl(d / "long.jsonl", [json.dumps({"prompt": "1" * 100_000}).encode()]),
        {"strict": True, "max_prompt_tokens": 64}, ["long.jsonl", "line 1", "max_prompt_tokens", "Fix:"]),
    "wrong columns": (lambda d: (pq.write_table(pa.table({"text": ["1="]}), d / "q.parquet"), str(d / "q.parquet"))[1],
                      {}, ["q.parquet", "no column(s) ['prompt'", "Fix: set prompts.prompt_column"]),
}


@pytest.mark.parametrize("name", PROMPT_SOURCES)
def test_bad_prompt_sources(run_copy, tmp_path, capsys, name):
    make, extra, expected = PROMPT_SOURCES[name]
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    source = make(source_dir)
    before = snapshot(run_copy)
    refused(capsys, prompts_argv(source_params(tmp_path, source, **extra), run_copy), *expected)
    assert snapshot(run_copy) == before


# -- models -------------------------------------------------------------------------------------------

def models_argv(tmp_path, run, teacher: str) -> list[str]:
    return ["models", "--params", params_file(tmp_path, models={"teacher": teacher}), "--prompts",
            str(run / "data/prompts"), "--out", str(run / "models/base")]


def test_missing_teacher_directory_is_not_a_hub_lookup(run_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(run_copy)
    refused(capsys, models_argv(tmp_path, run_copy, str(tmp_path / "teachers" / "big")),
            "models.teacher", "does not exist", "Fix: set models.teacher")
    (tmp_path / "teachers").mkdir()  # `some/local_dir` whose parent exists: a local path, not a hub id
    refused(capsys, models_argv(tmp_path, run_copy, "teachers/big"), "models.teacher", "does not exist")
    assert snapshot(run_copy) == before


def test_teacher_directory_without_weights(run_copy, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(run_copy / "models/base/teacher", teacher)
    for path in teacher.glob("*.safetensors"):
        path.unlink()
    before = snapshot(run_copy)
    refused(capsys, models_argv(tmp_path, run_copy, str(teacher)), str(teacher), "no weight files", "Fix:")
    assert snapshot(run_copy) == before


def test_truncated_teacher_weights(run_copy, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(run_copy / "models/base/teacher", teacher)
    weights = next(teacher.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(run_copy)
    refused(capsys, models_argv(tmp_path, run_copy, str(teacher)), str(weights), "not a complete safetensors file",
            "Fix: copy or download the model again")
    assert snapshot(run_copy) == before


def test_a_teacher_with_another_tokenizer(run_copy, tmp_path, capsys):
    from pipeline import models

    teacher = tmp_path / "teacher"
    shutil.copytree(run_copy / "models/base/teacher", teacher)
    tokenizer = models.load_tokenizer(teacher)
    tokenizer.add_tokens(["<extra>"])  # one more token: another token-to-id mapping
    tokenizer.save_pretrained(teacher)
    argv = models_argv(tmp_path, run_copy, str(teacher))
    argv[argv.index("--out") + 1] = str(tmp_path / "base")
    before = snapshot(run_copy)
    refused(capsys, argv, "models.teacher", "models.student (toy-student) map tokens to different ids",
            "Fix: pick a teacher and a student of one tokenizer family")
    assert snapshot(run_copy) == before and not (tmp_path / "base" / models.MANIFEST).exists()


# -- caches -------------------------------------------------------------------------------------------

def cache_fault(run, name: str) -> None:
    cache, rollouts = run / "data/teacher_cache", run / "data/rollouts"
    paths = shards.list_shards(cache)
    if name == "a rollouts shard where a cache shard belongs":
        shutil.copy(shards.list_shards(rollouts)[1], paths[1])
    elif name == "a shard of another run":
        shutil.copy(paths[0], paths[1])
    elif name == "a stray extra shard":
        shutil.copy(paths[0], shards.shard_path(cache, len(paths) + 3))
    elif name == "a missing middle shard":
        paths[1].unlink()
    elif name == "a zero-byte shard":
        paths[1].write_bytes(b"")


CACHE_FAULTS = {
    "a rollouts shard where a cache shard belongs": ["part-00001.parquet", "holds rollouts v2, expected teacher_cache"],
    "a shard of another run": ["part-00001.parquet", "other rollouts", "Fix: rerun the teacher_logprobs stage"],
    "a stray extra shard": ["teacher_cache", "shards but", "Fix: rerun the teacher_logprobs stage"],
    "a missing middle shard": ["teacher_cache", "shards but", "Fix: rerun the teacher_logprobs stage"],
    "a zero-byte shard": ["part-00001.parquet", "truncated or corrupt", "Fix: delete it and rerun"],
}


@pytest.mark.parametrize("name", CACHE_FAULTS)
def test_bad_caches_are_refused_by_opd_before_training(run_copy, capsys, name):
    cache_fault(run_copy, name)
    before = snapshot(run_copy)
    refused(capsys, ["opd", "--params", str(TINY_PARAMS), "--sft-model", str(run_copy / "models/sft"),
                     "--rollouts", str(run_copy / "data/rollouts"),
                     "--teacher-cache", str(run_copy / "data/teacher_cache"),
                     "--models", str(run_copy / "models/base"), "--prompts", str(run_copy / "data/prompts"),
                     "--rounds", str(run_copy / "data/opd_rounds"), "--out", str(run_copy / "models/opd")],
            *CACHE_FAULTS[name])
    assert snapshot(run_copy) == before


def test_debug_switch_keeps_the_traceback(run_copy, monkeypatch):
    cache_fault(run_copy, "a zero-byte shard")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(SchemaError, match="truncated or corrupt"):  # raised, not reduced to one line
        cli.main(["inspect", str(run_copy / "data/teacher_cache")])


# -- what the pipeline's own stages would get wrong -----------------------------------------------------

def teacher_logprobs_argv(run, models_dir=None, *overrides: str) -> list[str]:
    return ["teacher_logprobs", "--params", str(TINY_PARAMS), "--models", str(models_dir or run / "models/base"),
            "--rollouts", str(run / "data/rollouts"), "--out", str(run / "data/teacher_cache"), "--replace-stale",
            *[arg for override in overrides for arg in ("--set", override)]]


def test_top_k_above_the_vocabulary_is_refused_before_any_shard_is_replaced(run_copy, capsys):
    before = snapshot(run_copy)
    refused(capsys, teacher_logprobs_argv(run_copy, None, "teacher_logprobs.top_k=100"),
            "teacher_logprobs.top_k is 100", f"vocabulary of {VOCAB} tokens",
            f"Fix: set teacher_logprobs.top_k to at most {VOCAB}")
    assert snapshot(run_copy) == before  # --replace-stale deleted nothing


def small_vocab_model(source, out, vocab: int):
    """A real copy of the model at `source` whose embeddings cover only the first `vocab` token ids."""
    from pipeline import models

    model = models.load_model(source, device="cpu")
    model.resize_token_embeddings(vocab, mean_resizing=False)
    models.save_model(model, models.load_tokenizer(source), out)


def test_a_student_with_a_smaller_vocabulary_is_refused_at_scoring_and_at_opd(run_copy, tmp_path, capsys):
    from pipeline import models

    base = tmp_path / "base"
    shutil.copytree(run_copy / "models/base", base)
    shutil.rmtree(base / "student")
    small_vocab_model(run_copy / "models/base/student", base / "student", 8)
    manifest = json.loads((base / models.MANIFEST).read_text())
    manifest["student"]["path"] = "student"
    (base / models.MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(run_copy)
    refused(capsys, teacher_logprobs_argv(run_copy, base, "teacher_logprobs.top_k=5"),
            "column 'teacher_topk_ids', row", "below the student's vocabulary size 8",
            "Fix: use a teacher and a student")
    assert snapshot(run_copy) == before  # the stale shards are kept until a replacement is written

    from stages import opd

    small_vocab_model(run_copy / "models/sft", tmp_path / "sft", 8)
    shutil.copy(run_copy / "models/sft" / models.PROVENANCE, tmp_path / "sft")
    with pytest.raises(SchemaError, match=r"teacher_topk_ids', row \d+: expected ids below the student's vocabulary"):
        opd.run(section("opd"), tmp_path / "sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
                tmp_path / "opd")
    assert not (tmp_path / "opd").exists()


def test_cache_shards_of_another_k_are_refused(run_copy, tmp_path):
    from pipeline.cache import open_cache
    from stages import teacher_logprobs

    cfg = section("teacher_logprobs")
    cfg.top_k = 3
    cache = run_copy / "data/teacher_cache"
    count = len(shards.list_shards(cache))
    teacher_logprobs.run(cfg, section("engine"), run_copy / "models/base", run_copy / "data/rollouts", tmp_path / "k3",
                         worker=(1, count))
    shutil.copy(shards.shard_path(tmp_path / "k3", 1), shards.shard_path(cache, 1))  # same rollouts, another k
    with pytest.raises(SchemaError, match=r"part-00001\.parquet holds top-k 3 .* holds 4 and 0: the shards come from "
                                          r"different runs\. Fix: delete"):
        open_cache(run_copy / "data/rollouts", cache)


def test_a_prompt_longer_than_the_policy_is_refused_naming_it(run_copy, tmp_path, capsys):
    rows = [json.dumps({"prompt": "1" * 600 + f"={i}"}).encode() for i in range(4)]
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    prompts_dir = tmp_path / "prompts"
    cli.main(["prompts", "--params", source_params(tmp_path, source), "--out", str(prompts_dir)])
    before = snapshot(run_copy)
    refused(capsys, ["rollouts", "--params", str(TINY_PARAMS), "--policy", str(run_copy / "models/sft"),
                     "--prompts", str(prompts_dir), "--out", str(run_copy / "data/rollouts"), "--replace-stale"],
            str(prompts_dir), "prompt_id", "with rollouts.max_new_tokens 8 that exceeds the 512 positions",
            "Fix: set prompts.max_prompt_tokens to at most 504")
    refused(capsys, ["sft_data", "--params", str(TINY_PARAMS), "--models", str(run_copy / "models/base"),
                     "--prompts", str(prompts_dir), "--out", str(run_copy / "data/sft"), "--replace-stale"],
            str(prompts_dir), "with sft_data.max_new_tokens 8 that exceeds the 512 positions")
    assert snapshot(run_copy) == before


def test_a_teacher_prompt_too_long_or_with_an_unknown_placeholder_is_refused_before_any_shard(run_copy, capsys):
    before = snapshot(run_copy)
    argv = teacher_logprobs_argv(run_copy, None, "teacher_logprobs.model=sft",
                                 "teacher_logprobs.teacher_prompt='{prompt}" + "0" * 512 + "'")
    argv += ["--sft-model", str(run_copy / "models/sft"), "--prompts", str(run_copy / "data/prompts")]
    refused(capsys, argv, "part-00000.parquet: row 0 (prompt_id", "its teacher prompt", "over the 512 positions of the "
            "scorer", "Fix: shorten teacher_logprobs.teacher_prompt")
    refused(capsys, teacher_logprobs_argv(run_copy, None, "teacher_logprobs.teacher_prompt='{prompt} {solution}'"),
            "teacher_logprobs.teacher_prompt '{prompt} {solution}' has unknown placeholder(s) {solution}; the "
            "placeholders are {prompt} and {answer}. Fix:")
    assert snapshot(run_copy) == before  # --replace-stale replaced nothing
