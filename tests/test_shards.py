"""Shard I/O: atomic writes, never-rewritten shards, recovery from crashes, checked reads."""

from __future__ import annotations

import logging
import os

import polars as pl
import pyarrow.parquet as pq
import pytest

from data_schemas import SCHEMA_KEY, VERSION_KEY, SchemaError, prompts, rollouts, sft_samples, teacher_cache
from pipeline import shards
from pipeline.shards import (
    list_shards,
    pending_shards,
    read_shard,
    read_shards,
    shard_is_complete,
    shard_path,
    write_shard,
)
from tests.tables import cache_table, prompts_table, rollouts_table, sft_table

PROVENANCE = {"teacher": {"model": "toy-teacher", "sha256": "abc"}, "k": 2, "temperature": 0.7}


def truncate_to_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def temp_files(directory):
    return sorted(name for name in os.listdir(directory) if ".tmp-" in name)


def test_shard_names():
    assert shard_path("out", 3).as_posix() == "out/part-00003.parquet"
    assert shards.SHARD_TEMPLATE == "part-{:05d}.parquet" and shards.COMPRESSION == "zstd"
    with pytest.raises(ValueError):
        shard_path("out", -1)


@pytest.mark.parametrize(
    "artefact, make",
    [(prompts, prompts_table), (sft_samples, sft_table), (rollouts, rollouts_table), (teacher_cache, cache_table)],
)
def test_round_trip(tmp_path, artefact, make):
    table = make()
    path = write_shard(tmp_path, 0, table, artefact, PROVENANCE)
    assert path == tmp_path / "part-00000.parquet" and shard_is_complete(path)
    assert temp_files(tmp_path) == []

    read, provenance = read_shard(path, artefact)
    assert provenance == PROVENANCE
    assert read.to_pylist() == table.to_pylist()
    assert read.schema.equals(table.schema, check_metadata=False)

    metadata = pq.read_metadata(path)
    assert metadata.metadata[SCHEMA_KEY] == artefact.NAME.encode()
    assert metadata.metadata[VERSION_KEY] == str(artefact.VERSION).encode()
    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_cache_layout_is_the_benchmarked_one(tmp_path):
    """bench/cache.py picked the layout: byte-stream-split floats, no dictionary on token ids or
    log-probs, dictionary on the keys. pyarrow ignores a wrongly named nested column silently, so
    check what reached the file."""
    path = write_shard(tmp_path, 0, cache_table(), teacher_cache, PROVENANCE)
    group = pq.read_metadata(path).row_group(0)
    encodings = {group.column(i).path_in_schema: set(group.column(i).encodings) for i in range(group.num_columns)}
    for leaf in ("teacher_token_logprobs.list.element", "teacher_topk_logprobs.list.element.list.element"):
        assert "BYTE_STREAM_SPLIT" in encodings[leaf] and "RLE_DICTIONARY" not in encodings[leaf]
    assert "RLE_DICTIONARY" not in encodings["teacher_topk_ids.list.element.list.element"]
    assert "RLE_DICTIONARY" in encodings["prompt_id"]
    assert {group.column(i).compression for i in range(group.num_columns)} == {"ZSTD"}


def test_row_groups_are_sized_for_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 2)
    path = write_shard(tmp_path, 0, rollouts_table(), rollouts, {})
    assert pq.read_metadata(path).num_row_groups == 2


def test_teacher_cache_k_is_read_from_the_file(tmp_path):
    for index, k in enumerate((3, 5)):
        path = write_shard(tmp_path / f"k{k}", index, cache_table(k=k), teacher_cache, {})
        table, _ = read_shard(path, teacher_cache)
        assert teacher_cache.k_of(table) == k


def test_write_refuses_an_existing_shard(tmp_path):
    path = write_shard(tmp_path, 0, rollouts_table(), rollouts, {"run": 1})
    before = path.read_bytes()
    with pytest.raises(FileExistsError,
                       match=r"part-00000\.parquet already exists: finished shards are never rewritten"):
        write_shard(tmp_path, 0, rollouts_table(), rollouts, {"run": 2})
    assert path.read_bytes() == before


def test_invalid_table_writes_nothing(tmp_path):
    bad = rollouts_table(finish_reason=["stop", "abort", "stop"])
    with pytest.raises(SchemaError) as error:
        write_shard(tmp_path, 4, bad, rollouts, {})
    assert str(tmp_path / "part-00004.parquet") in str(error.value) and "row 1" in str(error.value)
    assert not (tmp_path / "part-00004.parquet").exists() and temp_files(tmp_path) == []


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path, 0, sft_table(), sft_samples, {})
    assert os.listdir(tmp_path) == []


def test_provenance_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_shard(tmp_path, 0, sft_table(), sft_samples, {"when": object()})
    assert os.listdir(tmp_path) == []


def test_truncated_shard_is_detected_reported_and_recomputed(tmp_path, caplog):
    for index in range(3):
        write_shard(tmp_path, index, rollouts_table(), rollouts, {})
    broken = shard_path(tmp_path, 1)
    truncate_to_half(broken)
    assert not shard_is_complete(broken)
    assert not shard_is_complete(tmp_path / "absent.parquet")

    with pytest.raises(SchemaError) as error:
        read_shard(broken, rollouts)
    assert str(broken) in str(error.value) and "delete it and rerun" in str(error.value)

    with caplog.at_level(logging.WARNING):
        assert pending_shards(tmp_path, 4) == [1, 3]
    assert str(broken) in caplog.text and "truncated or corrupt" in caplog.text
    assert not broken.exists()

    write_shard(tmp_path, 1, rollouts_table(), rollouts, {})
    assert pending_shards(tmp_path, 3) == []


def test_pending_shards_cleans_temp_files(tmp_path, caplog):
    write_shard(tmp_path, 0, sft_table(), sft_samples, {})
    (tmp_path / ".part-00001.parquet.tmp-123").write_bytes(b"half a shard")
    (tmp_path / ".part-00002.parquet.tmp-456").write_bytes(b"another worker's shard")
    with caplog.at_level(logging.WARNING):
        assert pending_shards(tmp_path, 3, indices=[0, 1]) == [1]
    assert ".part-00001.parquet.tmp-123" in caplog.text
    assert temp_files(tmp_path) == [".part-00002.parquet.tmp-456"]  # not ours: left alone
    assert pending_shards(tmp_path, 3) == [1, 2]
    assert temp_files(tmp_path) == []
    assert pending_shards(tmp_path / "missing", 2) == [0, 1]


def test_pending_shards_warns_about_shards_beyond_num_shards(tmp_path, caplog):
    write_shard(tmp_path, 5, sft_table(), sft_samples, {})
    with caplog.at_level(logging.WARNING):
        assert pending_shards(tmp_path, 2) == [0, 1]
    assert "part-00005.parquet" in caplog.text and "beyond num_shards=2" in caplog.text


def test_read_shard_refuses_another_artefact_or_version(tmp_path):
    path = write_shard(tmp_path, 0, rollouts_table(), rollouts, {})
    with pytest.raises(SchemaError) as error:
        read_shard(path, teacher_cache)
    message = str(error.value)
    assert str(path) in message and "holds rollouts v2, expected teacher_cache v3" in message

    old = tmp_path / "old" / "part-00000.parquet"
    old.parent.mkdir()
    table = rollouts_table()
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"rollouts", VERSION_KEY: b"0"}), old)
    with pytest.raises(SchemaError, match=r"holds rollouts v0, expected rollouts v2: "
                                          r"it was written by another stage or another version"):
        read_shard(old, rollouts)


def test_read_shard_validates_columns(tmp_path):
    path = tmp_path / "part-00000.parquet"
    table = rollouts_table().drop_columns(["finish_reason"])
    shards.write_parquet(table.replace_schema_metadata(rollouts.schema().metadata), path)  # checksummed, not validated
    with pytest.raises(SchemaError) as error:
        read_shard(path, rollouts)
    assert str(path) in str(error.value) and "'finish_reason' (type string)" in str(error.value)


def test_read_shards_concatenates_in_order(tmp_path):
    table = rollouts_table()
    # written out of order, and with more than 9 shards so name order and index order could differ
    for index in reversed(range(11)):
        write_shard(tmp_path, index, table.slice(index % 3, 1), rollouts, {"shard": index})
    assert [path.name for path in list_shards(tmp_path)][-2:] == ["part-00009.parquet", "part-00010.parquet"]
    combined, provenance = read_shards(tmp_path, rollouts)
    assert provenance == {"shard": 0}
    assert combined.column("sample_idx").to_pylist() == [table["sample_idx"][i % 3].as_py() for i in range(11)]


def test_read_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no shards .*teacher_logprobs") as error:
        read_shards(tmp_path, teacher_cache)
    assert str(tmp_path) in str(error.value)

    write_shard(tmp_path, 0, cache_table(k=2), teacher_cache, {})
    write_shard(tmp_path, 2, cache_table(k=2), teacher_cache, {})
    with pytest.raises(SchemaError, match=r"part-00001\.parquet is missing"):
        read_shards(tmp_path, teacher_cache)

    write_shard(tmp_path, 1, cache_table(k=3), teacher_cache, {})
    with pytest.raises(SchemaError) as error:
        read_shards(tmp_path, teacher_cache)
    message = str(error.value)
    assert "part-00001.parquet" in message and "part-00000.parquet" in message and "'teacher_topk_ids'" in message


def test_polars_reads_the_teacher_cache(tmp_path):
    for index in range(2):
        write_shard(tmp_path, index, cache_table(k=4), teacher_cache, {})
    (tmp_path / ".part-00002.parquet.tmp-1").write_bytes(b"in progress")  # must not be picked up
    frame = pl.scan_parquet(str(tmp_path) + "/*.parquet").collect()
    assert frame.height == 6
    assert frame.schema["teacher_topk_ids"] == pl.List(pl.Array(pl.Int32, 4))
    assert frame.schema["teacher_topk_logprobs"] == pl.List(pl.Array(pl.Float16, 4))
    assert frame.schema["teacher_token_logprobs"] == pl.List(pl.Float32)
    assert frame["teacher_topk_logprobs"][0].to_list() == [[-1.0] * 4] * 2
