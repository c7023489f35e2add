"""The `opd` console script: one subcommand per stage, each equivalent to `python -m stages.<name>`."""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import progress

STAGES = ("prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "control_data", "control", "opd",
          "evaluate")
"""Pipeline order."""
TOOLS = {"inspect": "pipeline.inspect_cache"}
"""Subcommands that are not stages: module implementing each."""
ROOT = Path(__file__).resolve().parent.parent


def stage_args(stage: str, doc: str, argv, *paths: str, sharded: bool = False,
               resumable: bool = False, optional: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse the command line of stage `stage` (its module docstring `doc` is the help): `--params` plus the
    named paths (declared in dvc.yaml; the `optional` ones may be left out, None, for a stage that reads them
    only under some params), for
    data-parallel stages `--shard i --num-shards n` (as `args.worker = (i, n)`), and for stages that
    resume from their finished shards (`resumable`, implied by `sharded`) `--replace-stale`.
    `args.stage` and `args.started` are what `summary(args)` reports at the end."""
    from pipeline.config import Params, describe_section

    sections = stage_sections(stage)
    epilog = doc + ("\nparams sections it reads (defaults; override with --set section.key=value):\n"
                    + "\n".join(describe_section(name) for name in sections) if sections else "")
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0], epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params key for this run, value read as YAML (repeatable), e.g. "
                             "--set opd.lr=0.001; dvc does not see it: for tracked runs use dvc exp run -S")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    for name in optional:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, default=None)
    if sharded or resumable:
        parser.add_argument("--replace-stale", action="store_true",
                            help="delete shards written with another config or input instead of refusing them "
                                 "(dvc.yaml passes it: dvc reruns a stage when its inputs changed)")
    if sharded:
        parser.add_argument("--shard", type=int, default=0, help="this worker's index (default: 0)")
        parser.add_argument("--num-shards", type=int, default=1,
                            help="number of workers sharing the output (default: 1)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    args = parser.parse_args(argv)
    progress.quiet_library_bars()
    args.stage, args.started = stage, time.perf_counter()
    _report_user_errors(args.stage)
    args.params = Params(args.params, tuple(args.overrides))
    _check_overrides(args.stage, args.overrides)
    if sharded:
        args.worker = (args.shard, args.num_shards)
    return args


def stage_sections(stage: str) -> list[str]:
    """The params sections stage `stage` reads, as dvc.yaml declares them."""
    import yaml

    dvc_yaml = ROOT / "dvc.yaml"
    if not dvc_yaml.exists():
        return []
    declared = yaml.safe_load(dvc_yaml.read_text())["stages"].get(stage, {})
    return [p if isinstance(p, str) else next(iter(p)) for p in declared.get("params", [])]


def sections_read(stage: str) -> set[str]:
    """The params sections stage `stage`'s code loads: the `load_section("<name>", ...)` calls of its file and
    of the stage files it imports (control_data runs sft_data's main, opd the rollouts and scoring code)."""
    from pipeline.provenance import stage_files

    found = set()
    for path in stage_files(stage):
        if path.parent.name != "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_section"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


def _check_overrides(stage: str, overrides: list[str]) -> None:
    """Refuse `--set` of a section the stage does not read: it would change nothing, silently."""
    from pipeline.config import SECTIONS, ConfigError

    read = sections_read(stage)
    for override in overrides:
        section = override.partition("=")[0].split(".")[0].strip()
        if section in SECTIONS and section not in read:
            raise ConfigError(f"--set {override!r}: the {stage} stage does not read the {section} section "
                              f"(it reads {', '.join(sorted(read))}), so this would change nothing. "
                              f"Fix: pass it to the stage that reads {section}, or drop it")


def summary(args: argparse.Namespace, *details: str) -> str:
    """Print (and return) a stage's last line: `details` (e.g. "300 steps"), then for a shard directory
    its rows and response tokens, the wall time since `stage_args` and the size of `args.out` on disk:

        rollouts: 4,000 rows, 101,485 response tokens, 31.2 s, 1.9 MiB -> data/rollouts

    It describes the whole output, so it includes shards kept from an earlier run or other workers."""
    from pipeline import shards

    stats = shards.directory_stats(args.out)
    parts = list(details)
    if stats["rows"] is not None:
        parts.append(f"{stats['rows']:,} rows")
    if stats["tokens"] is not None:
        parts.append(f"{stats['tokens']:,} response tokens")
    parts += [progress.format_seconds(time.perf_counter() - args.started), format_bytes(stats["bytes"])]
    line = f"{args.stage}: {', '.join(parts)} -> {args.out}"
    print(line, flush=True)
    return line


def format_bytes(size: int) -> str:
    """`812 B`, `12.3 KiB`, `1.9 MiB`, `3.4 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


DEBUG_ENV = "OPD_DEBUG"
"""Set to 1 to get the full traceback of a user error instead of its one line."""


def user_error_line(command: str, error: BaseException) -> str | None:
    """`<command>: error: <message>` if `error` is the user's to fix (bad params, inputs or outputs: the
    message names the file or key and the fix), None for anything else (a bug: keep its traceback)."""
    from data_schemas import SchemaError
    from pipeline.config import ConfigError
    from pipeline.shards import ShardWriteError

    user_errors = (ConfigError, SchemaError, ShardWriteError, FileNotFoundError, FileExistsError)
    if os.environ.get(DEBUG_ENV) == "1" or not isinstance(error, user_errors):
        return None
    return f"{command}: error: {error}"


def _report_user_errors(command: str) -> None:
    """In a stage run as `python -m stages.<name>` (what dvc.yaml runs), a user error that ends the
    process prints its one line and exits 2, as `opd <name>` does."""
    def hook(type_, error, traceback):
        line = user_error_line(command, error)
        if line is None:
            return sys.__excepthook__(type_, error, traceback)
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(2)

    sys.excepthook = hook


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command not in STAGES and command not in TOOLS:
        lines = [f"  {name:<17} {_summary(f'stages.{name}')}" for name in STAGES]
        tools = [f"  {name:<17} {_summary(module)}" for name, module in TOOLS.items()]
        print("usage: opd <stage> [--help] [options]\n\nstages, in pipeline order:\n" + "\n".join(lines)
              + "\n\ntools:\n" + "\n".join(tools))
        if command in ("-h", "--help"):
            sys.exit(0)
        problem = "no stage given" if command is None else f"unknown stage {command!r}"
        print(f"opd: error: {problem}. Fix: name one of the stages or tools listed above, e.g. opd prompts --help",
              file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"opd {command}"  # argparse names the program after it in usage lines
    try:
        importlib.import_module(TOOLS.get(command) or f"stages.{command}").main(argv[1:])
    except Exception as error:
        line = user_error_line(command, error)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        sys.exit(2)


def _summary(module: str) -> str:
    doc = importlib.import_module(module).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


if __name__ == "__main__":
    main()
