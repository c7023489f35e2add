"""Prompts: the task's questions, with reference answers where there are any, and each one's domain.

`domain` names the prompt's task family (models.teachers maps each domain to its teacher); null is the one
unnamed domain of a source without domains.

Versions: 2 added `domain`. A version-1 file has exactly the columns of version 2 without it, and is still
read: every one of its prompts is in the unnamed domain (null).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import SchemaError, first_true_row, row_error, schema_metadata

NAME = "prompts"
VERSION = 2
READS = (1, 2)
PRODUCED_BY = "the prompts stage (dvc repro prompts)"


def schema(domain: bool = False) -> pa.Schema:
    """The schema; `domain` False: without the domain column (version 1's columns, as old files hold them)."""
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),  # unique; joins every later artefact
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("answer", pa.string(), nullable=True),  # reference answer; not every prompt has one
            pa.field("split", pa.string(), nullable=False),
            *([pa.field("domain", pa.string(), nullable=True)] if domain else []),  # null: the unnamed domain
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def schema_kw_from(schema: pa.Schema, path) -> dict:
    return {"domain": "domain" in schema.names}


def check_rows(table: pa.Table, path) -> None:
    empty = first_true_row(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table["prompt"])), 0))
    if empty is not None:
        raise row_error(
            path, "prompt", empty, "a non-empty prompt", "an empty (or whitespace-only) string",
            "drop or fill empty prompts when building the prompt set",
        )
    ids = table["prompt_id"]
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    first_row: dict[str, int] = {}
    for row, prompt_id in enumerate(ids.to_pylist()):
        if prompt_id in first_row:
            raise SchemaError(
                f"{path}: column 'prompt_id', row {row}: expected unique ids, found '{prompt_id}' "
                f"again (first at row {first_row[prompt_id]}). Fix: deduplicate the prompts, or derive "
                f"prompt_id from the source dataset's id or a hash of the prompt.",
                path,
            )
        first_row[prompt_id] = row
