"""Reading the prompts artefact (written by the prompts stage): a split's rows, the chat settings every
stage encodes them with, and the hash that stages reading them record."""

from __future__ import annotations

from pathlib import Path

from data_schemas import prompts as prompts_schema
from pipeline import shards
from pipeline.config import ChatConfig, from_dict


def read_split(prompts_dir: Path, split: str) -> list[dict]:
    """The rows of one split, in file order, as dicts."""
    table, _ = shards.read_shards(prompts_dir, prompts_schema)
    rows = [r for r in table.to_pylist() if r["split"] == split]
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
