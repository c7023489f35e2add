"""Schema contracts: valid tables pass; every kind of bad input names file, column, row and fix."""

from __future__ import annotations

import pyarrow as pa
import pytest

from data_schemas import (
    SCHEMA_KEY,
    VERSION_KEY,
    SchemaError,
    check_metadata,
    conform,
    prompts,
    rollouts,
    sft_samples,
    teacher_cache,
    validate,
)
from tests.tables import cache_table, prompts_table, rollouts_table, sft_table

PATH = "/data/example/part-00000.parquet"


# --- valid tables -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "artefact, make",
    [(prompts, prompts_table), (sft_samples, sft_table), (rollouts, rollouts_table), (teacher_cache, cache_table)],
)
def test_valid_tables_pass_and_carry_name_and_version(artefact, make):
    table = make()
    validate(table, artefact, PATH)
    assert table.schema.metadata[SCHEMA_KEY] == artefact.NAME.encode()
    assert table.schema.metadata[VERSION_KEY] == str(artefact.VERSION).encode()
    # rollouts and teacher_cache v2 added the behaviour top-k columns, prompts v2 the domain, teacher_cache v3 the
    # per-row domain and teacher
    assert artefact.VERSION == {rollouts: 2, teacher_cache: 3, prompts: 2}.get(artefact, 1)


def test_conform_casts_loose_producer_types_losslessly():
    loose = pa.table(
        {
            "finish_reason": pa.array(["stop"], pa.large_string()),
            "prompt_id": ["p0"],  # column order differs from the schema
            "sample_idx": pa.array([0], pa.int64()),
            "round": [0],
            "prompt_ids": [[1, 2]],
            "response_ids": [[3]],
            "behavior_logprobs": pa.array([[-0.5]], pa.list_(pa.float64())),
        }
    )
    table = conform(loose, rollouts, PATH)
    assert table.schema.equals(rollouts.schema(), check_metadata=True)
    assert table.to_pylist()[0]["behavior_logprobs"] == [-0.5]


def test_conform_builds_fixed_size_top_k_from_nested_lists():
    loose = pa.table(
        {
            "prompt_id": ["p0"], "sample_idx": [0], "round": [0],
            "teacher_token_logprobs": [[-0.1, -0.2]],
            "teacher_topk_ids": [[[1, 2, 3], [4, 5, 6]]],
            "teacher_topk_logprobs": [[[-0.1, -2.0, -3.0], [-0.2, -1.5, -4.0]]],
        }
    )
    table = conform(loose, teacher_cache, PATH, k=3)
    assert teacher_cache.k_of(table) == 3
    assert table.schema.field("teacher_topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 3))

    with pytest.raises(SchemaError) as error:
        conform(loose, teacher_cache, PATH, k=2)  # a list of the wrong length is never truncated
    assert PATH in str(error.value) and "teacher_topk_ids" in str(error.value)

    with pytest.raises(SchemaError, match="pass k="):
        conform(loose, teacher_cache, PATH)  # k cannot be read from variable-length lists


def test_conform_refuses_overflow_and_kind_changes():
    overflow = rollouts_table().set_column(1, "sample_idx", pa.array([0, 1, 2**40], pa.int64()))
    with pytest.raises(SchemaError) as error:
        conform(overflow, rollouts, PATH)
    message = str(error.value)
    assert PATH in message and "'sample_idx'" in message and "int32" in message and "int64" in message

    as_text = rollouts_table().set_column(1, "sample_idx", pa.array(["0", "1", "2"]))
    with pytest.raises(SchemaError, match="'sample_idx': expected type int32, found string"):
        conform(as_text, rollouts, PATH)


# --- column-level errors ------------------------------------------------------------------------


def test_missing_column_names_file_column_and_type():
    table = rollouts_table().drop_columns(["behavior_logprobs"])
    with pytest.raises(SchemaError) as error:
        validate(table, rollouts, PATH)
    message = str(error.value)
    assert PATH in message and "'behavior_logprobs'" in message and "list<item: float>" in message
    assert error.value.path == PATH


def test_unexpected_column_is_refused():
    table = sft_table().append_column("extra", pa.array([1, 2]))
    with pytest.raises(SchemaError, match=r"unexpected column\(s\) \['extra'\]") as error:
        validate(table, sft_samples, PATH)
    assert PATH in str(error.value)


def test_wrong_type_names_file_column_expected_and_found():
    table = rollouts_table().set_column(1, "sample_idx", pa.array([0, 1, 0], pa.int64()))
    with pytest.raises(SchemaError) as error:
        validate(table, rollouts, PATH)
    message = str(error.value)
    assert PATH in message
    assert "column 'sample_idx': expected type int32, found int64" in message


def test_null_names_first_bad_row():
    table = pa.table(
        {"prompt_id": ["p0", "p1", None], "prompt": ["a", "b", "c"], "answer": [None] * 3, "split": ["t"] * 3}
    )
    table = table.cast(pa.schema([field.with_nullable(True) for field in prompts.schema()]))
    with pytest.raises(SchemaError) as error:
        validate(table, prompts, PATH)
    message = str(error.value)
    assert PATH in message and "column 'prompt_id', row 2" in message and "found null" in message


def test_null_inside_a_list_is_reported_at_its_row():
    table = pa.table(
        {"prompt_id": ["p0", "p1", "p2"], "prompt_ids": [[1], [2], [3]], "response_ids": [[4], [5], [6, None]]}
    ).cast(pa.schema([field.with_nullable(True) for field in sft_samples.schema()]))
    # a second chunk checks that rows count across chunks
    table = pa.concat_tables([table.slice(0, 1), table.slice(1)])
    with pytest.raises(SchemaError, match=r"column 'response_ids', row 2: expected a value, found null"):
        validate(table, sft_samples, PATH)


# --- row rules ----------------------------------------------------------------------------------


def test_answer_may_be_null_but_prompt_may_not_be_empty():
    validate(prompts_table(), prompts, PATH)
    table = pa.Table.from_pydict(
        {"prompt_id": ["a", "b"], "prompt": ["x", "  "], "answer": [None, None], "split": ["t", "t"]},
        schema=prompts.schema(),
    )
    with pytest.raises(SchemaError, match=r"column 'prompt', row 1: expected a non-empty prompt"):
        validate(table, prompts, PATH)


def test_duplicate_prompt_id_names_the_id_and_both_rows():
    table = pa.Table.from_pydict(
        {"prompt_id": ["a", "b", "c", "b"], "prompt": ["w", "x", "y", "z"], "answer": [None] * 4, "split": ["t"] * 4},
        schema=prompts.schema(),
    )
    with pytest.raises(SchemaError) as error:
        validate(table, prompts, PATH)
    message = str(error.value)
    assert PATH in message and "'prompt_id', row 3" in message and "'b'" in message and "first at row 1" in message


def test_empty_sft_response_is_refused():
    table = pa.Table.from_pydict(
        {"prompt_id": ["p0", "p1"], "prompt_ids": [[1], [2]], "response_ids": [[3], []]}, schema=sft_samples.schema()
    )
    with pytest.raises(SchemaError, match=r"column 'response_ids', row 1: expected at least one token"):
        validate(table, sft_samples, PATH)


def test_behaviour_logprob_length_mismatch_names_row_and_both_lengths():
    table = rollouts_table(behavior_logprobs=[[-0.1, -0.2], [-0.3], [-0.4, -0.5]])
    with pytest.raises(SchemaError) as error:
        validate(table, rollouts, PATH)
    message = str(error.value)
    assert PATH in message and "column 'behavior_logprobs', row 2" in message
    assert "(3, the length of response_ids)" in message and "found 2" in message


def test_unknown_finish_reason_is_refused():
    table = rollouts_table(finish_reason=["stop", "abort", "stop"])
    with pytest.raises(SchemaError,
                       match=r"column 'finish_reason', row 1: expected one of \['stop', 'length'\], found 'abort'"):
        validate(table, rollouts, PATH)


def test_teacher_columns_must_have_equal_lengths():
    table = cache_table()
    bad_ids = pa.array([[[0, 1]] * 2, [[0, 1]] * 1, [[0, 1]] * 2], pa.list_(pa.list_(pa.int32(), 2)))
    table = table.set_column(4, "teacher_topk_ids", bad_ids)
    with pytest.raises(SchemaError) as error:
        validate(table, teacher_cache, PATH)
    message = str(error.value)
    assert (PATH in message and "column 'teacher_topk_ids', row 2" in message and "(3, " in message
            and "found 2" in message)


def test_k_is_read_from_the_table_and_must_be_positive():
    assert teacher_cache.k_of(cache_table(k=5)) == 5
    assert teacher_cache.k_of(teacher_cache.schema(7)) == 7
    validate(cache_table(k=5), teacher_cache, PATH)  # no k given: read from the table
    with pytest.raises(SchemaError, match=r"'teacher_topk_ids': expected type .*\[4\]>, found .*\[5\]>"):
        validate(cache_table(k=5), teacher_cache, PATH, k=4)
    # k is read from the ids; top-k log-probs of another width are a type error
    mixed = cache_table(k=5).set_column(5, "teacher_topk_logprobs", cache_table(k=4)["teacher_topk_logprobs"])
    with pytest.raises(SchemaError, match=r"'teacher_topk_logprobs': expected type .*halffloat>\[5\]>"):
        validate(mixed, teacher_cache, PATH)
    with pytest.raises(ValueError, match="positive int"):
        teacher_cache.schema(0)


# --- teacher cache vs rollouts ------------------------------------------------------------------

ROLLOUTS_PATH = "/data/rollouts/part-00003.parquet"
CACHE_PATH = "/data/teacher_cache/part-00003.parquet"


def test_aligned_cache_passes():
    teacher_cache.check_aligned(cache_table(), rollouts_table(), CACHE_PATH, ROLLOUTS_PATH)


def test_misaligned_keys_name_the_first_row_and_the_stage():
    cache = cache_table(keys=[("p0", 0, 0), ("p1", 0, 0), ("p0", 1, 0)], lengths=(2, 3, 1))
    with pytest.raises(SchemaError) as error:
        teacher_cache.check_aligned(cache, rollouts_table(), CACHE_PATH, ROLLOUTS_PATH)
    message = str(error.value)
    assert CACHE_PATH in message and ROLLOUTS_PATH in message and "row 1" in message
    assert "'prompt_id': 'p0', 'sample_idx': 1" in message and "teacher_logprobs" in message


def test_alignment_does_not_depend_on_chunking():
    rollouts_chunked = pa.concat_tables([rollouts_table().slice(0, 1), rollouts_table().slice(1)])
    teacher_cache.check_aligned(cache_table(), rollouts_chunked, CACHE_PATH, ROLLOUTS_PATH)


def test_misaligned_lengths_and_row_counts():
    with pytest.raises(SchemaError, match=r"row 2 is not aligned.*3 teacher_token_logprobs.*found .* and 2"):
        teacher_cache.check_aligned(cache_table(lengths=(2, 1, 2)), rollouts_table(), CACHE_PATH, ROLLOUTS_PATH)
    with pytest.raises(SchemaError, match=r"has 2 rows but .* has 3; they first differ at row 2"):
        teacher_cache.check_aligned(cache_table().slice(0, 2), rollouts_table(), CACHE_PATH, ROLLOUTS_PATH)


# --- file metadata ------------------------------------------------------------------------------


def test_file_metadata_must_name_this_artefact_and_version():
    check_metadata(rollouts.schema(), rollouts, PATH)
    with pytest.raises(SchemaError) as error:
        check_metadata(rollouts.schema(), teacher_cache, PATH)
    message = str(error.value)
    assert PATH in message and "holds rollouts v2, expected teacher_cache v3" in message
    assert "another stage or another version" in message and "teacher_logprobs" in message

    newer = rollouts.schema().with_metadata({SCHEMA_KEY: b"rollouts", VERSION_KEY: str(rollouts.VERSION + 1).encode()})
    with pytest.raises(SchemaError, match="holds rollouts v3, expected rollouts v2"):
        check_metadata(newer, rollouts, PATH)

    with pytest.raises(SchemaError, match="not written by this pipeline"):
        check_metadata(rollouts.schema().remove_metadata(), rollouts, PATH)


# --- the behaviour top-k columns (rollouts.student_top_k) -------------------------------------------


def test_behaviour_top_k_columns_round_trip_their_width_and_refuse_a_wrong_length():
    ids = [[[4, 1]] * 2, [[6, 0]], [[7, 2]] * 3]
    table = conform(rollouts_table().append_column("behavior_topk_ids", pa.array(ids)), rollouts, PATH, student_k=2)
    assert rollouts.student_k_of(table) == 2 and rollouts.student_k_of(rollouts_table()) == 0
    assert table.schema.field("behavior_topk_ids").type == pa.list_(pa.list_(pa.int32(), 2))
    cache = cache_table().append_column(teacher_cache.BEHAVIOR_TOPK, pa.array([[[-1.0, -2.0]] * n for n in (2, 1, 3)]))
    cache = conform(cache, teacher_cache, PATH, k=2, student_k=2)
    assert (teacher_cache.k_of(cache), teacher_cache.student_k_of(cache)) == (2, 2)
    teacher_cache.check_aligned(cache, table, PATH, "rollouts.parquet")
    with pytest.raises(SchemaError, match=r"holds the teacher at 0 behaviour top-k ids a token but rollouts.parquet "
                                          r"holds 2"):
        teacher_cache.check_aligned(cache_table(), table, PATH, "rollouts.parquet")

    short = rollouts_table().append_column("behavior_topk_ids", pa.array([[[4, 1]] * 2, [], [[7, 2]] * 3]))
    with pytest.raises(SchemaError, match=r"column 'behavior_topk_ids', row 1: expected one entry per response token "
                                          r"\(1, the length of response_ids\), found 0"):
        conform(short, rollouts, PATH, student_k=2)
    with pytest.raises(SchemaError, match=r"'behavior_topk_ids': expected type list<fixed_size_list<_, k>>"):
        conform(rollouts_table().append_column("behavior_topk_ids", pa.array([[[1]], [[2]], [[3]]],
                                                                             pa.list_(pa.large_list(pa.int32())))),
                rollouts, PATH)


def test_version_1_files_are_still_read_and_other_versions_refused():
    for artefact, schema in ((rollouts, rollouts.schema()), (teacher_cache, teacher_cache.schema(2)),
                             (prompts, prompts.schema())):
        assert artefact.READS == tuple(range(1, artefact.VERSION + 1))
        check_metadata(schema.with_metadata({SCHEMA_KEY: artefact.NAME.encode(), VERSION_KEY: b"1"}), artefact, PATH)
        name, version = artefact.NAME, artefact.VERSION
        with pytest.raises(SchemaError, match=rf"holds {name} v0, expected {name} v{version}"):
            check_metadata(schema.with_metadata({SCHEMA_KEY: artefact.NAME.encode(), VERSION_KEY: b"0"}), artefact,
                           PATH)
