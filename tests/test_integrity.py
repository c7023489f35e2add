"""Every shard carries a CRC-32 of all its bytes: a flipped bit anywhere (data pages, dictionary pages,
footer) is refused by every read path, named with the fix, and recomputed by a rerun."""

from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_schemas import SchemaError, rollouts, teacher_cache
from pipeline import cli, shards
from pipeline.inspect_cache import summarise
from tests.conftest import section

FIX = "Fix: delete it and rerun the teacher_logprobs stage"


def flip_offsets(path, per_region: int = 8, seed: int = 0) -> dict[str, list[int]]:
    """Seeded byte offsets in each region of a Parquet file: dictionary pages, data pages, footer
    (the Thrift metadata, its length and the closing magic)."""
    metadata = pq.read_metadata(path)
    size = os.path.getsize(path)
    footer_start = size - 8 - int.from_bytes(open(path, "rb").read()[-8:-4], "little")
    dictionary, data = [], []
    for g in range(metadata.num_row_groups):
        for c in range(metadata.num_columns):
            column = metadata.row_group(g).column(c)
            start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            dictionary.extend(range(start, column.data_page_offset))
            data.extend(range(column.data_page_offset, start + column.total_compressed_size))
    rng = np.random.default_rng(seed)
    regions = {"dictionary page": dictionary, "data page": [o for o in data if o < footer_start],
               "footer": list(range(footer_start, size))}
    picked = {name: sorted(rng.choice(offsets, per_region, replace=False).tolist())
              for name, offsets in regions.items()}
    picked["footer"][-1] = size - 1  # the closing magic too
    return picked


def flip(path, offset: int, bit: int) -> bytes:
    """Flip one bit of `path` in place; returns the original bytes."""
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 1 << bit
    path.write_bytes(bytes(damaged))
    return original


def test_offsets_cover_dictionary_and_data_pages_and_footer(tiny_run):
    path = shards.shard_path(tiny_run / "data/teacher_cache", 1)
    regions = flip_offsets(path)
    assert all(len(offsets) == 8 for offsets in regions.values())
    assert max(regions["dictionary page"]) < min(regions["footer"])


def test_a_flipped_bit_is_refused_by_every_read_path(run_copy):
    from pipeline.cache import open_cache

    cache_dir, rollouts_dir = run_copy / "data/teacher_cache", run_copy / "data/rollouts"
    path = shards.shard_path(cache_dir, 1)
    regions = flip_offsets(path)
    rng = np.random.default_rng(1)
    tried = 0
    for region, offsets in regions.items():
        for offset in offsets:
            original = flip(path, offset, int(rng.integers(8)))
            readers = {
                "read_shard": lambda: shards.read_shard(path, teacher_cache),
                "read_shards": lambda: shards.read_shards(cache_dir, teacher_cache),
                "open_cache": lambda: open_cache(rollouts_dir, cache_dir),
                "opd inspect": lambda: summarise(cache_dir),
            }
            for name, read in readers.items():
                with pytest.raises(SchemaError) as error:
                    read()
                message = str(error.value)
                assert str(path) in message and "truncated or corrupt" in message, (name, region, offset)
                assert FIX in message, (name, region, offset)
            assert not shards.shard_is_complete(path), (region, offset)  # resume deletes and recomputes it
            path.write_bytes(original)
            tried += 1
    assert tried >= 24
    shards.read_shards(cache_dir, teacher_cache)  # restored: reads again


def test_replace_stale_never_keeps_a_flipped_shard_and_rescores_it(run_copy):
    from stages import teacher_logprobs

    cache_dir = run_copy / "data/teacher_cache"
    path = shards.shard_path(cache_dir, 1)
    before = shards.read_shard(path, teacher_cache)[0]
    regions = flip_offsets(path, per_region=1)
    for replace_stale in (True, False):  # with the flag (dvc repro) and by hand: a damaged shard is never kept
        for region, (offset,) in regions.items():
            flip(path, offset, 3)
            scored = teacher_logprobs.run(section("teacher_logprobs"), section("engine"), run_copy / "models/base",
                                          run_copy / "data/rollouts", cache_dir, replace_stale=replace_stale)
            assert scored == 1, region
            assert shards.read_shard(path, teacher_cache)[0].equals(before)


def test_opd_stage_refuses_a_flipped_cache_before_training(run_copy):
    from stages import opd

    path = shards.shard_path(run_copy / "data/teacher_cache", 0)
    flip(path, flip_offsets(path)["data page"][0], 5)
    with pytest.raises(SchemaError, match="checksum mismatch"):
        opd.run(section("opd"), run_copy / "models/sft", run_copy / "data/rollouts", run_copy / "data/teacher_cache",
                run_copy / "models/opd2")
    assert not (run_copy / "models/opd2").exists()


def test_a_damaged_shard_reads_as_one_line_in_every_command(run_copy, capsys):
    """`opd inspect` and a stage give the same one-line error as read_shard, with no traceback."""
    path = shards.shard_path(run_copy / "data/rollouts", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SchemaError) as expected:
        shards.read_shard(path, rollouts)
    for argv in (["inspect", str(run_copy / "data/rollouts")],
                 ["teacher_logprobs", "--params", str(cli.ROOT / "tests/tiny_params.yaml"), "--models",
                  str(run_copy / "models/base"), "--rollouts", str(run_copy / "data/rollouts"),
                  "--out", str(run_copy / "cache2")]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith(str(expected.value)) and err.startswith(f"{argv[0]}: error: ")


def test_checksum_detects_every_single_bit_of_a_small_shard(tmp_path):
    """Exhaustive on a small shard: each of its bits flipped alone is caught."""
    from tests.test_shards import rollouts_table

    path = shards.write_shard(tmp_path, 0, rollouts_table(), rollouts, {})
    original = path.read_bytes()
    for offset in range(len(original)):
        for bit in range(8):
            damaged = bytearray(original)
            damaged[offset] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            assert not shards.shard_is_complete(path), (offset, bit)
    path.write_bytes(original)
    assert shards.shard_is_complete(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_names_the_shard_and_leaves_no_final_file(tmp_path, monkeypatch, code):
    """Disk full or a read-only directory while a shard is written: one clear error, no file under a
    final name (a complete-looking but short shard), finished shards untouched."""
    from tests.test_shards import rollouts_table

    done = shards.write_shard(tmp_path, 0, rollouts_table(), rollouts, {})
    before = done.read_bytes()

    def failing_write(table, path):
        path.write_bytes(b"PAR1" + bytes(100))  # what reached the disk before it filled up
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(shards, "write_parquet", failing_write)
    with pytest.raises(shards.ShardWriteError) as error:
        shards.write_shard(tmp_path, 1, rollouts_table(), rollouts, {})
    message = str(error.value)
    assert str(shards.shard_path(tmp_path, 1)) in message and os.strerror(code) in message
    assert "Fix: free space on that disk or make" in message and "rerun the rollouts stage" in message
    assert sorted(os.listdir(tmp_path)) == ["part-00000.parquet"] and done.read_bytes() == before
