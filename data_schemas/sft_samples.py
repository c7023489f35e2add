"""SFT samples: the teacher's tokenised answers to the SFT prompts.

Which teacher wrote them is recorded in the shard's provenance metadata, so later stages can
check teacher consistency.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import first_true_row, row_error, schema_metadata

NAME = "sft_samples"
VERSION = 1
PRODUCED_BY = "the sft_data stage (dvc repro sft_data)"


def schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def check_rows(table: pa.Table, path) -> None:
    # An empty response contributes no loss tokens and would only divide by zero downstream.
    empty = first_true_row(pc.equal(pc.list_value_length(table["response_ids"]), 0))
    if empty is not None:
        raise row_error(
            path, "response_ids", empty, "at least one token", "an empty list",
            "drop samples whose teacher response is empty when writing the SFT data",
        )
