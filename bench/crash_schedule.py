"""SIGKILL a whole `dvc repro` on a seeded schedule; the final rerun must equal an uninterrupted run, file for file.

    python bench/crash_schedule.py [--params params.yaml] [--set section.key=value ...] [--seed 0] [--work runs/crash]

Two git + DVC repositories are made under --work from this checkout's pipeline/, stages/, data_schemas/,
dvc.yaml and the params (overrides applied): `reference/` runs `dvc repro` once, uninterrupted, timing
each stage from dvc's "Running stage '<name>'" lines; `killed/` runs `dvc repro` in a process group of
its own and kills the whole group with SIGKILL a seeded random delay, within the stage's reference
duration, after a chosen stage started. Every stage of dvc.yaml is the target once, in order, and one
seeded stage with persistent (sharded) outputs is killed again while its rerun resumes. A kill counts
for the stage whose command was running when it landed; one that arrives after the target finished
counts for whatever ran then, and the target is tried again (a stage dvc.lock already records is
rerun with `dvc repro --force --single-item <stage>`; nothing else differs from what a user would
type). Then a plain `dvc repro` runs to completion.

The result: the sha256 of every file under every output dvc.yaml declares (outs, metrics and plots,
recursively) against the reference's, the temp files left anywhere in the repository, and a table of
the kills with, for the run that followed each, the stages it ran and the shards it found finished vs
wrote. Exits 1 on any difference or leftover. The wall times that training logs and timing files record
(WALL_TIMES) are left out of their comparison; everything else in them is compared.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Params, load_params  # noqa: E402

COPIED = ("pipeline", "stages", "data_schemas")
STAGE_LINE = re.compile(r"Running stage '([\w@.-]+)'")
WALL_TIMES = {
    "models/*/timings.json": "the seconds of each part of the opd run: only which parts are compared",
    "*/logs/*metrics.csv": "Lightning's CSV log: every column but train/tokens_per_s",
    "*/logs/*dvclive/metrics.json": "DVCLive's last logged values: every value but tokens_per_s",
    "*/logs/*dvclive/plots/metrics/train/tokens_per_s.tsv": "DVCLive's throughput curve: only its steps",
}
"""The output files that record wall times (two uninterrupted runs differ in these values only), and what of
each is compared; every other output file is compared byte for byte."""
TEMP_PATTERNS = (".part-*.parquet.tmp-*", "*.tmp", "*.tmp-*", "*.temp", "*.partial", "*.part", "*.lock.*")
"""Names of interrupted writes: the shard writer's temp files (pipeline/shards.py) and common others."""
SHARD_PATTERN = "part-*.parquet"


def make_repo(repo: Path, params: dict) -> None:
    """A fresh git + DVC repository at `repo` holding this checkout's pipeline code, dvc.yaml and `params`."""
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for name in COPIED:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=dvc_env(), check=True, capture_output=True)


def dvc_env() -> dict:
    """The environment of every command: this Python's bin first (dvc and the stages' python), unbuffered."""
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def declared_outputs(repo: Path) -> dict[str, list[str]]:
    """Each stage's outputs as dvc.yaml declares them (outs, metrics, plots), paths relative to `repo`."""
    result = {}
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(entry if isinstance(entry, str) else next(iter(entry)))
        result[name] = paths
    return result


def persistent_outputs(repo: Path) -> dict[str, list[str]]:
    """The `persist: true` outputs of each stage that has some: dvc keeps them when it reruns the stage."""
    result = {}
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        kept = [next(iter(e)) for e in stage.get("outs", [])
                if isinstance(e, dict) and next(iter(e.values())).get("persist")]
        if kept:
            result[name] = kept
    return result


def output_files(repo: Path) -> list[str]:
    """Every file under every declared output, recursively, relative to `repo`, sorted."""
    files = []
    for paths in declared_outputs(repo).values():
        for rel in paths:
            path = repo / rel
            if path.is_file():
                files.append(rel)
            elif path.is_dir():
                files += [str(p.relative_to(repo)) for p in path.rglob("*") if p.is_file()]
    return sorted(files)


def without_wall_times(rel: str, data: bytes) -> bytes:
    """What is compared of output file `rel` with bytes `data`: all of it, but the wall times of WALL_TIMES."""
    pattern = next((p for p in WALL_TIMES if fnmatch(rel, p)), None)
    if pattern is None:
        return data
    if rel.endswith(".json"):
        values = json.loads(data)
        if rel.endswith("timings.json"):
            return json.dumps(sorted(values)).encode()
        return json.dumps(_drop_key(values, "tokens_per_s"), sort_keys=True).encode()
    if rel.endswith(".tsv"):
        return b"\n".join(line.split(b"\t")[0] for line in data.splitlines())
    rows = list(csv.reader(io.StringIO(data.decode())))
    keep = [i for i, name in enumerate(rows[0] if rows else []) if not name.endswith("tokens_per_s")]
    return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows).encode()


def _drop_key(value, key: str):
    if isinstance(value, dict):
        return {k: _drop_key(v, key) for k, v in value.items() if k != key}
    return value


def file_hashes(repo: Path) -> dict[str, str]:
    """sha256 of each output file (of `without_wall_times` of it)."""
    return {rel: hashlib.sha256(without_wall_times(rel, (repo / rel).read_bytes())).hexdigest()
            for rel in output_files(repo)}


def temp_files(repo: Path) -> list[str]:
    """Files anywhere in `repo` but .git whose names look like an interrupted write (TEMP_PATTERNS)."""
    found = []
    for path in repo.rglob("*"):
        rel = path.relative_to(repo)
        if rel.parts[0] != ".git" and path.is_file() and any(fnmatch(path.name, p) for p in TEMP_PATTERNS):
            found.append(str(rel))
    return sorted(found)


def shard_snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    """Finished shards of the persistent outputs: relative path -> (inode, mtime_ns), to tell kept from written."""
    snap = {}
    for paths in persistent_outputs(repo).values():
        for rel in paths:
            for path in (repo / rel).rglob(SHARD_PATTERN):
                stat = path.stat()
                snap[str(path.relative_to(repo))] = (stat.st_ino, stat.st_mtime_ns)
    return snap


def running_stages(pgid: int) -> set[str]:
    """Stages whose command (`python -m stages.<name>`) is alive in process group `pgid`."""
    names = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid and b"-m" in args:
            module = args[args.index(b"-m") + 1].decode()
            if module.startswith("stages."):
                names.add(module.removeprefix("stages."))
    return names


@dataclass
class Run:
    """One `dvc repro`: the stages it started (with seconds from its start), its exit status and output."""

    command: list[str]
    started: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""
    killed_in: str | None = None  # the stage whose command was alive when the kill landed ("dvc": none was)
    kill_after: float | None = None  # seconds after the target stage's start
    lived: float | None = None  # seconds the stage it killed had run (from dvc's line; None: killed in dvc's own work)
    shards_before: dict = field(default_factory=dict)
    shards_after: dict = field(default_factory=dict)

    def ran(self) -> list[str]:
        return list(self.started)

    def durations(self) -> dict[str, float]:
        """Seconds from each stage's start to the next one's (the last: to the end of the run)."""
        names, starts = list(self.started), list(self.started.values())
        return {name: (starts[i + 1] if i + 1 < len(starts) else self.seconds) - starts[i]
                for i, name in enumerate(names)}

    def shards(self, dirs: list[str]) -> tuple[int, int]:
        """(finished shards under `dirs` it found and left as they were, shards it wrote there)."""
        def under(snap):
            return {p: v for p, v in snap.items() if any(p.startswith(d.rstrip("/") + "/") for d in dirs)}
        before, after = under(self.shards_before), under(self.shards_after)
        return sum(after.get(p) == v for p, v in before.items()), sum(before.get(p) != v for p, v in after.items())

    def cleared_locks(self) -> int:
        """Entries of killed dvc processes that dvc found in .dvc/tmp/rwlock and removed itself (with a warning)."""
        return self.output.count("had been killed. Auto removed it from the lock file")


def repro(repo: Path, args: list[str] = (), kill: tuple[str, float] | None = None, log_file: Path | None = None) -> Run:
    """Run `dvc repro <args>` in `repo` in a new process group. With `kill=(stage, delay)`, SIGKILL the whole
    group `delay` seconds after `stage` starts (if it does); record what was running then."""
    run = Run(["dvc", "repro", *args], shards_before=shard_snapshot(repo))
    start = time.perf_counter()
    proc = subprocess.Popen(run.command, cwd=repo, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            match = STAGE_LINE.search(line)
            if match:
                run.started[match.group(1)] = time.perf_counter() - start
                lines.put(match.group(1))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill is not None:
        target, delay = kill
        while (name := lines.get()) is not None and name != target:
            pass
        if name == target:
            deadline = start + run.started[target] + delay
            while proc.poll() is None and time.perf_counter() < deadline:
                time.sleep(min(0.01, max(deadline - time.perf_counter(), 0)))
            if proc.poll() is None:
                alive = running_stages(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                run.kill_after = time.perf_counter() - start - run.started[target]
                run.killed_in = target if target in alive else (sorted(alive)[0] if alive else "dvc")
                if run.killed_in in run.started:
                    run.lived = time.perf_counter() - start - run.started[run.killed_in]
    proc.wait()
    reader.join()
    run.returncode, run.seconds, run.output = proc.returncode, time.perf_counter() - start, "".join(output)
    run.shards_after = shard_snapshot(repo)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"$ {' '.join(run.command)}\n{run.output}")
    return run


def check(run: Run) -> None:
    """A run that was not killed must succeed."""
    if run.killed_in is None and run.returncode != 0:
        raise RuntimeError(f"{' '.join(run.command)} failed ({run.returncode}):\n{run.output}")


@dataclass
class Kill:
    target: str
    run: Run
    forced: bool  # the target had finished, so this run was `dvc repro --force --single-item <target>`
    rerun_of_killed: bool  # the target had been killed in the run before this one (a resumed run killed again)


def schedule(repo: Path, durations: dict[str, float], seed: int, max_tries: int = 6,
             log=print) -> tuple[list[Kill], list[Run]]:
    """Kill `dvc repro` in `repo` until every stage has been killed, and a stage with only persistent outputs
    killed again in the rerun that resumed it; return the kills and every run in order (the last: the plain
    `dvc repro` run to completion)."""
    rng = random.Random(seed)
    stages, persistent = stage_names(repo), persistent_outputs(repo)
    resumable = {s for s in persistent if set(persistent[s]) == set(declared_outputs(repo)[s])}
    kills, runs, hit, done = [], [], set(), set()
    rerun_hit = False

    def attempt(target: str, rerun: bool, misses: int = 0) -> Run:
        nonlocal done, rerun_hit
        args = ["--force", "--single-item", target] if target in done else []
        # Within the stage's uninterrupted duration; for a resumed rerun also within the time the killed run
        # lived (the rerun has less to do, and its start-up is as long). Each kill that came too late halves
        # the window: the reference's durations are one noisy timing, and a busier machine made them longer.
        limit = min(0.5 * durations[target], kills[-1].run.lived) if rerun else 0.8 * durations[target] / 2**misses
        delay = rng.uniform(0, limit)
        log_file = repo.parent / "logs" / f"{len(runs) + 1:02d}-{target}.log"
        run = repro(repo, args, kill=(target, delay), log_file=log_file)
        runs.append(run)
        done = recorded_stages(repo, run, done, forced=bool(args))
        if run.killed_in is None:  # the whole run ended first
            check(run)
            log(f"  {target}: dvc repro ended before the kill, {delay:.2f} s after the stage started")
            return run
        kills.append(Kill(target, run, forced=bool(args), rerun_of_killed=rerun))
        hit.add(run.killed_in)
        rerun_hit |= rerun and run.killed_in == target
        log(f"kill {len(kills)}: aimed at {target}{' (forced)' if args else ''}{' (its rerun)' if rerun else ''}, "
            f"landed in {run.killed_in} {run.kill_after:.2f} s after {target} started")
        return run

    for target in stages:
        tries = 0
        while target not in hit:
            if tries == max_tries:
                raise RuntimeError(f"{max_tries} kills aimed at {target} landed after it finished")
            attempt(target, rerun=False, misses=tries)
            tries += 1
        last = runs[-1] if runs else None
        if not rerun_hit and target in resumable and last.killed_in == target and target not in done:
            attempt(target, rerun=True)  # the rerun resumes from the shards the kill left: kill it too
    if not rerun_hit:
        raise RuntimeError(f"no kill landed in the rerun of a killed stage ({', '.join(sorted(resumable))})")
    final = repro(repo, log_file=repo.parent / "logs" / f"{len(runs) + 1:02d}-final.log")
    check(final)
    runs.append(final)
    return kills, runs


def recorded_stages(repo: Path, run: Run, done: set[str], forced: bool) -> set[str]:
    """The stages dvc.lock records as done and a plain `dvc repro` would skip, after `run`, given those before it:
    the ones it started but the one a kill cut short. A kill between stages (in dvc's own work) may have landed
    before or after dvc recorded the last one, and a forced stage killed with its persistent outputs intact
    stays recorded: `dvc status` tells."""
    started = run.ran()
    if run.killed_in == "dvc" or forced:
        return set(stage_names(repo)) - stale_stages(repo)
    if run.killed_in is not None:
        return (done | set(started[:-1])) - set(started[-1:])
    return done | set(started)


def stale_stages(repo: Path) -> set[str]:
    """Stages `dvc status` says would run (changed or never recorded in dvc.lock)."""
    done = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=dvc_env(), capture_output=True, text=True,
                          check=True)
    return set(json.loads(done.stdout or "{}"))


def compare(reference: Path, repo: Path) -> tuple[dict, list[str]]:
    """Output files whose hash differs ({path: (reference, killed)}, a missing file as None) and temp files left."""
    want, got = file_hashes(reference), file_hashes(repo)
    diff = {p: (want.get(p), got.get(p)) for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)}
    return diff, temp_files(repo)


def table(kills: list[Kill], runs: list[Run], durations: dict[str, float], persistent: dict[str, list[str]]) -> str:
    """Markdown: each kill, and what the run after it (the next kill's run, or the final one) redid of the stage
    it killed: its seconds there (against the uninterrupted run's) and, for persistent outputs, the shards it
    found finished and kept vs wrote."""
    lines = ["| kill | aimed at | landed in | s after the stage started | next run ran | killed stage rerun: s "
             "(uninterrupted) | its shards kept / written | dead dvc locks cleared |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, kill in enumerate(kills):
        after = runs[runs.index(kill.run) + 1]
        stage = kill.run.killed_in
        ran = after.ran()
        names = [f"{n} (killed)" if n == after.killed_in else n for n in ran]
        if stage in ran and stage != after.killed_in:
            redo = f"{after.durations()[stage]:.1f} ({durations[stage]:.1f})"
        else:
            redo = "killed again" if stage == after.killed_in else "-"
        shards = "%d / %d" % after.shards(persistent[stage]) if stage in persistent else "- (not persistent)"
        note = (" (forced)" if kill.forced else "") + (" (its rerun)" if kill.rerun_of_killed else "")
        lines.append(f"| {i + 1} | {kill.target}{note} | {stage} | {kill.run.kill_after:.2f} | "
                     f"{', '.join(names) or '-'} | {redo} | {shards} | {after.cleared_locks()} |")
    return "\n".join(lines)


def crash_schedule(params: dict, work: Path, seed: int, log=print) -> dict:
    """The whole bench: reference run, kill schedule, final comparison. Returns a summary (see main)."""
    reference, killed = work / "reference", work / "killed"
    make_repo(reference, params)
    make_repo(killed, params)
    uninterrupted = repro(reference)
    check(uninterrupted)
    durations = uninterrupted.durations()
    log(f"uninterrupted dvc repro: {uninterrupted.seconds:.1f} s; stages " +
        ", ".join(f"{name} {s:.1f} s" for name, s in durations.items()))
    kills, runs = schedule(killed, durations, seed, log=log)
    diff, temps = compare(reference, killed)
    return {"reference_s": uninterrupted.seconds, "durations": durations, "kills": kills, "runs": runs,
            "diff": diff, "temp_files": temps,
            "metrics_equal": ((reference / "metrics/eval.json").read_bytes()
                              == (killed / "metrics/eval.json").read_bytes()),
            "files": len(file_hashes(reference)), "persistent": persistent_outputs(reference)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the params file (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of delays and of the stage killed twice")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "crash")
    args = parser.parse_args(argv)
    result = crash_schedule(load_params(Params(args.params, tuple(args.overrides))), args.work.resolve(), args.seed)
    runs = result["runs"]
    print("\n" + table(result["kills"], runs, result["durations"], result["persistent"]))
    print(f"\nuninterrupted: {result['reference_s']:.1f} s; {len(result['kills'])} kills over {len(runs) - 1} killed "
          f"runs ({sum(r.seconds for r in runs[:-1]):.1f} s), final rerun {runs[-1].seconds:.1f} s "
          f"({', '.join(runs[-1].ran()) or 'nothing'})")
    print(f"{result['files']} output files compared: {len(result['diff'])} differ; metrics/eval.json "
          f"{'equal' if result['metrics_equal'] else 'DIFFERS'}; temp files left: {result['temp_files'] or 'none'}")
    for path, (want, got) in result["diff"].items():
        print(f"  differs: {path}: reference {want}, killed {got}")
    return 1 if result["diff"] or result["temp_files"] or not result["metrics_equal"] else 0


if __name__ == "__main__":
    sys.exit(main())
