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
    teacher_logprobs.run(section("teacher_logprobs"), engine, d / "models/base", d / "data/rollouts",
                         d / "data/teacher_cache")
    sft_data.run(section("sft_data"), engine, d / "models/base", d / "data/prompts", d / "data/control_sft",
                 split="opd", stage="control_data")
    control.run(section("opd"), d / "models/sft", d / "data/control_sft", d / "models/control")
    opd.run(section("opd"), d / "models/sft", d / "data/rollouts", d / "data/teacher_cache", d / "models/opd")
    evaluate.run(section("evaluate"), engine, d / "models/base", d / "models/sft", d / "models/control",
                 d / "models/opd", d / "data/prompts", d / "metrics/eval.json")
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


@pytest.fixture(scope="session")
def multi_seed_root(tmp_path_factory) -> Path:
    """A --root of bench/multi_teacher.py with seed 0 of the tiny params run through every stage of dvc.yaml in its
    `both` arm (two domains, a specialist teacher each), shared by the multi-teacher tests, which read its outputs."""
    from bench import multi_teacher

    root = tmp_path_factory.mktemp("multi_teacher")
    multi_teacher.run(TINY_PARAMS, [0], root, ["both"])
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


# --- the loss tests' shared builders and references (tests/test_losses_*.py) ---------------------

B, T, V = 2, 3, 5
"""Sequences, positions and vocabulary of the loss tests' small batches."""


@pytest.fixture
def gen():
    """The loss tests' seeded generator (one per test, shared with the fixtures that build from it)."""
    import torch

    return torch.Generator().manual_seed(0)


@pytest.fixture
def mask():
    """A ``[B, T]`` response mask: three of the six positions."""
    import torch

    return torch.tensor([[True, True, False], [True, False, False]])


@pytest.fixture
def make_teacher(gen):
    """``make_teacher(k=2, dtype=float64)``: a random teacher's full ``[B, T, V]`` log-probs, its top-k ids and
    log-probs, drawn from ``gen``."""
    import torch

    def make(k=2, dtype=torch.float64):
        full = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=dtype), -1)
        top_lp, top_ids = full.topk(k, -1)
        return full, top_ids, top_lp

    return make


def ref_divergence(p, q, beta):
    """Generalized JSD over the last dim from probabilities (0 log 0 = 0), written independently of the library."""
    import torch

    def kl(a, b):
        return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def rest_bucket_reverse_kl(student_logits, top_ids, top_logp):
    """KL(q || p) per position on (k cached ids, rest), both sides' rest = 1 - sum of their top-k."""
    import torch

    q = torch.softmax(student_logits.double(), -1).gather(-1, top_ids)
    p = top_logp.double().exp()
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    return ref_divergence(p, q, 1.0)
