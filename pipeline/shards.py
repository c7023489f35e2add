"""Parquet shard I/O: one naming rule, atomic writes, checked reads.

An artefact directory holds part-00000.parquet, part-00001.parquet, ... A shard appears under its
final name only when complete (written to a temporary name, fsynced, renamed), and a finished
shard is never rewritten. So a crash leaves finished shards plus at most some temp files, and a
rerun recomputes just the shards that `pending_shards` reports.

Every shard carries a CRC-32 of all its bytes (data and dictionary pages, footer, magic) in its
footer, and every read checks it first, so a flipped bit or a partial copy is refused with the file
named instead of training on it. bench/loader.py measured the options on the teacher cache: CRC-32 of
the whole file costs 2-3% of a shard's read, sha256 ~11% (over the 5% budget), and Parquet's own page
checksums cost nothing measurable but leave the footer unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_schemas import PROVENANCE_KEY, SchemaError, check_metadata, conform, validate

log = logging.getLogger(__name__)

SHARD_TEMPLATE = "part-{:05d}.parquet"  # zero-padded so shards sort in order and `*.parquet` globs find them
# Parquet layout, chosen by bench/cache.py (teacher cache at V = 151,936, k = 64: 3.53 bytes per
# top-k entry with pyarrow's defaults, 2.74 with these, float16 log-probs and int32 ids exact).
COMPRESSION = "zstd"  # better ratio than snappy at similar decode speed; pyarrow and polars both read it
# level 1 -> 3 -> 9: 3.12 -> 2.94 -> 2.80 bytes/entry; writes ~3x slower than 1, still far from the bottleneck
COMPRESSION_LEVEL = 9
# floats' bytes grouped by significance: log-probs 1.64 -> 1.16 bytes/entry, ~5x faster float16 decode than dictionary
FLOAT_ENCODING = "BYTE_STREAM_SPLIT"
DATA_PAGE_SIZE = 8 << 20  # zstd compresses each page alone; bigger pages give it more history (2.80 -> 2.74)
# Readers stream one row group at a time; size is flat from ~25k tokens a group (64 rows of the bench)
# up, and a 4k-token row with top-64 is ~1.5 MB, so 256 rows keep a group within a few hundred MB.
ROW_GROUP_SIZE = 256
TOKEN_COLUMNS = ("teacher_token_logprobs", "response_ids")
"""The first of these a shard has is what "tokens" counts (one entry per response token), in
`opd inspect` and in each stage's summary line."""

CHECKSUM_KEY = "opd.crc32"
"""Footer key of the shard's checksum; its value is _CHECKSUM_PREFIX and 8 hex digits."""
# The CRC-32 covers the whole file as written with "00000000" in place of the digits, which are then
# patched in place: the file checks itself, with no sidecar file to keep in step. The prefix makes the
# digits findable in the raw bytes without trusting the (possibly damaged) footer to parse.
_CHECKSUM_PREFIX = b"opd-crc32="
_PLACEHOLDER = b"00000000"

_SHARD_NAME = re.compile(r"^part-(\d+)\.parquet$")
_TEMP_NAME = re.compile(r"^\.part-(\d+)\.parquet\.tmp-")


def file_sha256(path) -> str:
    """Content hash of a finished shard: what a derived artefact records as its input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_sha256(entries) -> str:
    """One sha256 over `name:sha256` lines, in the order given: the hash of a set of files."""
    return hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in entries).encode()).hexdigest()


def files_sha256(paths) -> str:
    """listing_sha256 of the files `paths` (by name, in the order given): e.g. a directory's shards."""
    return listing_sha256((Path(path).name, file_sha256(path)) for path in paths)


def _crc32(data: bytes, at: int) -> bytes:
    """CRC-32 of `data` with the 8 checksum digits at `at` read as the placeholder."""
    view = memoryview(data)
    crc = zlib.crc32(_PLACEHOLDER, zlib.crc32(view[:at]))
    return b"%08x" % zlib.crc32(view[at + len(_PLACEHOLDER):], crc)


def write_parquet(table: pa.Table, path) -> None:
    """Write `table` to `path` in the shard layout (`write_options`), checksum in the footer, fsynced."""
    options = write_options(table.schema)
    row_group_size = options.pop("row_group_size")
    with pq.ParquetWriter(path, table.schema, **options) as writer:
        writer.write_table(table, row_group_size=row_group_size)
        writer.add_key_value_metadata({CHECKSUM_KEY: (_CHECKSUM_PREFIX + _PLACEHOLDER).decode()})
    with open(path, "rb+") as f:
        data = f.read()
        at = data.rindex(_CHECKSUM_PREFIX) + len(_CHECKSUM_PREFIX)
        f.seek(at)
        f.write(_crc32(data, at))
        f.flush()
        os.fsync(f.fileno())  # the data must be on disk before the name says it is complete


def corrupt_shard_error(path, artefact, detail: str) -> SchemaError:
    """The one message for a shard that cannot be trusted (truncated, damaged, failed its checksum)."""
    return SchemaError(
        f"{path} is truncated or corrupt ({detail}). "
        f"Fix: delete it and rerun {artefact.PRODUCED_BY}, which writes the missing shards.",
        path,
    )


def _checksum_problem(data: bytes) -> str | None:
    """Why the checksum of shard bytes `data` fails, or None if it matches."""
    found = data.rfind(_CHECKSUM_PREFIX)
    if found < 0:
        return f"no '{CHECKSUM_KEY}' checksum in it: damaged, cut short, or not written by this pipeline's write_shard"
    at = found + len(_CHECKSUM_PREFIX)
    stored, computed = data[at:at + len(_PLACEHOLDER)], _crc32(data, at)
    if stored != computed:
        return (f"checksum mismatch: its footer says {stored.decode('ascii', 'replace')}, its bytes give "
                f"{computed.decode()}; a bit changed after it was written")
    return None


def _open_checked(path, artefact) -> pq.ParquetFile:
    """The Parquet file of shard `path`, checksum verified, parsed from the very bytes checked."""
    data = Path(path).read_bytes()
    problem = _checksum_problem(data)
    try:
        parquet_file = pq.ParquetFile(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as error:
        raise corrupt_shard_error(path, artefact, problem or f"not readable as Parquet: {error}") from error
    if problem:
        if _CHECKSUM_PREFIX not in data:  # never had one: a file of another stage or version says so first
            check_metadata(parquet_file.schema_arrow, artefact, path)
        raise corrupt_shard_error(path, artefact, problem)
    return parquet_file


def checked_schema(path, artefact) -> pa.Schema:
    """The Arrow schema (metadata included) of shard `path`, checksum verified."""
    with _open_checked(path, artefact) as parquet_file:
        return parquet_file.schema_arrow


def shard_path(directory, index: int) -> Path:
    if isinstance(index, bool) or not hasattr(index, "__index__") or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return Path(directory) / SHARD_TEMPLATE.format(int(index))


def list_shards(directory) -> list[Path]:
    """Finished-looking shard files in `directory`, sorted by index ([] if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory) if (m := _SHARD_NAME.match(name))]
    return [path for _, path in sorted(found)]


def complete_shards(directory, artefact) -> list[Path]:
    """list_shards of a finished artefact: at least one shard, and no gap in the numbering (a stage that
    died, or workers of which some have not finished, leave one)."""
    directory = Path(directory)
    paths = list_shards(directory)
    if not paths:
        raise FileNotFoundError(
            f"{directory} holds no shards ({SHARD_TEMPLATE.format(0)}, ...). "
            f"Fix: run {artefact.PRODUCED_BY} to produce {artefact.NAME}."
        )
    for expected_index, path in enumerate(paths):
        if path.name != SHARD_TEMPLATE.format(expected_index):
            raise SchemaError(
                f"{directory}: shard {SHARD_TEMPLATE.format(expected_index)} is missing (next found: {path.name}), "
                f"so the stage did not finish. Fix: rerun {artefact.PRODUCED_BY} (every --shard worker, if you "
                f"split it); it writes only missing shards.",
                directory,
            )
    return paths


def directory_stats(path) -> dict:
    """`bytes` on disk: of the shards of a shard directory, else of every file under `path` (or the file
    itself); for a shard directory `rows`, from the Parquet footers, and `tokens`, the response tokens
    (the list lengths of its TOKEN_COLUMNS column, read alone), else None."""
    import pyarrow.compute as pc

    path = Path(path)
    paths = list_shards(path)
    files = paths or ([p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path])
    stats = {"rows": None, "tokens": None, "bytes": sum(p.stat().st_size for p in files)}
    if paths:
        stats["rows"] = sum(pq.read_metadata(p).num_rows for p in paths)
        columns = pq.read_schema(paths[0]).names
        column = next((c for c in TOKEN_COLUMNS if c in columns), None)
        if column:
            lengths = (pc.list_value_length(pq.read_table(p, columns=[column])[column]) for p in paths)
            stats["tokens"] = sum(pc.sum(n).as_py() or 0 for n in lengths)
    return stats


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leaves(name: str, type_: pa.DataType) -> list[tuple[str, pa.DataType]]:
    """Parquet leaf column paths of an Arrow field (lists nest as `<name>.list.element`)."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        return _leaves(f"{name}.list.element", type_.value_type)
    return [(name, type_)]


def write_options(schema: pa.Schema) -> dict:
    """pq.write_table keyword arguments for a shard of `schema`: dictionary encoding only for
    top-level scalar columns (keys repeat; token ids and log-probs do not), byte-stream-split for
    every float leaf. Per-column options must name Parquet leaf paths: pyarrow silently ignores
    a top-level name for a nested column."""
    leaves = [leaf for field in schema for leaf in _leaves(field.name, field.type)]
    return {
        "compression": COMPRESSION,
        "compression_level": COMPRESSION_LEVEL,
        "use_dictionary": [path for path, t in leaves if "." not in path and not pa.types.is_floating(t)],
        "column_encoding": {path: FLOAT_ENCODING for path, type_ in leaves if pa.types.is_floating(type_)},
        "data_page_size": DATA_PAGE_SIZE,
        "row_group_size": ROW_GROUP_SIZE,
    }


class ShardWriteError(OSError):
    """A shard could not be written (disk full, read-only directory); nothing was left under its name."""

    def __init__(self, message: str, errno: int | None):
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


def write_shard(directory, index: int, table: pa.Table, artefact, provenance: dict, replace: bool = False,
                **schema_kw) -> Path:
    """Validate `table` as `artefact` and write it as shard `index` of `directory`, atomically.

    Columns are cast to the schema's exact types where that is lossless (see data_schemas.conform);
    the file's metadata records the artefact name, schema version and `provenance` (JSON).
    Raises FileExistsError if the shard exists: finished shards are never rewritten, except a stale
    one with `replace` (fill_shards' --replace-stale), swapped atomically for the new one.
    """
    path = shard_path(directory, index)
    if path.exists() and not replace:
        raise FileExistsError(
            f"{path} already exists: finished shards are never rewritten. "
            f"To recompute it, delete it (or its directory) and rerun the stage."
        )
    if not isinstance(provenance, dict):
        raise TypeError(f"provenance for {path} must be a dict, got {type(provenance).__name__}")
    try:
        provenance_json = json.dumps(provenance, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"provenance for {path} is not JSON-serialisable ({error}). "
            f"Fix: convert its values to str, int, float, bool, None, list or dict."
        ) from error

    table = conform(table, artefact, path, **schema_kw)  # before anything touches the disk
    table = table.replace_schema_metadata({**table.schema.metadata, PROVENANCE_KEY: provenance_json.encode()})

    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, temp)
        if path.exists() and not replace:
            raise FileExistsError(f"{path} appeared while it was being written: another process wrote it; "
                                  "keeping theirs.")
        os.replace(temp, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, FileExistsError):
            raise ShardWriteError(
                f"{path}: could not write the shard ({error.strerror or error}); no file under its final name was "
                f"left. Fix: free space on that disk or make {path.parent} writable, then rerun "
                f"{artefact.PRODUCED_BY}, which keeps the finished shards.",
                error.errno,
            ) from error
        raise
    return path


def shard_is_complete(path) -> bool:
    """True if `path` exists, its checksum matches and its Parquet footer reads; False if missing, truncated or
    corrupt."""
    try:
        data = Path(path).read_bytes()
        if _checksum_problem(data) is None:
            pq.read_metadata(pa.BufferReader(data))
            return True
    except (OSError, pa.ArrowException):
        pass
    return False


def pending_shards(directory, num_shards: int, indices=None) -> list[int]:
    """Indices in range(num_shards) whose shard still has to be written.

    Leftover temp files of interrupted writes are deleted, and so is a final shard that is
    truncated or corrupt (with a warning naming it), so that it is recomputed.
    When several workers share `directory`, pass each worker's own `indices` so it never
    deletes the temp file another worker is writing.
    """
    directory = Path(directory)
    wanted = sorted(set(range(num_shards) if indices is None else indices))
    if wanted and (wanted[0] < 0 or wanted[-1] >= num_shards):
        raise ValueError(f"shard indices must lie in range({num_shards}), got {wanted}")
    if not directory.is_dir():
        return wanted
    wanted_set = set(wanted)
    for name in os.listdir(directory):
        temp = _TEMP_NAME.match(name)
        if temp and int(temp.group(1)) in wanted_set:
            log.warning("%s: deleting a temp file left by an interrupted write", directory / name)
            (directory / name).unlink(missing_ok=True)
        shard = _SHARD_NAME.match(name)
        if shard and int(shard.group(1)) >= num_shards:
            log.warning(
                "%s: shard index is beyond num_shards=%d, probably left by a run with more shards; "
                "read_shards will include it. Delete the directory if the sharding changed.",
                directory / name, num_shards,
            )
    pending = []
    for index in wanted:
        path = shard_path(directory, index)
        if path.exists() and not shard_is_complete(path):
            log.warning("%s: truncated or corrupt (failed its checksum or does not parse); deleting it so it is "
                        "recomputed", path)
            path.unlink(missing_ok=True)
        if not path.exists():
            pending.append(index)
    return pending


def _provenance(schema: pa.Schema, artefact, path) -> dict:
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    if raw is None:
        return {}
    try:
        provenance = json.loads(raw)
    except ValueError as error:
        raise SchemaError(f"{path}: provenance metadata is not valid JSON ({error}). "
                          f"Fix: delete it and rerun {artefact.PRODUCED_BY}.", path) from error
    if not isinstance(provenance, dict):
        raise SchemaError(f"{path}: provenance metadata must be a JSON object, "
                          f"found {type(provenance).__name__}.", path)
    return provenance


def read_shard(path, artefact) -> tuple[pa.Table, dict]:
    """Read one shard, check it is `artefact` at the current schema version, and validate it.

    Returns the table and its provenance dict. The teacher cache's k is read from the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Fix: run {artefact.PRODUCED_BY} to produce {artefact.NAME}.")
    with _open_checked(path, artefact) as parquet_file:
        schema = parquet_file.schema_arrow
        # Name and version first: a wrong file should be called wrong, not "missing columns".
        check_metadata(schema, artefact, path)
        try:
            table = parquet_file.read()
        except (OSError, pa.ArrowException) as error:
            raise corrupt_shard_error(path, artefact, f"not readable as Parquet: {error}") from error
    validate(table, artefact, path)
    return table, _provenance(schema, artefact, path)


def read_shards(directory, artefact) -> tuple[pa.Table, dict]:
    """All shards of `directory`, validated and concatenated in index order, with shard 0's provenance."""
    directory = Path(directory)
    paths = complete_shards(directory, artefact)
    tables, provenance = [], {}
    for path in paths:
        table, shard_provenance = read_shard(path, artefact)
        if not tables:
            provenance = shard_provenance
        elif not table.schema.equals(tables[0].schema, check_metadata=False):
            differing = [f"'{a.name}': {b.type} vs {a.type}" for a, b in zip(table.schema, tables[0].schema) if a != b]
            raise SchemaError(
                f"{path}: column types differ from {paths[0]} ({', '.join(differing)}), "
                f"so the shards come from different runs (e.g. another top-k). "
                f"Fix: delete {directory} and rerun {artefact.PRODUCED_BY}.",
                path,
            )
        tables.append(table)
    return pa.concat_tables(tables), provenance


def fill_shards(directory, num_rows: int, rows_per_shard: int, make_table, artefact, provenance,
                worker: tuple[int, int] = (0, 1), replace_stale: bool = False, can_replace: bool = True,
                **schema_kw) -> int:
    """Write every missing shard of `directory`: shard i holds rows [i*rows_per_shard, ...) made by
    `make_table(i, row_slice)`. `provenance` is a dict, or a function of the shard index.

    `worker = (w, n)`: this process is worker w of n and writes only shards i with i % n == w, so n
    processes (nodes, a Slurm array) fill one directory together; their union is a one-worker run.
    Finished shards are kept (resume after a crash), but only if they were written with the same
    provenance, so a changed config or input never mixes with stale shards: those are refused, or
    with `replace_stale` recomputed, each swapped for its replacement only once that is written, so a
    run that fails keeps it (what `dvc repro` wants: it reruns a stage exactly when its inputs changed,
    and keeps the outputs in place so that a crashed run can resume). A shard that fails its checksum
    is never kept: it is deleted with a warning and recomputed.
    `can_replace`: False for a stage without --replace-stale, so the refusal does not recommend it.
    Returns the number of shards written now.
    """
    directory = Path(directory)
    shard, num_workers = worker
    if not 0 <= shard < num_workers:
        raise ValueError(f"--shard must be in [0, --num-shards={num_workers}), got {shard}")
    num_shards = max(1, -(-num_rows // rows_per_shard))
    provenance_of = provenance if callable(provenance) else lambda index: provenance
    mine, stale = range(shard, num_shards, num_workers), set()
    for path in list_shards(directory):
        index = int(_SHARD_NAME.match(path.name).group(1))
        try:
            schema = checked_schema(path, artefact)
        except SchemaError:
            continue  # corrupt: never kept; pending_shards reports and deletes it
        found = _provenance(schema, artefact, path)
        if index >= num_shards or found != json.loads(json.dumps(provenance_of(index))):
            if not replace_stale:
                flag = ", or rerun with --replace-stale (`dvc repro` passes it)," if can_replace else ""
                raise SchemaError(f"{path} was written with another configuration or input than this run's. "
                                  f"Fix: delete {directory}{flag} then rerun {artefact.PRODUCED_BY}.", path)
            if index >= num_shards:  # no replacement will come
                log.warning("%s is beyond this run's %d shards; deleting it (--replace-stale)", path, num_shards)
                path.unlink()
            elif index in mine:
                stale.add(index)
    pending = sorted(set(pending_shards(directory, num_shards, mine)) | stale)
    for index in pending:
        rows = slice(index * rows_per_shard, min(num_rows, (index + 1) * rows_per_shard))
        table = make_table(index, rows)
        if index in stale:  # swapped only now, so a run that fails keeps the old shard
            log.warning("%s was written with another configuration or input; replacing it (--replace-stale)",
                        shard_path(directory, index))
        write_shard(directory, index, table, artefact, provenance_of(index), replace=index in stale, **schema_kw)
        log.info("%s: wrote shard %d/%d", directory, index + 1, num_shards)
    return len(pending)


def row_arrays(column: pa.ChunkedArray, k: int | None = None) -> list[np.ndarray]:
    """Per-row numpy views of a list<_> column ([R]) or list<fixed_size_list<_, k>> column ([R, k]),
    sharing one flat buffer: no per-token Python objects, and compact in memory (stored dtypes kept)."""
    lists = column.combine_chunks()
    flat = lists.flatten() if k is None else lists.flatten().flatten()
    flat = flat.to_numpy(zero_copy_only=False)
    if k is not None:
        flat = flat.reshape(-1, k)
    bounds = np.concatenate([[0], np.cumsum(pc.list_value_length(lists).to_numpy())])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
