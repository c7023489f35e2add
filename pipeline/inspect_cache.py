"""Summarise a directory of pipeline shards (any artefact; most detail for the teacher cache).

    opd inspect data/teacher_cache

Every shard's checksum is verified first (a damaged shard is named with the fix, as every stage
does); the summary is then built on polars lazy scans, which read only the columns they need.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import PROVENANCE_KEY, SCHEMA_KEY, prompts, rollouts, sft_samples, teacher_cache
from pipeline import shards

LENGTH_BINS = 8
REJECTED_LOGPROB = math.log(0.01)
"""A sampled token whose teacher probability is below this is one the teacher all but rejects."""
ARTEFACTS = {module.NAME: module for module in (prompts, rollouts, sft_samples, teacher_cache)}
UNKNOWN = SimpleNamespace(NAME="?", VERSION="?", PRODUCED_BY="the stage that wrote this directory")


def _artefact(paths: list[Path]):
    """The artefact module the first shard with a readable footer names (for the fix of an error)."""
    for path in paths:
        try:
            name = (pq.read_schema(path).metadata or {}).get(SCHEMA_KEY, b"").decode()
        except (OSError, pa.ArrowException):
            continue
        return ARTEFACTS.get(name, UNKNOWN)
    return UNKNOWN


def summarise(directory) -> dict:
    directory = Path(directory)
    paths = shards.list_shards(directory)
    if not paths:
        raise FileNotFoundError(f"{directory} holds no shards (part-00000.parquet, ...)")
    artefact = _artefact(paths)
    schemas = [shards.checked_schema(path, artefact) for path in paths]  # every checksum, before any summary
    metadata = schemas[0].metadata or {}
    frame = pl.scan_parquet([str(p) for p in paths])
    columns = frame.collect_schema().names()
    size = sum(p.stat().st_size for p in paths)
    out = {
        "path": str(directory),
        "artefact": metadata.get(SCHEMA_KEY, b"?").decode(),
        "shards": len(paths),
        "rows": frame.select(pl.len()).collect().item(),
        "size_bytes": size,
    }
    provenance = json.loads(metadata.get(PROVENANCE_KEY, b"{}"))
    if "teacher" in provenance:
        out["teacher"] = provenance["teacher"].get("id")
        out["teacher_weights_sha256"] = provenance["teacher"].get("weights_sha256")
    if provenance.get("stage") == "teacher_logprobs":  # what scored, and under which prompt (None: the student's)
        out["scorer"] = provenance.get("scorer", "teacher")
        out["teacher_prompt"] = provenance.get("teacher_prompt")
    token_column = next((c for c in shards.TOKEN_COLUMNS if c in columns), None)
    if token_column:
        lengths = frame.select(pl.col(token_column).list.len().alias("n")).collect()["n"]
        out["tokens"] = int(lengths.sum())
        out["bytes_per_token"] = round(size / max(out["tokens"], 1), 3)
        out["response_length_histogram"] = _histogram(lengths)
    # k_s: the behaviour top-k width (rollouts.student_top_k) of rollouts and of the cache that scores them
    behaviour = next((c for c in ("behavior_topk_ids", "teacher_behavior_topk_logprobs") if c in columns), None)
    if behaviour:
        out["student_k"] = frame.collect_schema()[behaviour].inner.size
    if "teacher_topk_logprobs" in columns:
        out["k"] = frame.collect_schema()["teacher_topk_logprobs"].inner.size
        per_token = frame.select(
            pl.col("teacher_token_logprobs").explode().alias("lp"),
            pl.col("teacher_topk_logprobs").explode().arr.to_list().list.eval(pl.element().cast(pl.Float32).exp()).list.sum().alias("mass"),
        ).collect()
        out["mean_teacher_logprob"] = round(float(per_token["lp"].mean()), 4)
        # the sampled tokens the teacher all but rejects: where the opd loss's advantages are large and negative
        out["tokens_teacher_below_1pct"] = round(float((per_token["lp"] < REJECTED_LOGPROB).mean()), 4)
        out["topk_mass_mean"] = round(float(per_token["mass"].mean()), 4)
        out["topk_mass_p05"] = round(float(per_token["mass"].quantile(0.05)), 4)
    if "domain" in columns:  # prompts v2, cache v3: each domain's rows (the cache: and the teacher that scored them)
        keys = ["domain", "teacher"] if "teacher" in columns else ["domain"]
        stats = [pl.len().alias("rows")]
        if "teacher_token_logprobs" in columns:
            stats.append(pl.col("teacher_token_logprobs").explode().cast(pl.Float64).mean().round(4).alias("mean_teacher_logprob"))
        groups = frame.group_by(keys).agg(stats).sort(keys, nulls_last=True).collect()
        out["by_domain"] = {" / ".join(str(row.pop(key)) for key in keys): row for row in groups.to_dicts()}
    return out


def _histogram(lengths: pl.Series) -> dict[str, int]:
    """Counts of lengths in LENGTH_BINS equal-width bins, keyed "lo-hi"."""
    low, high = int(lengths.min()), int(lengths.max())
    width = max(1, -(-(high - low + 1) // LENGTH_BINS))
    bins = ((lengths - low) // width).value_counts().sort(lengths.name)
    return {f"{low + b * width}-{low + (b + 1) * width - 1}": int(c) for b, c in bins.iter_rows()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="opd inspect", description=__doc__.strip().splitlines()[0])
    parser.add_argument("path", type=Path, help="a shard directory, e.g. data/teacher_cache")
    args = parser.parse_args(argv)
    for key, value in summarise(args.path).items():
        print(f"{key:<26} {value}")
