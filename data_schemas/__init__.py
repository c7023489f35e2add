"""Arrow schemas for every artefact the pipeline writes, and the checks that guard them.

Each artefact module (``prompts``, ``sft_samples``, ``rollouts``, ``teacher_cache``) declares

* ``NAME`` and ``VERSION``, stored in every file's schema metadata; optionally ``READS``, the versions
  still read (older files whose columns are a special case of the current schema), default ``(VERSION,)``;
* ``PRODUCED_BY``, the stage to rerun when a file is bad (used in error messages);
* ``schema(**kw) -> pa.Schema`` and ``check_rows(table, path)`` for row-level rules;
* optionally ``schema_kw_from(schema, path) -> dict``, which reads schema parameters (the
  teacher cache's k) from a file or table so readers need not be told them.

The functions here apply those declarations the same way on write and on read, so a bad table
fails where it is written or opened, with a message naming the file, column, row and fix.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_KEY = b"opd.schema"
VERSION_KEY = b"opd.schema_version"
PROVENANCE_KEY = b"opd.provenance"  # JSON object, utf-8


class SchemaError(ValueError):
    """An artefact's data does not match its contract. The message always names the file."""

    def __init__(self, message: str, path=None):
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path


def schema_metadata(name: str, version: int) -> dict[bytes, bytes]:
    """The metadata every artefact schema carries, so a file says what it holds."""
    return {SCHEMA_KEY: name.encode(), VERSION_KEY: str(version).encode()}


def row_error(path, column: str, row: int, expected: str, found: str, fix: str) -> SchemaError:
    """The one message shape for a bad value: file, column, row, expected, found, fix."""
    return SchemaError(
        f"{path}: column '{column}', row {row}: expected {expected}, found {found}. Fix: {fix}", path
    )


def topk_column(arrays: list[np.ndarray], value_type: pa.DataType, k: int) -> pa.Array:
    """A top-k column, list<fixed_size_list<value_type, k>>, from per-row [R, k] arrays, without Python
    loops over tokens."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), k)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def topk_width(schema: pa.Schema, column: str, produced_by: str, path=None) -> int:
    """k of `column`, a list<fixed_size_list<_, k>> column of `schema`; 0 if the schema has no such column."""
    if column not in schema.names:
        return 0
    type_ = schema.field(column).type
    if not (pa.types.is_list(type_) and pa.types.is_fixed_size_list(type_.value_type)):
        where = f"{path}: " if path is not None else ""
        raise SchemaError(
            f"{where}column '{column}': expected type list<fixed_size_list<_, k>>, found {type_}, so k cannot be "
            f"read from it. Fix: build it as fixed-size lists (data_schemas.topk_column), or pass k= (student_k= "
            f"for a behaviour top-k) explicitly when writing; if this file is left from an older run, delete it "
            f"and rerun {produced_by}.",
            path,
        )
    return type_.value_type.list_size


def check_topk_lengths(table: pa.Table, columns, reference: str, path, fix: str) -> None:
    """Each of `columns` holds, in every row, as many entries as the list column `reference` (one per token)."""
    expected = pc.list_value_length(table[reference])
    for column in columns:
        length = pc.list_value_length(table[column])
        row = first_true_row(pc.not_equal(length, expected))
        if row is not None:
            raise row_error(path, column, row, f"one entry per response token ({expected[row].as_py()}, the length "
                            f"of {reference})", f"{length[row].as_py()}", fix)


def first_true_row(mask) -> int | None:
    """Index of the first True in a boolean (Chunked)Array, or None."""
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def _first_null_in_array(array: pa.Array) -> int | None:
    # Look for nulls level by level down nested lists (cheap: flatten is zero-copy); only when
    # one is found, map its position back up to the top-level row it belongs to.
    levels = [array]
    while levels[-1].null_count == 0:
        if not _is_list(levels[-1].type):
            return None
        levels.append(levels[-1].flatten())
    index = first_true_row(levels[-1].is_null())
    for parent in reversed(levels[:-1]):
        index = pc.list_parent_indices(parent)[index].as_py()
    return index


def first_null_row(column: pa.ChunkedArray) -> int | None:
    """First row holding a null, at the top level or inside its lists; None if there is none."""
    offset = 0
    for chunk in column.chunks:
        row = _first_null_in_array(chunk)
        if row is not None:
            return offset + row
        offset += len(chunk)
    return None


def _fix_hint(artefact) -> str:
    return (
        f"the code that builds the {artefact.NAME} table must follow {artefact.__name__}.schema(); "
        f"if this file is left from an older run, delete it and rerun {artefact.PRODUCED_BY}"
    )


def expected_schema(artefact, found: pa.Schema, path, **schema_kw) -> pa.Schema:
    """artefact.schema(**schema_kw); parameters not given are read from `found` (the teacher cache's k)."""
    if not schema_kw and hasattr(artefact, "schema_kw_from"):
        schema_kw = artefact.schema_kw_from(found, path)
    return artefact.schema(**schema_kw)


def _check_columns(found: pa.Schema, expected: pa.Schema, artefact, path) -> None:
    missing = [field for field in expected if field.name not in found.names]
    if missing:
        listed = ", ".join(f"'{field.name}' (type {field.type})" for field in missing)
        raise SchemaError(
            f"{path}: missing column(s) {listed} for {artefact.NAME} v{artefact.VERSION}; "
            f"found columns {found.names}. Fix: {_fix_hint(artefact)}.",
            path,
        )
    unexpected = [name for name in found.names if name not in expected.names]
    if unexpected:
        raise SchemaError(
            f"{path}: unexpected column(s) {unexpected} for {artefact.NAME} v{artefact.VERSION}; "
            f"expected exactly {expected.names}. Fix: drop them, or add them to "
            f"{artefact.__name__}.schema() and bump its VERSION.",
            path,
        )
    duplicated = sorted({name for name in found.names if found.names.count(name) > 1})
    if duplicated:
        raise SchemaError(f"{path}: column(s) {duplicated} appear more than once. Fix: {_fix_hint(artefact)}.", path)


def _type_error(path, column: str, expected: pa.DataType, found: pa.DataType, artefact,
                detail: str = "") -> SchemaError:
    return SchemaError(
        f"{path}: column '{column}': expected type {expected}, found {found}{detail}. Fix: {_fix_hint(artefact)}.",
        path,
    )


def _validate_against(table: pa.Table, expected: pa.Schema, artefact, path) -> None:
    _check_columns(table.schema, expected, artefact, path)
    for field in expected:
        found = table.schema.field(field.name).type
        if found != field.type:
            raise _type_error(path, field.name, field.type, found, artefact)
    for field in expected:
        if field.nullable:
            continue
        row = first_null_row(table.column(field.name))
        if row is not None:
            raise row_error(path, field.name, row, "a value", "null", _fix_hint(artefact))
    artefact.check_rows(table, path)


def validate(table: pa.Table, artefact, path, **schema_kw) -> None:
    """Check columns, exact types, nulls and the artefact's row rules; raise SchemaError on the first problem.

    `path` is the file the table was read from or is about to be written to; every message names it.
    """
    _validate_against(table, expected_schema(artefact, table.schema, path, **schema_kw), artefact, path)


def _same_kind(found: pa.DataType, expected: pa.DataType) -> bool:
    # Widths may change (int64 -> int32, float64 -> float16, large_string -> string,
    # list -> fixed_size_list), kinds may not: a string column is never parsed into numbers.
    if pa.types.is_null(found):
        return True  # an all-null column; the null check reports it if the column is required
    if pa.types.is_integer(expected):
        return pa.types.is_integer(found)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(found)
    if pa.types.is_string(expected):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    if _is_list(expected):
        return _is_list(found) and _same_kind(found.value_type, expected.value_type)
    return found == expected


def conform(table: pa.Table, artefact, path, **schema_kw) -> pa.Table:
    """Return `table` with the artefact's exact schema (column order, widths, metadata), validated.

    Producers may hand in int64 / float64 / large_string / nested-list columns (numpy, polars and
    Python lists give those); they are cast losslessly where the data allows (an int32 overflow or
    a top-k list of the wrong length is an error, never a silent truncation).
    """
    expected = expected_schema(artefact, table.schema, path, **schema_kw)
    _check_columns(table.schema, expected, artefact, path)
    columns = []
    for field in expected:
        column = table.column(field.name)
        if column.type != field.type:
            if not _same_kind(column.type, field.type):
                raise _type_error(path, field.name, field.type, column.type, artefact)
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise _type_error(path, field.name, field.type, column.type, artefact, f" ({error})") from error
        columns.append(column)
    conformed = pa.Table.from_arrays(columns, schema=expected)
    _validate_against(conformed, expected, artefact, path)
    return conformed


def check_metadata(schema: pa.Schema, artefact, path) -> None:
    """A file must say it holds this artefact at this schema version."""
    metadata = schema.metadata or {}
    name = metadata.get(SCHEMA_KEY, b"").decode()
    version = metadata.get(VERSION_KEY, b"").decode()
    if not name:
        raise SchemaError(
            f"{path}: no '{SCHEMA_KEY.decode()}' metadata, so it was not written by this pipeline's "
            f"write_shard (expected {artefact.NAME} v{artefact.VERSION}). "
            f"Fix: delete it and rerun {artefact.PRODUCED_BY}.",
            path,
        )
    if name != artefact.NAME or version not in {str(v) for v in getattr(artefact, "READS", (artefact.VERSION,))}:
        raise SchemaError(
            f"{path}: holds {name} v{version}, expected {artefact.NAME} v{artefact.VERSION}: "
            f"it was written by another stage or another version of the pipeline. "
            f"Fix: check the path; otherwise delete it and rerun {artefact.PRODUCED_BY}.",
            path,
        )
