"""Teacher cache: the teacher's log-probabilities on a rollout shard, computed once.

Shard i of the cache is row-aligned with shard i of the rollouts (same keys, same order), so
the response tokens are not stored twice. Per response token it holds the teacher's exact
log-prob of the sampled token (what the sampled-token OPD loss needs) and its top-k ids and
log-probs (what the top-k distribution losses need). The top-k log-probs are float16 to halve
the cache; the sampled-token log-prob stays float32 because it enters the loss directly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import SchemaError, first_true_row, row_error, schema_metadata

NAME = "teacher_cache"
VERSION = 1
PRODUCED_BY = "the teacher_logprobs stage (dvc repro teacher_logprobs)"

KEYS = ("prompt_id", "sample_idx", "round")  # identify a rollout; must match the rollout shard row by row


def schema(k: int) -> pa.Schema:
    if isinstance(k, bool) or not hasattr(k, "__index__") or k < 1:
        raise ValueError(f"teacher cache top-k must be a positive int, got {k!r}")
    k = int(k)
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),
            pa.field("round", pa.int32(), nullable=False),
            pa.field("teacher_token_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("teacher_topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("teacher_topk_logprobs", pa.list_(pa.list_(pa.float16(), k)), nullable=False),
        ],
        metadata=schema_metadata(NAME, VERSION),
    )


def topk_column(arrays: list[np.ndarray], value_type: pa.DataType, k: int) -> pa.Array:
    """A top-k column, list<fixed_size_list<value_type, k>>, from per-row [R, k] arrays, without Python
    loops over tokens."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), k)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


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
    type_ = schema.field("teacher_topk_ids").type
    if not (pa.types.is_list(type_) and pa.types.is_fixed_size_list(type_.value_type)):
        raise SchemaError(
            f"{where}column 'teacher_topk_ids': expected type list<fixed_size_list<int32, k>>, found {type_}, "
            f"so k cannot be read from it. Fix: build it as fixed-size lists, or pass k= explicitly "
            f"when writing.",
            path,
        )
    return type_.value_type.list_size


def schema_kw_from(schema: pa.Schema, path) -> dict:
    return {"k": k_of(schema, path)}


def check_rows(table: pa.Table, path) -> None:
    token_len = pc.list_value_length(table["teacher_token_logprobs"])
    for column in ("teacher_topk_ids", "teacher_topk_logprobs"):
        length = pc.list_value_length(table[column])
        row = first_true_row(pc.not_equal(length, token_len))
        if row is not None:
            raise row_error(
                path, column, row,
                f"one top-k entry per response token ({token_len[row].as_py()}, the length of teacher_token_logprobs)",
                f"{length[row].as_py()}",
                f"the scorer must emit the same positions for all three teacher columns; rerun {PRODUCED_BY}",
            )


def check_ids_below(table: pa.Table, vocab_size: int, path) -> None:
    """Refuse top-k ids that the student cannot index (the loss would read other tokens' logits)."""
    ids = table["teacher_topk_ids"].combine_chunks()
    tokens = ids.flatten()  # one fixed-size list of k ids per response token
    flat = tokens.flatten()
    bad = first_true_row(pc.greater_equal(flat, vocab_size))
    if bad is None:
        return
    row = pc.list_parent_indices(ids)[bad // tokens.type.list_size].as_py()
    raise row_error(path, "teacher_topk_ids", row, f"ids below the student's vocabulary size {vocab_size}",
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
