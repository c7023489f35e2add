"""The `opd` console script: one subcommand per stage, each equivalent to `python -m stages.<name>`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

STAGES = ("prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "opd", "evaluate")
"""Pipeline order."""
TOOLS = {"inspect": "pipeline.inspect_cache"}
"""Subcommands that are not stages: module implementing each."""


def stage_args(doc: str, argv, *paths: str, sharded: bool = False) -> argparse.Namespace:
    """Parse a stage's command line: `--params` plus the named paths (declared in dvc.yaml), and
    for data-parallel stages `--shard i --num-shards n` (as `args.worker = (i, n)`)."""
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    if sharded:
        parser.add_argument("--shard", type=int, default=0, help="this worker's index (default: 0)")
        parser.add_argument("--num-shards", type=int, default=1, help="number of workers sharing the output (default: 1)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    args = parser.parse_args(argv)
    if sharded:
        args.worker = (args.shard, args.num_shards)
    return args


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        lines = [f"  {name:<17} {_summary(f'stages.{name}')}" for name in STAGES]
        tools = [f"  {name:<17} {_summary(module)}" for name, module in TOOLS.items()]
        print("usage: opd <stage> [--help] [options]\n\nstages, in pipeline order:\n" + "\n".join(lines)
              + "\n\ntools:\n" + "\n".join(tools))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.argv[0] = f"opd {argv[0]}"  # argparse names the program after it in usage lines
    importlib.import_module(f"stages.{argv[0]}").main(argv[1:])


def _summary(module: str) -> str:
    doc = importlib.import_module(module).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


if __name__ == "__main__":
    main()
