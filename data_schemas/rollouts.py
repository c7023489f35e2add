"""Rollouts: responses sampled from the behaviour policy (the SFT student, or the student at
the last refresh), with that policy's log-probabilities of each sampled token and, with
`rollouts.student_top_k` = k_s > 0, its top-k_s token ids at each response token
(`behavior_topk_ids`, by rank: the student's support, on which the teacher is then scored).

The policy is recorded in the shard's provenance metadata.

Versions: 2 added `behavior_topk_ids` (present only when k_s > 0). A version-1 shard has exactly the
columns of a version-2 shard with k_s = 0, so it is still read; what needs the behaviour top-k
refuses it (pipeline.cache).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import check_topk_lengths, first_true_row, row_error, schema_metadata, topk_width

NAME = "rollouts"
VERSION = 2
READS = (1, 2)
PRODUCED_BY = "the rollouts stage (dvc repro rollouts)"

FINISH_REASONS = ("stop", "length")  # "length": cut at the token limit, so no EOS was sampled


TOPK_IDS = "behavior_topk_ids"


def schema(student_k: int = 0) -> pa.Schema:
    if isinstance(student_k, bool) or not hasattr(student_k, "__index__") or student_k < 0:
        raise ValueError(f"rollouts student top-k must be an int >= 0 (0: no {TOPK_IDS} column), got {student_k!r}")
    topk = [pa.field(TOPK_IDS, pa.list_(pa.list_(pa.int32(), int(student_k))), nullable=False)] if student_k else []
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),  # which of the samples for this prompt
            pa.field("round", pa.int32(), nullable=False),  # refresh round; 0 = rollouts of the SFT student
            pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("behavior_logprobs", pa.list_(pa.float32()), nullable=False),  # one per response token
            pa.field("finish_reason", pa.string(), nullable=False),
            *topk,
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def student_k_of(schema_or_table, path=None) -> int:
    """k_s, the width of the behaviour top-k ids; 0 when the shard has none (k_s = 0, or a version-1 shard)."""
    schema = schema_or_table.schema if isinstance(schema_or_table, pa.Table) else schema_or_table
    return topk_width(schema, TOPK_IDS, PRODUCED_BY, path)


def schema_kw_from(schema: pa.Schema, path) -> dict:
    return {"student_k": student_k_of(schema, path)}


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
    if TOPK_IDS in table.column_names:
        check_topk_lengths(table, [TOPK_IDS], "response_ids", path,
                           "store the behaviour policy's top-k ids at every sampled response token")
    reasons = table["finish_reason"]
    row = first_true_row(pc.invert(pc.is_in(reasons, value_set=pa.array(FINISH_REASONS))))
    if row is not None:
        raise row_error(
            path, "finish_reason", row, f"one of {list(FINISH_REASONS)}", repr(reasons[row].as_py()),
            "map the engine's finish reason to 'stop' (EOS or stop string) or 'length' (token limit)",
        )
