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
    from stages import evaluate, models, opd, prompts, rollouts, sft, sft_data, teacher_logprobs

    d = tmp_path_factory.mktemp("pipeline")
    engine = section("engine")
    prompts.run(section("task"), d / "data/prompts")
    models.run(section("models"), section("task"), d / "data/prompts", d / "models/base")
    sft_data.run(section("sft_data"), engine, d / "models/base", d / "data/prompts", d / "data/sft")
    sft.run(section("sft"), d / "models/base", d / "data/sft", d / "models/sft")
    rollouts.run(section("rollouts"), engine, d / "models/sft", d / "data/prompts", d / "data/rollouts")
    teacher_logprobs.run(section("teacher_logprobs"), engine, d / "models/base", d / "data/rollouts", d / "data/teacher_cache")
    opd.run(section("opd"), d / "models/sft", d / "data/rollouts", d / "data/teacher_cache", d / "models/opd")
    evaluate.run(section("evaluate"), engine, d / "models/base", d / "models/sft", d / "models/opd", d / "data/prompts", d / "metrics/eval.json")
    return d


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, for tests that delete or damage files."""
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"
