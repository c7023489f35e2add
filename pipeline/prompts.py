"""Reading the prompts artefact (written by the prompts stage): a split's rows, the chat settings every
stage encodes them with, and the hash that stages reading them record."""

from __future__ import annotations

from pathlib import Path

from data_schemas import prompts as prompts_schema
from pipeline import shards
from pipeline.config import ChatConfig, ConfigError, from_dict, template_fields


def _rows(prompts_dir: Path) -> list[dict]:
    """Every row, in file order, each with its `domain` (null in a version-1 file: the unnamed domain)."""
    table, _ = shards.read_shards(prompts_dir, prompts_schema)
    return [{"domain": None, **row} for row in table.to_pylist()]


def read_split(prompts_dir: Path, split: str) -> list[dict]:
    """The rows of one split, in file order, as dicts."""
    rows = [r for r in _rows(prompts_dir) if r["split"] == split]
    if not rows:
        raise ValueError(f"{prompts_dir}: no prompts in split {split!r}; check the task and prompts sections of "
                         f"params.yaml (prompts.splits.{split} for your own prompts)")
    return rows


def read_chat(prompts_dir: Path) -> ChatConfig:
    """The chat settings the prompts were written with: how every stage must encode them."""
    _, provenance = shards.read_shards(prompts_dir, prompts_schema)
    return from_dict(ChatConfig, provenance.get("chat"), f"{prompts_dir} (provenance 'chat')")


def prompts_sha256(prompts_dir: Path) -> str:
    """sha256 of the prompts' shards, for the provenance of the stages that read them: shards made from
    other prompts (or other chat settings) are then stale."""
    return shards.files_sha256(shards.list_shards(prompts_dir))


def read_rows(prompts_dir: Path) -> dict[str, dict]:
    """Every prompt row of every split, by prompt_id."""
    return {row["prompt_id"]: row for row in _rows(prompts_dir)}


def domains(rows: list[dict]) -> list[str | None]:
    """The distinct domains of prompt rows, in order of first appearance."""
    return list(dict.fromkeys(row["domain"] for row in rows))


def fill_teacher_prompt(template: str, row: dict, prompts_dir: Path) -> str:
    """teacher_logprobs.teacher_prompt `template` filled in with prompt row `row`'s text and reference answer."""
    if "answer" in template_fields(template) and row["answer"] is None:
        raise ConfigError(f"{prompts_dir}: prompt_id {row['prompt_id']!r} has no reference answer (null), but "
                          f"teacher_logprobs.teacher_prompt {template!r} shows the scorer {{answer}}. Fix: give every "
                          f"prompt an answer (prompts.answer_column), or drop {{answer}} from the template")
    return template.format(prompt=row["prompt"], answer=row["answer"])
