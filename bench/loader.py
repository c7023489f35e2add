"""How fast the teacher cache reaches training: the OPD data path against the toy student's step.

    python bench/loader.py [--k 64] [--rollouts 4096] [--response-len 25] [--prompt-len 24] [--batch-size 64]

Writes a synthetic rollouts + teacher-cache pair with the real schemas and shard writer (random ids
and log-probs; the sizes, not the values, set the cost), then times on one core
(torch threads = 1, DataLoader without workers), side by side in one run:

- open_cache: pipeline.cache.open_cache, the check of every shard pair before training starts;
- epochs: iterating the real OPD DataModule (pipeline/data.py: shards streamed, batches collated), the
  first epoch reading each shard, later ones finding them in memory; in response tokens per second;
- step: one training step of the default toy student (forward, top-k forward KL, backward, AdamW)
  on the same batches, for the ratio "loader time per batch / step time";
- checksums: what verifying a cache shard costs against reading it (read_shard, best of 5): the CRC-32
  of the whole file that pipeline/shards.py checks, a sha256 of it instead, and Parquet's page
  checksums (written with write_page_checksum, read with page_checksum_verification).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def write_synthetic(out: Path, args, vocab: int) -> None:
    """Rollout and cache shards of `args.rollouts` rows, 1,000 rows a shard, as the stages write them."""
    from data_schemas import rollouts as rollouts_schema
    from data_schemas import teacher_cache
    from pipeline import shards

    rng = np.random.default_rng(0)
    per_shard = 1000
    for index, start in enumerate(range(0, args.rollouts, per_shard)):
        n = min(per_shard, args.rollouts - start)
        prompt_ids = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(n)]
        response_ids = [rng.integers(0, vocab, args.response_len).tolist() for _ in range(n)]
        keys = {"prompt_id": [f"p{start + i}" for i in range(n)], "sample_idx": [0] * n, "round": [0] * n}
        rollouts = pa.table({**keys, "prompt_ids": prompt_ids, "response_ids": response_ids,
                             "behavior_logprobs": [(-rng.random(args.response_len)).tolist() for _ in range(n)],
                             "finish_reason": ["stop"] * n})
        path = shards.write_shard(out / "rollouts", index, rollouts, rollouts_schema, {"bench": True})
        ids = [rng.integers(0, vocab, (args.response_len, args.k)).astype(np.int32) for _ in range(n)]
        lps = [np.sort(-rng.exponential(2.0, (args.response_len, args.k)), axis=1)[:, ::-1].astype(np.float16)
               for _ in range(n)]
        cache = pa.table({**keys,
                          "teacher_token_logprobs": [(-rng.random(args.response_len)).astype(np.float32)
                                                     for _ in range(n)],
                          "teacher_topk_ids": teacher_cache.topk_column(ids, pa.int32(), args.k),
                          "teacher_topk_logprobs": teacher_cache.topk_column(lps, pa.float16(), args.k)})
        shards.write_shard(out / "cache", index, cache, teacher_cache,
                           {"rollouts_sha256": shards.file_sha256(path), "k": args.k}, k=args.k)


def best_of(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def checksum_costs(cache_dir: Path) -> dict[str, float]:
    """Seconds to read every cache shard, and to verify it each way (see the docstring)."""
    import pyarrow.parquet as pq

    from data_schemas import teacher_cache
    from pipeline import shards

    paths = shards.list_shards(cache_dir)
    with_pages = []
    for path in paths:  # the same shards with Parquet page checksums, in the same layout
        table = pq.read_table(path)
        with_pages.append(path.with_suffix(".pages"))
        options = shards.write_options(table.schema)
        pq.write_table(table, with_pages[-1], write_page_checksum=True, **options)
    unchecked = best_of(lambda: [pq.ParquetFile(p).read() for p in with_pages])
    checked = best_of(lambda: [pq.ParquetFile(p, page_checksum_verification=True).read() for p in with_pages])
    return {
        "read_shard": best_of(lambda: [shards.read_shard(p, teacher_cache) for p in paths]),
        "crc32": best_of(lambda: [shards.shard_is_complete(p) for p in paths])
        - best_of(lambda: [pq.read_metadata(p) for p in paths]),
        "sha256": best_of(lambda: [hashlib.sha256(p.read_bytes()).digest() for p in paths]),
        "page checksums": checked - unchecked,
        "bytes": sum(p.stat().st_size for p in paths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--response-len", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pipeline import data, losses, models, toy_task
    from pipeline.cache import open_cache
    from pipeline.config import ModelsConfig

    tokenizer = toy_task.build_tokenizer()
    student = models.build_toy_model(ModelsConfig().toy_student, tokenizer, seed=0)
    # ids must index the student's vocabulary: a k wider than it only widens the cache
    vocab = max(len(tokenizer), args.k)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), args, vocab)
        start = time.perf_counter()
        rows, lengths, _ = open_cache(Path(tmp) / "rollouts", Path(tmp) / "cache")
        check_s = time.perf_counter() - start
        loader = data.ShardedData(rows, lengths, args.batch_size, tokenizer.pad_token_id, seed=0).train_dataloader()
        start = time.perf_counter()
        batches = list(loader)  # the first epoch reads every shard again, batch by batch
        epoch_s = time.perf_counter() - start
        start = time.perf_counter()
        list(loader)  # later epochs: shards already in memory (max_shards_in_memory covers all 5 here)
        cached_s = time.perf_counter() - start
        costs = checksum_costs(Path(tmp) / "cache")
    tokens = sum(int(b["mask"].sum()) for b in batches)

    if vocab > len(tokenizer):
        student.resize_token_embeddings(vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    step_batches = [batches[i % len(batches)] for i in range(args.steps + 2)]
    for i, batch in enumerate(step_batches):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = losses.compute_loss("topk_fkl", student_logits=logits, targets=batch["targets"], mask=batch["mask"],
                                  teacher_logprobs=batch["teacher_logprobs"],
                                  teacher_topk_ids=batch["teacher_topk_ids"],
                                  teacher_topk_logprobs=batch["teacher_topk_logprobs"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    step_s = (time.perf_counter() - start) / args.steps

    print(f"\n{args.rollouts} rollouts, {tokens} response tokens in {len(batches)} batches, k = {args.k}, "
          f"batch {args.batch_size}, 1 core")
    rows_out = [
        ("open_cache (read + validate every shard)", check_s),
        ("first epoch (read shards + collate)", epoch_s),
        ("later epochs (collate only)", cached_s),
    ]
    for label, seconds in rows_out:
        print(f"{label:<42}{seconds:>8.2f} s {tokens / seconds:>12,.0f} tokens/s  "
              f"{seconds / len(batches) / step_s:>6.1%} of a step per batch")
    print(f"{'toy student training step':<42}{step_s * 1e3:>8.1f} ms per batch")
    print(f"\nverifying the {costs['bytes'] / 2**20:.1f} MiB cache "
          f"({costs['read_shard']:.3f} s to read_shard every shard):")
    for label, key in (("CRC-32 of the whole file (chosen)", "crc32"), ("sha256 of the whole file", "sha256"),
                       ("Parquet page checksums (footer unchecked)", "page checksums")):
        print(f"{label:<42}{costs[key]:>8.3f} s {costs[key] / costs['read_shard']:>7.1%} of the read")

if __name__ == "__main__":
    main()
