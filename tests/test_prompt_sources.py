"""Prompts from your own data (JSONL, Parquet, a datasets directory), bad rows, and chat templates."""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import SchemaError
from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from pipeline import models, shards, toy_task
from pipeline.config import (
    ChatConfig,
    ConfigError,
    EngineConfig,
    PromptsConfig,
    PromptSplitsConfig,
    RolloutsConfig,
    TaskConfig,
    ToyModelConfig,
    from_dict,
)
from pipeline.prompts import read_chat
from pipeline.provenance import code_sha256
from stages import prompts, rollouts

TINY_TASK = TaskConfig(n_digits=2, teacher_train_prompts=200, sft_prompts=24, opd_prompts=20, eval_prompts=10, seed=0)
# A small template in the toy vocabulary (digits and ",=;"): bos, system turn + ";", user turn + "=",
# "0;" when thinking is turned off, ";" as the generation prompt.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }};"
            "{% else %}{{ m['content'] }}={% endif %}{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}0;{% endif %}"
            "{% if add_generation_prompt %};{% endif %}")


def table_rows(out):
    table, provenance = shards.read_shards(out, prompts_schema)
    return table.to_pylist(), provenance


def by_split(rows):
    splits = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(row)
    return splits


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def questions(n):
    return [{"question": f"{i} + {i} =", "answer": str(2 * i), "uid": f"q{i}"} for i in range(n)]


def source_cfg(source, **kw):
    return PromptsConfig(source=str(source), prompt_column="question", **kw)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """The toy tokenizer with a chat template, saved like a real model's."""
    tokenizer = toy_task.build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer.save_pretrained(path)
    return path


def test_toy_prompts_are_unchanged(tmp_path):
    """Default params give exactly the rows the stage wrote before prompt sources existed (digest of those rows), each
    in domain add (the column prompts v2 added)."""
    prompts.run(TINY_TASK, tmp_path / "p")
    rows, provenance = table_rows(tmp_path / "p")
    assert {row.pop("domain") for row in rows} == {"add"}
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == \
        "5d44a70b9e65e7b91a5b22d413996d38ee916cc153e520c3a57644845cd03ca7"
    assert provenance == {"stage": "prompts", "code_sha256": code_sha256("prompts"), "task": "toy_addition",
                          "config": vars(TINY_TASK)}


def test_jsonl_source_gives_disjoint_seeded_splits(tmp_path):
    sizes = PromptSplitsConfig(sft=10, opd=20, eval=5)
    prompts.run(TINY_TASK, tmp_path / "p", source_cfg(write_jsonl(tmp_path / "q.jsonl", questions(40)), splits=sizes))
    rows, provenance = table_rows(tmp_path / "p")
    splits = by_split(rows)
    assert {name: len(split) for name, split in splits.items()} == {"sft": 10, "opd": 20, "eval": 5}
    assert [r["split"] for r in rows] == sorted((r["split"] for r in rows), key=prompts.SPLITS.index)
    assert len({r["prompt"] for r in rows}) == 35  # disjoint: no prompt twice
    source = {q["question"]: q for q in questions(40)}
    for row in rows:
        assert row["prompt_id"] == prompts.prompt_id(row["prompt"])  # no id column: content hash
        assert row["answer"] == source[row["prompt"]]["answer"]
    assert provenance["rows"] == {"usable": 40, "repeats": 0, "skipped": {}, "unused": 5}
    assert provenance["source_fingerprint"] == shards.file_sha256(tmp_path / "q.jsonl")
    assert "chat" not in provenance

    # The same prompts in another order land in the same splits, and resizing sft leaves eval as it was.
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", questions(40)[::-1])
    prompts.run(TINY_TASK, tmp_path / "p2", source_cfg(shuffled, splits=sizes))
    assert sorted(table_rows(tmp_path / "p2")[0], key=str) == sorted(rows, key=str)
    prompts.run(TINY_TASK, tmp_path / "p3", source_cfg(shuffled, splits=PromptSplitsConfig(sft=3, opd=20, eval=5)))
    assert by_split(table_rows(tmp_path / "p3")[0])["eval"] == splits["eval"]
    # Another seed draws other splits.
    prompts.run(TINY_TASK, tmp_path / "p4", source_cfg(shuffled, seed=1, splits=sizes))
    assert by_split(table_rows(tmp_path / "p4")[0])["eval"] != splits["eval"]


def test_parquet_source_with_id_column_and_fractions(tmp_path):
    records = [{"text": f"{i}=", "answer": None if i % 2 else str(i), "id": 1000 + i, "other": 0} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "q.parquet")
    cfg = PromptsConfig(source=str(tmp_path / "q.parquet"), prompt_column="text", id_column="id",
                        splits=PromptSplitsConfig(sft=0.25, opd=0.5, eval=0.15))
    prompts.run(TINY_TASK, tmp_path / "p", cfg)
    rows, _ = table_rows(tmp_path / "p")
    assert {name: len(split) for name, split in by_split(rows).items()} == {"sft": 5, "opd": 10, "eval": 3}
    for row in rows:
        i = int(row["prompt"][:-1])
        assert row["prompt_id"] == str(1000 + i)  # integer ids become strings
        assert row["answer"] == (None if i % 2 else str(i))


def test_datasets_saved_to_disk(tmp_path):
    import datasets

    data = {"question": [q["question"] for q in questions(12)], "answer": [q["answer"] for q in questions(12)]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "ds"))
    prompts.run(TINY_TASK, tmp_path / "p", source_cfg(tmp_path / "ds", splits=PromptSplitsConfig(sft=4, opd=4, eval=4)))
    rows, provenance = table_rows(tmp_path / "p")
    assert sorted(r["prompt"] for r in rows) == sorted(data["question"])
    assert {r["prompt_id"] for r in rows} == {prompts.prompt_id(p) for p in data["question"]}
    assert provenance["source_fingerprint"]

    # A DatasetDict: the split is chosen by hf_split.
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dd"))
    cfg = source_cfg(tmp_path / "dd", hf_split="test", splits=PromptSplitsConfig(sft=4, opd=4, eval=4))
    prompts.run(TINY_TASK, tmp_path / "p2", cfg)
    assert table_rows(tmp_path / "p2")[0] == rows
    with pytest.raises(ConfigError, match=r"has splits \['test'\], not prompts.hf_split 'train'"):
        prompts.run(TINY_TASK, tmp_path / "p3", source_cfg(tmp_path / "dd"))


def test_missing_columns_and_paths_are_named(tmp_path):
    pq.write_table(pa.table({"text": ["1="]}), tmp_path / "q.parquet")
    with pytest.raises(ConfigError, match=r"no column\(s\) \['question', 'answer'\]; its columns are \['text'\]"):
        prompts.run(TINY_TASK, tmp_path / "p", source_cfg(tmp_path / "q.parquet"))
    with pytest.raises(ConfigError, match="no such file or directory"):
        prompts.run(TINY_TASK, tmp_path / "p", source_cfg(tmp_path / "nope.jsonl"))


def test_repeated_prompts_keep_their_first_row(tmp_path, caplog):
    records = questions(10) + [{"question": "3 + 3 =", "answer": "other", "uid": "x"}] * 2
    cfg = source_cfg(write_jsonl(tmp_path / "q.jsonl", records), splits=PromptSplitsConfig(sft=4, opd=4, eval=2))
    with caplog.at_level(logging.INFO, logger="prompts"):
        prompts.run(TINY_TASK, tmp_path / "p", cfg)
    rows, provenance = table_rows(tmp_path / "p")
    assert len(rows) == 10 and [r["answer"] for r in rows if r["prompt"] == "3 + 3 ="] == ["6"]
    assert provenance["rows"]["repeats"] == 2
    assert "2 repeated prompts dropped" in caplog.text


GOOD = [{"question": f"{i}=", "answer": str(i), "uid": i} for i in range(12)]
BAD_LINES = {  # kind: (the bad line, the column its message names, prompts config)
    "invalid_utf8": (b'{"question": "caf\xe9=", "answer": "1"}', None, {}),
    "invalid_json": (b'{"question": "1=", ', None, {}),
    "wrong_type": (b'{"question": 12, "answer": "1"}', "question", {}),
    "empty_prompt": (b'{"question": "  ", "answer": "1"}', "question", {}),
    "too_long": (b'{"question": "1234567890=", "answer": "1"}', "question", {"max_prompt_tokens": 8}),
    "duplicate_id": (b'{"question": "99=", "answer": "1", "uid": 3}', "uid", {"id_column": "uid"}),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_rows_are_skipped_with_a_summary_or_stop_a_strict_run(tmp_path, caplog, kind):
    line, column, extra = BAD_LINES[kind]
    good = [json.dumps({k: v for k, v in r.items() if k != "uid" or "id_column" in extra}).encode() for r in GOOD]
    path = tmp_path / "q.jsonl"
    # The bad line twice (lines 5 and 9), plus an answer of the wrong type: a second kind, counted apart.
    path.write_bytes(b"\n".join(good[:4] + [line] + good[4:7] + [line, b'{"question": "77=", "answer": 7}'] + good[7:])
                     + b"\n")
    cfg = source_cfg(path, splits=PromptSplitsConfig(sft=4, opd=4, eval=3), **extra)
    with caplog.at_level(logging.WARNING, logger="prompts"):
        prompts.run(TINY_TASK, tmp_path / "p", cfg)
    rows, provenance = table_rows(tmp_path / "p")
    assert provenance["rows"]["skipped"] == ({kind: 2, "wrong_type": 1} if kind != "wrong_type" else {"wrong_type": 3})
    assert provenance["rows"]["usable"] == 12 and len(rows) == 11
    at = "line 5" + (f", column '{column}'" if column else "")
    assert f"{path}: skipped {2 if kind != 'wrong_type' else 3} {prompts.BAD_ROWS[kind]}, e.g. {at}: " in caplog.text
    assert "line 10, column 'answer': int 7" in caplog.text

    with pytest.raises(SchemaError) as error:
        prompts.run(TINY_TASK, tmp_path / "strict", PromptsConfig(**{**vars(cfg), "strict": True}))
    assert str(error.value).startswith(f"{path}: {at}: expected ")
    assert "Fix: " in str(error.value) and "prompts.strict: false" in str(error.value)
    assert not (tmp_path / "strict").exists()


def test_too_few_usable_prompts_for_the_counts(tmp_path):
    cfg = source_cfg(write_jsonl(tmp_path / "q.jsonl", questions(10)), splits=PromptSplitsConfig(sft=5, opd=5, eval=1))
    with pytest.raises(ConfigError, match="ask for 11 prompts .* but .* has 10 usable ones"):
        prompts.run(TINY_TASK, tmp_path / "p", cfg)


def test_prompts_config_checks():
    with pytest.raises(ConfigError, match="not a mix"):
        PromptSplitsConfig(sft=10, opd=0.5, eval=0.1)
    with pytest.raises(ConfigError, match="sum to at most 1"):
        PromptSplitsConfig(sft=0.5, opd=0.5, eval=0.1)
    with pytest.raises(ConfigError, match="prompts.splits: eval must be > 0"):
        from_dict(PromptsConfig, {"splits": {"eval": 0}}, "prompts")
    with pytest.raises(ConfigError, match=r"\['splits', 'seed'\] apply to your own prompt source"):
        from_dict(PromptsConfig, {"splits": {"sft": 0.1}, "seed": 2}, "prompts")
    with pytest.raises(ConfigError, match="not a mix.*with counts, give sft, opd and eval"):
        from_dict(PromptsConfig, {"source": "q.jsonl", "splits": {"sft": 10, "opd": 20}}, "prompts")
    with pytest.raises(ConfigError, match="set template: true"):
        from_dict(PromptsConfig, {"chat": {"system_prompt": "be brief"}}, "prompts")
    cfg = from_dict(PromptsConfig, {"source": "q.jsonl", "splits": {"sft": 10, "opd": 20, "eval": 5}}, "prompts")
    assert (cfg.splits.sft, type(cfg.splits.sft)) == (10, int)


def messages(system, prompt):
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    return system_turn + [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("system, thinking", [(None, None), ("12", None), ("12", False), (None, True)])
def test_chat_template_ids_are_apply_chat_templates(chat_tokenizer_dir, system, thinking):
    tokenizer = models.load_tokenizer(chat_tokenizer_dir)
    chat = ChatConfig(template=True, system_prompt=system, enable_thinking=thinking)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = tokenizer.apply_chat_template(messages(system, "34"), add_generation_prompt=True, tokenize=True,
                                             return_dict=False, **extra)
    assert models.encode_prompt(tokenizer, "34", chat) == expected
    text = "<s>" + (f"{system};" if system else "") + "34=" + ("0;" if thinking is False else "") + ";"
    assert expected == tokenizer(text, add_special_tokens=False)["input_ids"]  # the template did run
    assert models.encode_prompt(tokenizer, "34") == tokenizer("34")["input_ids"]  # no chat: plain text, as before


def test_missing_chat_template_names_the_tokenizer_and_the_fix(tmp_path):
    toy_task.build_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = models.load_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match=rf"tokenizer of {tmp_path / 'tok'} has no chat template\. "
                                          r"Fix: set prompts.chat.template: false"):
        models.encode_prompt(tokenizer, "1", ChatConfig(template=True))
    with pytest.raises(ConfigError, match="the toy tokenizer .* has no chat template"):  # before any model runs
        prompts.run(TINY_TASK, tmp_path / "p", PromptsConfig(chat=ChatConfig(template=True)))


def test_chat_settings_reach_the_stages_that_encode(tmp_path, chat_tokenizer_dir):
    """The prompts stage records the chat settings and measures lengths with the template; rollouts (also the
    path of OPD refresh rounds) encode with them."""
    chat = ChatConfig(template=True, system_prompt="5")
    records = [{"question": f"{i}{i}=", "answer": str(i)} for i in range(10)] + [{"question": "123456=", "answer": "1"}]
    # "<s>" "5;" prompt "=" ";": the 3-character prompts are 8 tokens, the 7-character one 12.
    cfg = source_cfg(write_jsonl(tmp_path / "q.jsonl", records), max_prompt_tokens=8, chat=chat,
                     splits=PromptSplitsConfig(sft=3, opd=4, eval=3))
    prompts.run(TINY_TASK, tmp_path / "p", cfg, student=str(chat_tokenizer_dir))
    rows, provenance = table_rows(tmp_path / "p")
    assert provenance["rows"]["skipped"] == {"too_long": 1} and len(rows) == 10
    assert read_chat(tmp_path / "p") == chat
    assert provenance["tokenizer"] == str(chat_tokenizer_dir)

    tokenizer = models.load_tokenizer(chat_tokenizer_dir)
    policy = tmp_path / "policy"
    models.save_model(models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0), tokenizer, policy)
    rollouts.run(RolloutsConfig(n=1, max_new_tokens=2), EngineConfig(batch_size=8), policy, tmp_path / "p",
                 tmp_path / "rollouts")
    table, _ = shards.read_shards(tmp_path / "rollouts", rollouts_schema)
    prompt_of = {r["prompt_id"]: r["prompt"] for r in rows}
    for prompt_id, prompt_ids in zip(table["prompt_id"].to_pylist(), table["prompt_ids"].to_pylist()):
        expected = tokenizer.apply_chat_template(messages("5", prompt_of[prompt_id]), add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        assert prompt_ids == expected
