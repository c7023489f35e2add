"""`dvc repro` of the real dvc.yaml on tiny params, in a temporary git + DVC repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TINY_PARAMS


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@.-]+)'", output)


@pytest.mark.slow
def test_dvc_repro_runs_caches_and_reruns_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages", "data_schemas"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(TINY_PARAMS, repo / "params.yaml")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    first = sh("dvc", "repro")
    assert ran_stages(first) == ["prompts", "models", "sft_data", "sft", "rollouts", "teacher_logprobs", "control_data",
                                 "control", "opd", "evaluate"]
    metrics = json.loads(sh("dvc", "metrics", "show", "--json"))
    values = next(iter(metrics.values()))["data"]["metrics/eval.json"]["data"]
    assert set(values) >= {"teacher", "sft_student", "control", "opd_student", "n_prompts"}

    assert ran_stages(sh("dvc", "repro")) == []  # nothing changed: nothing runs

    # Training curves: a TSV per logged value of each training stage, shown by `dvc plots show`.
    plots = json.loads(sh("dvc", "plots", "show", "--json"))
    curves = json.dumps(plots)
    for logs in ("models/opd/logs", "models/sft/logs", "models/control/logs", "models/base/logs/teacher"):
        for value in ("loss", "entropy") + (("reverse_kl", "clip_fraction", "tokens_per_s") if "opd" in logs else ()):
            assert f"{logs}/dvclive/plots/metrics/train/{value}.tsv" in curves, (logs, value)
    chart = plots["data"]["Accuracy on the eval prompts"][0]["content"]
    assert chart["mark"]["type"] == "bar" if isinstance(chart["mark"], dict) else chart["mark"] == "bar"
    assert [row["model"] for row in chart["data"]["values"]] == ["teacher", "sft_student", "control", "opd_student"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["opd"]["lr"] = params["opd"].get("lr", 1e-3) * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh("dvc", "repro")) == ["control", "opd", "evaluate"]

    # A stage that died mid-run left some of its shards: `dvc repro` keeps them (persist) and
    # writes only the missing ones.
    cache = repo / "data/teacher_cache"
    kept = {p.name: p.stat().st_mtime_ns for p in sorted(cache.glob("*.parquet"))[:-1]}
    sorted(cache.glob("*.parquet"))[-1].unlink()
    assert ran_stages(sh("dvc", "repro", "teacher_logprobs")) == ["teacher_logprobs"]
    assert {n: (cache / n).stat().st_mtime_ns for n in kept} == kept
    assert len(list(cache.glob("*.parquet"))) == len(kept) + 1

    # A changed input makes the kept shards stale: dvc reruns the stage, which replaces them.
    params["rollouts"]["temperature"] = 0.7
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh("dvc", "repro")) == ["rollouts", "teacher_logprobs", "opd", "evaluate"]  # not the control
    from data_schemas import rollouts as rollouts_schema
    from pipeline import shards

    for path in shards.list_shards(repo / "data/rollouts"):
        assert shards.read_shard(path, rollouts_schema)[1]["config"]["temperature"] == 0.7

    # Experiments: `dvc exp run -S` changes a param for one run, `dvc exp show` compares runs.
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    assert ran_stages(sh("dvc", "exp", "run", "-S", "opd.lr=0.004", "-n", "fast-lr")) == ["control", "opd", "evaluate"]
    experiments = json.loads(sh("dvc", "exp", "show", "--json"))
    runs = [exp for commit in experiments for exp in (commit.get("experiments") or [])]
    fast = next(run["revs"][0]["data"] for run in runs if run.get("name") == "fast-lr")
    assert fast["params"]["params.yaml"]["data"]["opd"]["lr"] == 0.004
    assert "opd_student" in fast["metrics"]["metrics/eval.json"]["data"]
    assert "train" in fast["metrics"]["models/opd/logs/dvclive/metrics.json"]["data"]
