"""Shared fixtures: the whole tiny pipeline, run once per session through each stage's run()."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import load_section

ROOT = Path(__file__).resolve().parent.parent
TINY_PARAMS = ROOT / "tests" / "tiny_params.yaml"


def section(name: str):
    return load_section(name, TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Every stage of the pipeline on tiny models, in order, in one temp directory."""
    from stages import control, evaluate, models, opd, prompts, rollouts, sft, sft_data, teacher_logprobs

    d = tmp_path_factory.mktemp("pipeline")
    engine = section("engine")
    prompts.run(section("task"), d / "data/prompts")
    models.run(section("models"), section("task"), d / "data/prompts", d / "models/base")
    sft_data.run(section("sft_data"), engine, d / "models/base", d / "data/prompts", d / "data/sft")
    sft.run(section("sft"), d / "models/base", d / "data/sft", d / "models/sft")
    rollouts.run(section("rollouts"), engine, d / "models/sft", d / "data/prompts", d / "data/rollouts")
    teacher_logprobs.run(section("teacher_logprobs"), engine, d / "models/base", d / "data/rollouts", d / "data/teacher_cache")
    sft_data.run(section("sft_data"), engine, d / "models/base", d / "data/prompts", d / "data/control_sft", split="opd",
                 stage="control_data")
    control.run(section("opd"), d / "models/sft", d / "data/control_sft", d / "models/control")
    opd.run(section("opd"), d / "models/sft", d / "data/rollouts", d / "data/teacher_cache", d / "models/opd")
    evaluate.run(section("evaluate"), engine, d / "models/base", d / "models/sft", d / "models/control", d / "models/opd",
                 d / "data/prompts", d / "metrics/eval.json")
    return d


@pytest.fixture(scope="session")
def tiny_seed_root(tmp_path_factory) -> Path:
    """A --root of the bench scripts with seed 0 of the tiny params run through every stage of dvc.yaml
    (bench/seeds.py's commands), shared by their end-to-end tests, which reuse its finished stages."""
    import yaml

    from bench.seeds import prepare_seed, run_stages, stage_commands

    root = tmp_path_factory.mktemp("bench")
    out, params = prepare_seed(yaml.safe_load(TINY_PARAMS.read_text()), 0, root)
    run_stages(stage_commands(params, out), out)
    return root


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, for tests that delete or damage files."""
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def crash_at_step(monkeypatch):
    """`crash_at_step(n)`: from now on, training raises RuntimeError("simulated crash") when it reaches
    global step n (after n optimizer steps); `monkeypatch.undo()` lifts it, as for a rerun."""
    from pipeline import training

    step = training.DistillModule.training_step

    def arm(global_step: int) -> None:
        def crash(self, batch, batch_idx):
            if self.global_step == global_step:
                raise RuntimeError("simulated crash")
            return step(self, batch, batch_idx)

        monkeypatch.setattr(training.DistillModule, "training_step", crash)

    return arm
