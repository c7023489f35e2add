"""Rollouts: responses sampled from the behaviour policy (the SFT student, or the student at
the last refresh), with that policy's log-probabilities of each sampled token.

The policy is recorded in the shard's provenance metadata.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import first_true_row, row_error, schema_metadata

NAME = "rollouts"
VERSION = 1
PRODUCED_BY = "the rollouts stage (dvc repro rollouts)"

FINISH_REASONS = ("stop", "length")  # "length": cut at the token limit, so no EOS was sampled


def schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),  # which of the samples for this prompt
            pa.field("round", pa.int32(), nullable=False),  # refresh round; 0 = rollouts of the SFT student
            pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("behavior_logprobs", pa.list_(pa.float32()), nullable=False),  # one per response token
            pa.field("finish_reason", pa.string(), nullable=False),
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def check_rows(table: pa.Table, path) -> None:
    response_len = pc.list_value_length(table["response_ids"])
    logprob_len = pc.list_value_length(table["behavior_logprobs"])
    row = first_true_row(pc.not_equal(response_len, logprob_len))
    if row is not None:
        raise row_error(
            path, "behavior_logprobs", row,
            f"one log-prob per response token ({response_len[row].as_py()}, the length of response_ids)",
            f"{logprob_len[row].as_py()}",
            "store exactly one behaviour log-prob per sampled response token",
        )
    reasons = table["finish_reason"]
    row = first_true_row(pc.invert(pc.is_in(reasons, value_set=pa.array(FINISH_REASONS))))
    if row is not None:
        raise row_error(
            path, "finish_reason", row, f"one of {list(FINISH_REASONS)}", repr(reasons[row].as_py()),
            "map the engine's finish reason to 'stop' (EOS or stop string) or 'length' (token limit)",
        )
