"""Prompts: the task's questions, with reference answers where there are any."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import SchemaError, first_true_row, row_error, schema_metadata

NAME = "prompts"
VERSION = 1
PRODUCED_BY = "the prompts stage (dvc repro prompts)"


def schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),  # unique; joins every later artefact
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("answer", pa.string(), nullable=True),  # reference answer; not every prompt has one
            pa.field("split", pa.string(), nullable=False),
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


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
