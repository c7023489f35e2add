"""Bytes on disk per teacher top-k entry, and round-trip error, for candidate Parquet layouts of the teacher cache.

    python bench/cache.py [--responses 512] [--ks 8 32 64] [--seed 0] [--quick]

Every number comes from a real Parquet file written with pyarrow to a temp dir: the top-k bytes are
the two top-k columns' compressed sizes from the file's metadata (data, levels and page headers of
every row group), divided by positions * k; "file MB" is the whole file. Each file is read back
with pyarrow and with polars, and decoded: ids must come back exactly, log-probs are compared with
the exact float32 values (max abs error) and with their float16 rounding (float16-exact).

The synthetic cache (seeded, vectorised numpy, one chunk of positions at a time; no [tokens, V] array):

- Vocabulary: V = 151,936 (Qwen2.5's). Token popularity is Zipf, prior log-prob -1.1 * ln(rank).
  Ids follow popularity loosely, as BPE ids follow merge order: ids are assigned in order of
  ln(rank) + N(0, 2^2), so frequent tokens have smallish ids with a wide spread.
- Responses: lengths log-normal (median 350) clipped to 50..1000 tokens. Each response has a
  topic: 1024 tokens drawn with probability ~ rank^-0.6 (flatter than the prior, so mid-frequency
  words appear), which its positions keep reusing, as real text repeats its names and phrasing.
- Position t: logit(v) = beta_t * prior(v) + boost_t(v). beta_t in [0.7, 1.3] (16 steps) sets how
  much of the mass stays on the popularity prior. 128 context tokens, drawn from the topic, get
  boost level_t + sigma_t * min(|Student-t(3)|, 10) (level ~ U(2, 8), sigma ~ U(0.5, 2.5): heavy
  tailed), the first of them an extra margin min(Exp(mean 8), 25), so some positions are
  near-deterministic (top-1 prob > 0.99) and others flat; a token drawn twice keeps its largest
  boost. All other tokens have boost 0. The printed header reports the resulting statistics.
- Exact over all V without materialising it: boosts are >= 0, so the top-k lie among the context
  tokens and the k most popular ones; the normaliser is the prior's sum at beta_t (precomputed per
  beta step) corrected for the boosted tokens. The sampled token is drawn from the full
  distribution (outside the candidates by inverse CDF over the prior, rejecting boosted tokens) and
  its log-prob is exact too.

Candidates: the current layout (baseline); dictionary off, BYTE_STREAM_SPLIT (BSS), zstd levels and
page size; DELTA_BINARY_PACKED ids; ids sorted within a position (plain gaps or Parquet deltas),
which breaks the "sorted by log-prob" contract; log-probs as per-position deltas of their float16 bit
patterns (lossless) or as float16 differences from the top-1 (checked, not exact); and a lossy uint8
reference. The largest k's results pick two recommendations, the smallest lossless layout that
keeps the schema and the smallest lossless one overall, and the first is rerun at several row-group
sizes (size and one full pq.read_table scan).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_schemas import teacher_cache  # noqa: E402

V = 151_936
ZIPF = 1.1  # word frequencies in text follow Zipf's law with an exponent near 1
ID_NOISE = 2.0  # std of the ln(rank) noise when ids are assigned
TOPIC_SIZE = 1024
TOPIC_ZIPF = 0.6
CONTEXT = 128
T_CAP, MARGIN_CAP = 10.0, 25.0  # keep log-probs in a model's range (top-64 above about -50), not Student-t's extremes
BETAS = np.linspace(0.7, 1.3, 16)
CHUNK = 4096  # positions generated at once: [CHUNK, CONTEXT + k] arrays

IDS, LOGPROBS, TOKEN = "teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs"
# pyarrow's per-column options name Parquet leaf paths; a top-level name is silently ignored.
LEAF = {IDS: f"{IDS}.list.element.list.element", LOGPROBS: f"{LOGPROBS}.list.element.list.element",
        TOKEN: f"{TOKEN}.list.element"}
KEYS = list(teacher_cache.KEYS)
LOSSY_STEP = 0.125  # nats per uint8 step in the lossy reference; it clips below -255 * step = -31.9


@dataclass(frozen=True)
class Vocab:
    log_prior: np.ndarray  # [V] float64 by token id: -ZIPF * ln(rank)
    id_of_rank: np.ndarray  # [V] int64, id of the rank-r token (0-based rank)
    topic_cdf: np.ndarray  # [V] CDF over ranks for drawing topic tokens
    prior_mass: np.ndarray  # [len(BETAS)] sum over all tokens of exp(beta * log_prior)
    rank_cdf: np.ndarray  # [len(BETAS), V] CDF over ranks of exp(beta * log_prior)


def make_vocab(seed: int) -> Vocab:
    rng = np.random.default_rng([seed, 0])
    ranks = np.arange(1, V + 1)
    id_of_rank = np.empty(V, dtype=np.int64)
    id_of_rank[np.argsort(np.log(ranks) + rng.normal(0, ID_NOISE, V), kind="stable")] = np.arange(V)
    by_rank = -ZIPF * np.log(ranks)
    log_prior = np.empty(V)
    log_prior[id_of_rank] = by_rank
    topic_cdf = np.cumsum(ranks ** -TOPIC_ZIPF)
    rank_mass = np.exp(BETAS[:, None] * by_rank)
    rank_cdf = np.cumsum(rank_mass, axis=1)
    return Vocab(log_prior, id_of_rank, topic_cdf / topic_cdf[-1], rank_cdf[:, -1].copy(), rank_cdf / rank_cdf[:, -1:])


def draw_positions(vocab: Vocab, rng: np.random.Generator, topics: np.ndarray):
    """Per position (one row of `topics` each): beta step index [n], context ids [n, CONTEXT], boosts [n, CONTEXT]."""
    n = len(topics)
    beta_step = rng.integers(0, len(BETAS), n)
    context = np.take_along_axis(topics, rng.integers(0, topics.shape[1], (n, CONTEXT)), axis=1)
    level, sigma = rng.uniform(2, 8, n), rng.uniform(0.5, 2.5, n)
    boost = level[:, None] + sigma[:, None] * np.minimum(np.abs(rng.standard_t(3, (n, CONTEXT))), T_CAP)
    boost[:, 0] += np.minimum(rng.exponential(8, n), MARGIN_CAP)
    return beta_step, context, boost


def score_positions(vocab: Vocab, rng: np.random.Generator, beta_step, context, boost, k: int):
    """Exact top-k (ids, float64 log-probs, by log-prob descending) and a sampled token with its log-prob."""
    n = len(beta_step)
    beta = BETAS[beta_step][:, None]
    ids = np.concatenate([context, np.broadcast_to(vocab.id_of_rank[:k], (n, k))], axis=1)
    boosts = np.concatenate([boost, np.zeros((n, k))], axis=1)
    # Sort by id with the largest boost first, so each token's first occurrence carries its boost.
    order = np.argsort(-boosts, axis=1, kind="stable")
    ids, boosts = np.take_along_axis(ids, order, 1), np.take_along_axis(boosts, order, 1)
    order = np.argsort(ids, axis=1, kind="stable")
    ids, boosts = np.take_along_axis(ids, order, 1), np.take_along_axis(boosts, order, 1)
    repeat = np.zeros(ids.shape, dtype=bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    prior = beta * vocab.log_prior[ids]
    logits = np.where(repeat, -np.inf, prior + boosts)
    candidate_mass = np.exp(logits)
    rest_mass = vocab.prior_mass[beta_step] - np.where(repeat, 0.0, np.exp(prior)).sum(1)
    log_z = np.log(candidate_mass.sum(1) + rest_mass)

    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    topk_ids = np.take_along_axis(ids, top, 1)
    topk_logprobs = np.take_along_axis(logits, top, 1) - log_z[:, None]

    cumulative = np.cumsum(candidate_mass, axis=1)
    u = rng.random(n) * (cumulative[:, -1] + rest_mass)
    pick = np.minimum((cumulative < u[:, None]).sum(1), ids.shape[1] - 1)
    token = ids[np.arange(n), pick]
    token_logprob = logits[np.arange(n), pick] - log_z
    outside = u >= cumulative[:, -1]
    while outside.any():
        rows = np.flatnonzero(outside)
        cdf = vocab.rank_cdf[beta_step[rows]]
        low = cdf[:, k - 1]  # ranks below k are candidates
        draw = low + rng.random(len(rows)) * (1 - low)
        rank = np.minimum((cdf < draw[:, None]).sum(1), V - 1)
        token[rows] = vocab.id_of_rank[rank]
        token_logprob[rows] = BETAS[beta_step[rows]] * vocab.log_prior[token[rows]] - log_z[rows]
        outside[rows] = (context[rows] == token[rows, None]).any(1)  # boosted: not in the rest; draw again
    return topk_ids, topk_logprobs, token, token_logprob


@dataclass(frozen=True)
class Cache:
    lengths: np.ndarray  # [R] response lengths
    token_logprobs: np.ndarray  # [T] float32, the sampled token's exact log-prob
    topk_ids: np.ndarray  # [T, k] int32, by log-prob descending
    topk_logprobs: np.ndarray  # [T, k] float32, exact (the cache stores float16)

    def top(self, k: int) -> Cache:
        return Cache(self.lengths, self.token_logprobs, self.topk_ids[:, :k], self.topk_logprobs[:, :k])


def synthetic_cache(responses: int, seed: int, k: int) -> Cache:
    vocab = make_vocab(seed)
    rng = np.random.default_rng([seed, 1])
    lengths = np.clip(rng.lognormal(np.log(350), 0.6, responses), 50, 1000).astype(np.int64)
    topics = vocab.id_of_rank[np.searchsorted(vocab.topic_cdf, rng.random((responses, TOPIC_SIZE)))]
    response_of = np.repeat(np.arange(responses), lengths)
    total = len(response_of)
    ids, logprobs = np.empty((total, k), np.int32), np.empty((total, k), np.float32)
    token_logprobs = np.empty(total, np.float32)
    for start in range(0, total, CHUNK):
        rows = slice(start, start + CHUNK)
        positions = draw_positions(vocab, rng, topics[response_of[rows]])
        ids[rows], logprobs[rows], _, token_logprobs[rows] = score_positions(vocab, rng, *positions, k)
    return Cache(lengths, token_logprobs, ids, logprobs)


# Layouts: a transform of the two top-k columns plus Parquet writer options.
# Transforms are pure numpy: encode(ids [T,k] int32, logprobs [T,k] float16) -> stored arrays, and back.

def sort_by_id(ids: np.ndarray, logprobs: np.ndarray):
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def id_gaps(sorted_ids: np.ndarray) -> np.ndarray:
    """First id, then the differences: small non-negative ints once ids are sorted."""
    gaps = sorted_ids.copy()
    gaps[:, 1:] = np.diff(sorted_ids, axis=1)
    return gaps


def ids_from_gaps(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps, axis=1, dtype=np.int32)


def bit_deltas(logprobs: np.ndarray) -> np.ndarray:
    """float16 bit patterns as uint16, each minus its left neighbour (mod 2**16). Lossless for any
    float16; small when sorted descending, since negative floats' patterns then ascend."""
    bits = logprobs.view(np.uint16)
    deltas = bits.copy()
    deltas[:, 1:] = np.diff(bits, axis=1)
    return deltas


def from_bit_deltas(deltas: np.ndarray) -> np.ndarray:
    return np.cumsum(deltas, axis=1, dtype=np.uint16).view(np.float16)


def top1_differences(logprobs: np.ndarray) -> np.ndarray:
    """Top-1, then each log-prob minus the top-1, rounded to float16 (not exact in general)."""
    differences = logprobs.copy()
    differences[:, 1:] = (logprobs[:, 1:].astype(np.float32) - logprobs[:, :1].astype(np.float32)).astype(np.float16)
    return differences


def from_top1_differences(differences: np.ndarray) -> np.ndarray:
    logprobs = differences.copy()
    logprobs[:, 1:] = (differences[:, 1:].astype(np.float32) + differences[:, :1].astype(np.float32)).astype(np.float16)
    return logprobs


def quantise(logprobs: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(-logprobs.astype(np.float32) / LOSSY_STEP), 0, 255).astype(np.uint8)


def dequantise(codes: np.ndarray) -> np.ndarray:
    return -codes.astype(np.float32) * LOSSY_STEP


# name: (stored Arrow type, encode, decode, what a reader must do)
LOGPROB_CODECS = {
    "float16": (pa.float16(), lambda x: x, lambda x: x, ""),
    "bit-delta": (pa.uint16(), bit_deltas, from_bit_deltas,
                  "uint16 column; reader: cumsum mod 2**16 per position, view as float16"),
    "top1-diff": (pa.float16(), top1_differences, from_top1_differences,
                  "reader adds the top-1 to entries 1..k-1"),
    "uint8": (pa.uint8(), quantise, dequantise, f"uint8 column; reader: -code * {LOSSY_STEP}"),
}
ID_ORDERS = {
    "by-logprob": "",
    "sorted": "top-k sorted by id, not log-prob; reader re-sorts by log-prob before slicing [:k']",
    "sorted-gaps": "top-k sorted by id, stored as gaps; reader: cumsum, then re-sort by log-prob",
}


@dataclass(frozen=True)
class Layout:
    name: str
    logprobs: str = "float16"  # LOGPROB_CODECS key
    ids: str = "by-logprob"  # ID_ORDERS key
    level: int | None = None  # zstd level; None is pyarrow's default
    dictionary: bool = True  # dictionary encoding of the log-prob and top-k columns (the keys always keep it)
    encodings: tuple[tuple[str, str], ...] = ()  # (column, Parquet encoding)
    page_mb: int | None = None  # data page size; None is pyarrow's default (1 MiB)
    row_group_size: int = 256

    @property
    def lossy(self) -> bool:
        return self.logprobs in ("top1-diff", "uint8")

    @property
    def reader_change(self) -> str:
        return "; ".join(note for note in (ID_ORDERS[self.ids], LOGPROB_CODECS[self.logprobs][3]) if note)

    def write_kwargs(self) -> dict:
        kwargs = {"compression": "zstd", "row_group_size": self.row_group_size}
        if self.level is not None:
            kwargs["compression_level"] = self.level
        if not self.dictionary:
            kwargs["use_dictionary"] = KEYS
        if self.encodings:
            kwargs["column_encoding"] = {LEAF[column]: encoding for column, encoding in self.encodings}
        if self.page_mb is not None:
            kwargs["data_page_size"] = self.page_mb << 20
        return kwargs


BSS_FLOATS = ((LOGPROBS, "BYTE_STREAM_SPLIT"), (TOKEN, "BYTE_STREAM_SPLIT"))
BSS_ALL = BSS_FLOATS + ((IDS, "BYTE_STREAM_SPLIT"),)
DBP_IDS = BSS_FLOATS + ((IDS, "DELTA_BINARY_PACKED"),)
TUNED = {"level": 9, "dictionary": False, "page_mb": 8}  # "tuned" below
LAYOUTS = [
    Layout("baseline (dict, zstd default = 1)"),
    Layout("no dict, zstd 1", level=1, dictionary=False),
    Layout("no dict, BSS floats, zstd 1", level=1, dictionary=False, encodings=BSS_FLOATS),
    Layout("no dict, BSS floats+ids, zstd 1", level=1, dictionary=False, encodings=BSS_ALL),
    Layout("no dict, BSS floats, zstd 3", level=3, dictionary=False, encodings=BSS_FLOATS),
    Layout("no dict, BSS floats, zstd 9", level=9, dictionary=False, encodings=BSS_FLOATS),
    Layout("tuned: no dict, BSS floats, zstd 9, 8 MiB pages", encodings=BSS_FLOATS, **TUNED),
    Layout("tuned + ids BSS", encodings=BSS_ALL, **TUNED),
    Layout("tuned + ids DELTA_BINARY_PACKED", encodings=DBP_IDS, **TUNED),
    Layout("tuned + lp as uint16 bit-deltas (BSS)", logprobs="bit-delta", encodings=BSS_FLOATS, **TUNED),
    Layout("tuned + ids sorted, DELTA_BINARY_PACKED", ids="sorted", encodings=DBP_IDS, **TUNED),
    Layout("tuned + ids sorted as gaps (BSS)", ids="sorted-gaps", encodings=BSS_ALL, **TUNED),
    Layout("tuned + lp minus top-1 in float16", logprobs="top1-diff", encodings=BSS_FLOATS, **TUNED),
    Layout("LOSSY: tuned + lp uint8, 1/8 nat, clip -31.9", logprobs="uint8",
           encodings=((TOKEN, "BYTE_STREAM_SPLIT"),), **TUNED),
]
ROW_GROUP_SIZES = (16, 64, 256, 1024)


def nested(values: np.ndarray, offsets: pa.Array, type_: pa.DataType) -> pa.ListArray:
    """list<fixed_size_list<type_, k>> from [T, k] values and per-row offsets."""
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=type_), values.shape[1])
    return pa.ListArray.from_arrays(offsets, inner)


def innermost(column) -> np.ndarray:
    """The values of a list<fixed_size_list<...>> column as [T, k] (any chunking)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    k = array.type.value_type.list_size
    return array.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)


def encode(cache: Cache, layout: Layout) -> pa.Table:
    """The cache shard as `layout` stores it: the teacher_cache schema with the top-k columns transformed."""
    k = cache.topk_ids.shape[1]
    ids, logprobs = cache.topk_ids, cache.topk_logprobs.astype(np.float16)
    if layout.ids != "by-logprob":
        ids, logprobs = sort_by_id(ids, logprobs)
    if layout.ids == "sorted-gaps":
        ids = id_gaps(ids)
    logprob_type, encode_logprobs, _, _ = LOGPROB_CODECS[layout.logprobs]
    offsets = pa.array(np.concatenate([[0], np.cumsum(cache.lengths)]).astype(np.int32))
    schema = teacher_cache.schema(k)
    schema = schema.set(schema.get_field_index(LOGPROBS),
                        pa.field(LOGPROBS, pa.list_(pa.list_(logprob_type, k)), nullable=False))
    rows = len(cache.lengths)
    return pa.Table.from_arrays(
        [
            pa.array([f"prompt-{row // 4:06d}" for row in range(rows)]),
            pa.array(np.arange(rows) % 4, pa.int32()),
            pa.array(np.zeros(rows), pa.int32()),
            pa.ListArray.from_arrays(offsets, pa.array(cache.token_logprobs)),
            nested(ids, offsets, pa.int32()),
            nested(encode_logprobs(logprobs), offsets, logprob_type),
        ],
        schema=schema,
    )


def decode(table: pa.Table, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and log-probs ([T, k]) as a reader of `layout` gets them (still in stored order)."""
    ids = innermost(table[IDS])
    if layout.ids == "sorted-gaps":
        ids = ids_from_gaps(ids)
    return ids, LOGPROB_CODECS[layout.logprobs][2](innermost(table[LOGPROBS]))


def round_trip_error(cache: Cache, layout: Layout, ids: np.ndarray, logprobs: np.ndarray) -> dict:
    """Compare decoded top-k with the cache: max abs error vs float32, share equal to the float16 rounding, ids."""
    exact_ids, exact = cache.topk_ids, cache.topk_logprobs
    if layout.ids != "by-logprob":  # compare as sets of (id, log-prob): both sides in id order
        exact_ids, exact = sort_by_id(exact_ids, exact)
    rounded = exact.astype(np.float16).astype(np.float32)
    decoded = logprobs.astype(np.float32)
    return {
        "max_abs_error": float(np.abs(decoded - exact).max()),
        "float16_exact": float((decoded == rounded).mean()),
        "ids_exact": bool(np.array_equal(ids, exact_ids)),
    }


def column_bytes(path: Path, layout: Layout) -> dict[str, int]:
    """Compressed bytes of each top-level column over all row groups, checking the encodings asked for were used."""
    metadata = pq.read_metadata(path)
    sizes = {}
    for group in range(metadata.num_row_groups):
        for j in range(metadata.num_columns):
            column = metadata.row_group(group).column(j)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
            wanted = dict(layout.encodings).get(name)
            if wanted and wanted not in column.encodings:
                raise RuntimeError(f"{layout.name}: {name} was written as {column.encodings}, not {wanted}")
    return sizes


def polars_reads(path: Path, table: pa.Table) -> bool:
    """polars (its own Parquet reader) decodes the top-k columns to the same values as pyarrow."""
    frame = pl.read_parquet(path, columns=[IDS, LOGPROBS])
    return all(np.array_equal(innermost(frame[c].to_arrow()).view(np.uint8), innermost(table[c]).view(np.uint8))
               for c in (IDS, LOGPROBS))


def measure(cache: Cache, layout: Layout, directory: Path, read_repeats: int = 1, check_polars: bool = False) -> dict:
    """Write `layout` to a real Parquet file, read it back with pyarrow (and polars), decode and compare."""
    table = encode(cache, layout)
    path = directory / "shard.parquet"
    start = time.perf_counter()
    pq.write_table(table, path, **layout.write_kwargs())
    write_s = time.perf_counter() - start
    read_s = []
    for _ in range(read_repeats):
        start = time.perf_counter()
        back = pq.read_table(path)
        read_s.append(time.perf_counter() - start)
    if not back.equals(table):
        raise RuntimeError(f"{layout.name}: pyarrow read back other data than it wrote")
    sizes = column_bytes(path, layout)
    entries = cache.topk_ids.size
    return {
        "bytes_per_entry": (sizes[IDS] + sizes[LOGPROBS]) / entries,
        "ids_bytes_per_entry": sizes[IDS] / entries,
        "logprob_bytes_per_entry": sizes[LOGPROBS] / entries,
        "file_bytes": path.stat().st_size,
        "row_groups": pq.read_metadata(path).num_row_groups,
        "write_s": write_s,
        "read_s": min(read_s),
        **({"polars_ok": polars_reads(path, back)} if check_polars else {}),
        **round_trip_error(cache, layout, *decode(back, layout)),
    }


def cache_stats(cache: Cache) -> str:
    top1 = np.exp(cache.topk_logprobs[:, 0].astype(np.float64))
    mass = np.exp(cache.topk_logprobs.astype(np.float64)).sum(1)
    in_topk = (cache.token_logprobs >= cache.topk_logprobs[:, -1]).mean()
    return (
        f"{len(cache.lengths)} responses, {cache.topk_ids.shape[0]:,} positions (lengths {cache.lengths.min()}.."
        f"{cache.lengths.max()}, median {int(np.median(cache.lengths))}); top-1 prob mean {top1.mean():.2f}, "
        f">= 0.99 at {(top1 >= 0.99).mean():.0%}, < 0.5 at {(top1 < 0.5).mean():.0%}; top-{cache.topk_ids.shape[1]} "
        f"mass median {np.median(mass):.4f}, 10th pct {np.quantile(mass, 0.1):.3f}; sampled token in top-k "
        f"{in_topk:.0%}; distinct ids {len(np.unique(cache.topk_ids)):,}, median id {int(np.median(cache.topk_ids))}"
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_layouts(k: int, entries: int, results: dict[Layout, dict], polars: dict[Layout, bool]) -> None:
    print(f"k = {k} ({entries:,} top-k entries; plain int32 + float32 would be 8 B/entry; "
          f"polars checked at the smallest k)")
    rows = []
    for layout, r in results.items():
        exact = "yes" if r["float16_exact"] == 1.0 else f"no ({r['float16_exact']:.1%})"
        ids = ("yes" if layout.ids == "by-logprob" else "yes (as set)") if r["ids_exact"] else "NO"
        rows.append([layout.name, f"{r['bytes_per_entry']:.3f}", f"{r['ids_bytes_per_entry']:.3f}",
                     f"{r['logprob_bytes_per_entry']:.3f}", f"{r['file_bytes'] / 1e6:.2f}", f"{r['write_s']:.2f}",
                     f"{r['read_s']:.2f}", f"{r['max_abs_error']:.2e}", exact, ids, "yes" if polars[layout] else "NO",
                     layout.reader_change or "none"])
    print_table(["candidate", "B/entry", "ids B/e", "lp B/e", "file MB", "write s", "read s", "max abs err",
                 "float16-exact", "ids exact", "polars", "reader change"], rows)
    print()


def print_row_groups(cache: Cache, layout: Layout, directory: Path) -> None:
    print(f"row-group size for '{layout.name}' at k = {cache.topk_ids.shape[1]} "
          f"(read s: best of 3 full pq.read_table scans)")
    rows = []
    for size in ROW_GROUP_SIZES:
        r = measure(cache, replace(layout, row_group_size=size), directory, read_repeats=3)
        groups = r["row_groups"]
        rows.append([str(size), str(groups), f"{len(cache.token_logprobs) // groups:,}", f"{r['bytes_per_entry']:.3f}",
                     f"{r['file_bytes'] / 1e6:.2f}", f"{r['file_bytes'] / groups / 1e6:.2f}", f"{r['read_s']:.3f}"])
    print_table(["rows/group", "row groups", "tokens/group", "B/entry", "file MB", "MB/group", "read s"], rows)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="48 responses: a smoke run in seconds")
    args = parser.parse_args()
    ks = sorted(args.ks)
    start = time.perf_counter()
    full = synthetic_cache(48 if args.quick else args.responses, args.seed, ks[-1])
    print(f"generated in {time.perf_counter() - start:.1f} s: {cache_stats(full)}\n")

    with tempfile.TemporaryDirectory() as directory:
        for k in ks:
            cache = full.top(k)
            results = {layout: measure(cache, layout, Path(directory), check_polars=k == ks[0]) for layout in LAYOUTS}
            if k == ks[0]:
                polars = {layout: r["polars_ok"] for layout, r in results.items()}
            print_layouts(k, cache.topk_ids.size, results, polars)

        def lossless(layout: Layout) -> bool:
            r = results[layout]  # at the largest k
            return not layout.lossy and r["float16_exact"] == 1.0 and r["ids_exact"] and polars[layout]

        def size(layout: Layout) -> float:
            return results[layout]["bytes_per_entry"]

        same_schema = min((layout for layout in LAYOUTS if lossless(layout) and not layout.reader_change), key=size)
        smallest = min((layout for layout in LAYOUTS if lossless(layout)), key=size)
        print_row_groups(full, same_schema, Path(directory))

    for label, layout in (("same schema and reader", same_schema), ("smallest lossless", smallest)):
        goal = f"{'meets' if size(layout) <= 3.0 else 'misses'} the 3.0 goal by {abs(3.0 - size(layout)):.3f}"
        change = f"; reader change: {layout.reader_change}" if layout.reader_change else ""
        print(f"recommendation ({label}): '{layout.name}': {size(layout):.3f} B/entry at k = {ks[-1]}, {goal}; "
              f"pq.write_table(table, path, **{layout.write_kwargs()}){change}")


if __name__ == "__main__":
    main()
