"""Padding of length-bucketed batches against packed ones (TrainConfig.pack_tokens), and the toy's speed both ways.

    python bench/packing.py [--rows 4000] [--batch-size 8] [--pack-tokens 4096 16384] [--steps 30] [--scale 8]

1. Computed tokens / real tokens on a realistic length distribution: rows of 200 to 4,096 tokens (prompt +
   response), drawn log-normal around 1,200 tokens and cut at 4,096, so that some responses hit the
   cut as the paper's do, in shards of 1,000 rows as the stages write them. Computed tokens are the
   positions the model runs (pipeline.data.collate: a row of n tokens gives n - 1): batch rows x the
   longest row's positions when padded, the sum of the rows' positions when packed. The batches are
   pipeline.data.ShardBatchSampler's, padded (batch_size rows, length-bucketed) and packed (pack_tokens);
   random batches of batch_size rows (no bucketing) for reference. The fill is real tokens / (bins x
   budget): how much of the token budget a packed batch uses.
2. Training tokens/s of the toy student (pipeline.training.train, the real Lightning loop, top-k forward KL
   k = 8) on rows from the same distribution divided by --scale (so that a CPU runs it), padded batches of
   --batch-size rows against packed ones of each --pack-tokens / --scale tokens (at 4,096 / scale, the
   longest row, a packed batch's attention costs what one padded row's does with sdpa, whose block-
   diagonal mask still computes every pair), in response tokens per second, from the run's own tokens/s
   log at its last step. One torch thread.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARD_ROWS = 1000  # SamplingConfig.rows_per_shard's default
MIN_LEN, MAX_LEN, MEDIAN_LEN, SIGMA = 200, 4096, 1200, 0.7


def lengths(rows: int, seed: int = 0) -> np.ndarray:
    """Row lengths (prompt + response tokens) of the realistic distribution in this docstring's point 1."""
    draw = np.random.default_rng(seed).lognormal(np.log(MEDIAN_LEN), SIGMA, rows)
    return np.clip(draw, MIN_LEN, MAX_LEN).astype(np.int64)


def padding_ratios(lens: np.ndarray, batch_size: int, budgets: list[int]) -> dict[str, tuple[float, float | None]]:
    """{layout: (computed tokens / real tokens, fill of the budget or None)} over one epoch of each layout, the
    computed tokens counted in pipeline.data.collate's output (input_ids' size)."""
    from pipeline.data import ShardBatchSampler, collate

    shards = [min(SHARD_ROWS, len(lens) - a) for a in range(0, len(lens), SHARD_ROWS)]
    rows = [{"prompt_ids": np.ones(n // 10, np.int64), "response_ids": np.ones(n - n // 10, np.int64)} for n in lens]
    shuffled = np.random.default_rng(0).permutation(len(lens))
    layouts = {
        f"random batches of {batch_size}": ([shuffled[a: a + batch_size] for a in range(0, len(lens), batch_size)], 0),
        f"bucketed batches of {batch_size} (pack_tokens 0)": (list(ShardBatchSampler(lens, shards, batch_size, 0)), 0),
    }
    for budget in budgets:
        layouts[f"packed, pack_tokens {budget}"] = (list(ShardBatchSampler(lens, shards, batch_size, 0,
                                                                          pack_tokens=budget)), budget)
    out = {}
    for label, (batches, budget) in layouts.items():
        computed = sum(collate([rows[i] for i in b], 0, packed=bool(budget))["input_ids"].numel() for b in batches)
        real = sum(int((lens[b] - 1).sum()) for b in batches)
        out[label] = (computed / real, sum(int(lens[b].sum()) for b in batches) / (len(batches) * budget) if budget
                      else None)
    return out


def toy_tokens_per_s(lens: np.ndarray, batch_size: int, pack_tokens: int, steps: int) -> float:
    """Response tokens/s of the real training loop on rows of `lens`, as its metrics log says at the end."""
    from pipeline import data, models, toy_task, training
    from pipeline.config import ModelsConfig, OpdConfig

    tokenizer = toy_task.build_tokenizer()
    vocab, k, rng = len(tokenizer), 8, np.random.default_rng(1)
    rows = []
    for n in lens:
        prompt = max(1, n // 10)
        r = n - prompt
        rows.append({"prompt_ids": rng.integers(3, vocab, prompt), "response_ids": rng.integers(3, vocab, r),
                     "teacher_topk_ids": rng.integers(0, vocab, (r, k)),
                     "teacher_topk_logprobs": np.sort(-rng.exponential(1.0, (r, k)), 1)[:, ::-1].astype(np.float16)})
    cfg = OpdConfig(steps=steps, batch_size=batch_size, loss="topk_fkl", pack_tokens=pack_tokens, lr=1e-3)
    model = models.build_toy_model(ModelsConfig().toy_student, tokenizer, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg, Path(tmp),
                       loss=cfg.loss)
        with open(Path(tmp) / "metrics.csv") as f:
            logged = [float(row["train/tokens_per_s"]) for row in csv.DictReader(f) if row.get("train/tokens_per_s")]
    return logged[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pack-tokens", type=int, nargs="+", default=[MAX_LEN, 4 * MAX_LEN],
                        help="token budgets of the packed layouts (each at least the longest row)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each toy run")
    parser.add_argument("--scale", type=int, default=8, help="the toy runs divide lengths and budget by this")
    parser.add_argument("--train-rows", type=int, default=400, help="rows of the toy runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    lens = lengths(args.rows)
    print(f"\n{args.rows} rows of {lens.min()} to {lens.max()} tokens (median {int(np.median(lens))}, "
          f"{(lens == MAX_LEN).mean():.1%} at the {MAX_LEN} cut), shards of {SHARD_ROWS}")
    print(f"{'layout':<44}{'computed / real':>16}{'budget fill':>13}")
    for label, (ratio, fill) in padding_ratios(lens, args.batch_size, args.pack_tokens).items():
        print(f"{label:<44}{ratio:>15.3f}x{'' if fill is None else f'{fill:.1%}':>13}")

    small = np.maximum(lengths(args.train_rows, seed=1) // args.scale, 2)
    padded = toy_tokens_per_s(small, args.batch_size, 0, args.steps)
    packed = {budget // args.scale: toy_tokens_per_s(small, args.batch_size, budget // args.scale, args.steps)
              for budget in args.pack_tokens}
    print(f"\ntoy student training, {args.train_rows} rows of {small.min()} to {small.max()} tokens, {args.steps} "
          f"steps each, 1 thread")
    print(f"{'padded batches of ' + str(args.batch_size):<44}{padded:>12,.0f} response tokens/s  1.00x")
    for budget, rate in packed.items():
        print(f"{'packed, pack_tokens ' + str(budget):<44}{rate:>12,.0f} response tokens/s  {rate / padded:.2f}x")


if __name__ == "__main__":
    main()
