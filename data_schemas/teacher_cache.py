"""Teacher cache: the teacher's log-probabilities on a rollout shard, computed once.

Shard i of the cache is row-aligned with shard i of the rollouts (same keys, same order), so
the response tokens are not stored twice. Per response token it holds the teacher's exact
log-prob of the sampled token (what the sampled-token OPD loss needs) and its top-k ids and
log-probs (what the top-k distribution losses need). The top-k log-probs are float16 to halve
the cache; the sampled-token log-prob stays float32 because it enters the loss directly.

When the rollouts hold the behaviour policy's top-k_s ids (`behavior_topk_ids`, rollouts.student_top_k),
the cache also holds the teacher's log-probs at exactly those ids, in their order
(`teacher_behavior_topk_logprobs`, float16 like the top-k's): with them the top-k losses can run on
the union of the teacher's and the student's supports. The ids themselves stay in the rollouts.

Each row records the teacher that scored it (`teacher`: its id, a key of the shard provenance's `teachers`,
which holds its weights and tokenizer hashes) and the domain of its prompt (`domain`; null: the unnamed
domain, or the prompts were not given): with models.teachers the rows of one shard are scored by the teacher
of each one's domain, and the opd stage checks teacher consistency domain by domain.

Versions: 2 added `teacher_behavior_topk_logprobs` (present only when k_s > 0); 3 added `domain` and `teacher`
(written by the teacher_logprobs stage; a table built without them, per_row_teacher False, is read as one
teacher's). A version-1 cache has exactly the columns of a version-2 cache with k_s = 0, and a version-2 cache
those of a version-3 one without the per-row teacher, so both are still read: every row scored by the one
teacher their provenance names, in the unnamed domain.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import (
    SchemaError,
    check_topk_lengths,
    first_true_row,
    row_error,
    schema_metadata,
    topk_column,  # noqa: F401 (callers build the top-k columns with it)
    topk_width,
)
from data_schemas import rollouts as rollouts_schema

NAME = "teacher_cache"
VERSION = 3
READS = (1, 2, 3)
PRODUCED_BY = "the teacher_logprobs stage (dvc repro teacher_logprobs)"

KEYS = ("prompt_id", "sample_idx", "round")  # identify a rollout; must match the rollout shard row by row
BEHAVIOR_TOPK = "teacher_behavior_topk_logprobs"
ROW_TEACHER = ("domain", "teacher")
"""The per-row teacher columns (version 3): the row's domain and the id of the teacher that scored it."""


def schema(k: int, student_k: int = 0, per_row_teacher: bool = False) -> pa.Schema:
    if isinstance(k, bool) or not hasattr(k, "__index__") or k < 1:
        raise ValueError(f"teacher cache top-k must be a positive int, got {k!r}")
    if isinstance(student_k, bool) or not hasattr(student_k, "__index__") or student_k < 0:
        raise ValueError(f"teacher cache student top-k must be an int >= 0, got {student_k!r}")
    k, student_k = int(k), int(student_k)
    behavior = ([pa.field(BEHAVIOR_TOPK, pa.list_(pa.list_(pa.float16(), student_k)), nullable=False)]
                if student_k else [])
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),
            pa.field("round", pa.int32(), nullable=False),
            pa.field("teacher_token_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("teacher_topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("teacher_topk_logprobs", pa.list_(pa.list_(pa.float16(), k)), nullable=False),
            *behavior,
            *([pa.field("domain", pa.string(), nullable=True), pa.field("teacher", pa.string(), nullable=False)]
              if per_row_teacher else []),
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def k_of(schema_or_table, path=None) -> int:
    """The top-k width, read from the teacher_topk_ids column type."""
    schema = schema_or_table.schema if isinstance(schema_or_table, pa.Table) else schema_or_table
    where = f"{path}: " if path is not None else ""
    if "teacher_topk_ids" not in schema.names:
        raise SchemaError(
            f"{where}missing column 'teacher_topk_ids' (type list<fixed_size_list<int32, k>>); "
            f"found columns {schema.names}. Fix: delete it and rerun {PRODUCED_BY}.",
            path,
        )
    return topk_width(schema, "teacher_topk_ids", PRODUCED_BY, path)


def student_k_of(schema_or_table, path=None) -> int:
    """k_s, the width of the teacher's log-probs at the behaviour top-k ids; 0 when the cache has none."""
    schema = schema_or_table.schema if isinstance(schema_or_table, pa.Table) else schema_or_table
    return topk_width(schema, BEHAVIOR_TOPK, PRODUCED_BY, path)


def schema_kw_from(schema: pa.Schema, path) -> dict:
    return {"k": k_of(schema, path), "student_k": student_k_of(schema, path),
            "per_row_teacher": has_row_teacher(schema)}


def has_row_teacher(schema_or_table) -> bool:
    """Whether the cache records each row's domain and teacher (version 3, as the teacher_logprobs stage writes)."""
    schema = schema_or_table.schema if isinstance(schema_or_table, pa.Table) else schema_or_table
    return "teacher" in schema.names


def check_rows(table: pa.Table, path) -> None:
    columns = ["teacher_topk_ids", "teacher_topk_logprobs"] + ([BEHAVIOR_TOPK] if BEHAVIOR_TOPK in table.column_names
                                                               else [])
    check_topk_lengths(table, columns, "teacher_token_logprobs", path,
                       f"the scorer must emit the same positions for every teacher column; rerun {PRODUCED_BY}")


def check_ids_below(table: pa.Table, vocab_size: int, path, column: str = "teacher_topk_ids",
                    model: str = "student") -> None:
    """Refuse top-k ids (`column` of `table`) that the `model` cannot index (the loss would read other tokens'
    logits, or the scorer fail): the teacher's top-k against the student's vocabulary, the behaviour top-k
    (rollouts) against the teacher's."""
    ids = table[column].combine_chunks()
    tokens = ids.flatten()  # one fixed-size list of k ids per response token
    flat = tokens.flatten()
    bad = first_true_row(pc.greater_equal(flat, vocab_size))
    if bad is None:
        return
    row = pc.list_parent_indices(ids)[bad // tokens.type.list_size].as_py()
    raise row_error(path, column, row, f"ids below the {model}'s vocabulary size {vocab_size}",
                    f"id {flat[bad].as_py()}", "use a teacher and a student of one vocabulary (models.teacher, "
                    "models.student), then rerun the models stage and the stages after it")


def check_aligned(cache: pa.Table, rollouts: pa.Table, cache_path, rollouts_path) -> None:
    """Raise SchemaError at the first row where the cache does not describe the rollout beside it."""
    fix = (
        f"the cache is stale or was computed from other rollouts; delete {cache_path} "
        f"and rerun {PRODUCED_BY}"
    )
    common = min(cache.num_rows, rollouts.num_rows)
    cache_part, rollout_part = cache.slice(0, common), rollouts.slice(0, common)
    differs = pc.not_equal(
        pc.list_value_length(rollout_part["response_ids"]),
        pc.list_value_length(cache_part["teacher_token_logprobs"]),
    )
    for key in KEYS:
        differs = pc.or_(differs, pc.not_equal(cache_part[key], rollout_part[key]))
    row = first_true_row(differs)
    if row is None and student_k_of(cache, cache_path) != rollouts_schema.student_k_of(rollouts, rollouts_path):
        raise SchemaError(
            f"{cache_path}: holds the teacher at {student_k_of(cache)} behaviour top-k ids a token but "
            f"{rollouts_path} holds {rollouts_schema.student_k_of(rollouts)}. Fix: {fix}.",
            cache_path,
        )
    if row is not None:
        cache_key = {key: cache[key][row].as_py() for key in KEYS}
        rollout_key = {key: rollouts[key][row].as_py() for key in KEYS}
        cache_len = len(cache["teacher_token_logprobs"][row])
        rollout_len = len(rollouts["response_ids"][row])
        raise SchemaError(
            f"{cache_path}: row {row} is not aligned with {rollouts_path} row {row}: "
            f"expected keys {rollout_key} and {rollout_len} teacher_token_logprobs (one per response token), "
            f"found keys {cache_key} and {cache_len}. Fix: {fix}.",
            cache_path,
        )
    if cache.num_rows != rollouts.num_rows:
        raise SchemaError(
            f"{cache_path}: has {cache.num_rows} rows but {rollouts_path} has {rollouts.num_rows}; "
            f"they first differ at row {common}. Fix: {fix}.",
            cache_path,
        )
