"""A shard's identity (pipeline/provenance.py): cosmetic code edits keep every shard, a change to how a
value is computed makes them stale; stages whose shards all exist load no model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pipeline import engines, provenance, shards
from stages import rollouts, sft_data, teacher_logprobs
from tests.conftest import ROOT, TINY_PARAMS, section

SOURCE = '''
"""Module docstring."""
import logging
log = logging.getLogger(__name__)


class Config:
    """Class docstring."""
    steps: int = 3
    """Attribute docstring."""


def scale(x, k):
    """Function docstring."""
    # a comment
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}") from None
    log.info("scaling %s", x)
    return x * k
'''


def test_code_meaning_ignores_docstrings_comments_layout_logs_and_error_messages():
    cosmetic = (SOURCE.replace("Function docstring.", "Typo fixed.").replace("# a comment", "# another")
                .replace("Attribute docstring.", "Steps of training.").replace('"scaling %s"', '"now %s"')
                .replace("k must be >= 0, got {k}", "Fix: pass k >= 0 (got {k})")
                .replace("return x * k", "return (x *\n        k)"))
    assert provenance.code_meaning(cosmetic) == provenance.code_meaning(SOURCE)
    for changed in (SOURCE.replace("return x * k", "return x * k + 0"), SOURCE.replace("k < 0", "k <= 0"),
                    SOURCE.replace("steps: int = 3", "steps: int = 4"),
                    SOURCE.replace("raise ValueError", "raise TypeError")):
        assert provenance.code_meaning(changed) != provenance.code_meaning(SOURCE)


def test_the_presentation_layer_is_outside_every_identity():
    for stage in ("prompts", "models", "sft_data", "rollouts", "teacher_logprobs", "opd", "evaluate"):
        files = {str(p.relative_to(ROOT)) for p in provenance.stage_files(stage)}
        assert f"stages/{stage}.py" in files and not files & set(provenance.PRESENTATION), stage
    # the scoring stage does not read the prompts stage's bad-row checks
    assert "stages/prompts.py" not in {str(p.relative_to(ROOT)) for p in provenance.stage_files("teacher_logprobs")}


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_cosmetic_edits_keep_the_cache_and_a_value_change_makes_it_stale(run_copy, tmp_path):
    """The teacher cache of the tiny run, rescored by `python -m stages.teacher_logprobs --replace-stale` (as
    `dvc repro` runs it) from a copy of the project whose code is then edited."""
    project = tmp_path / "project"
    for name in ("pipeline", "stages", "data_schemas"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    cache = run_copy / "data/teacher_cache"
    env = {**os.environ, "PYTHONPATH": str(project)}

    def rescore() -> dict[str, int]:
        done = subprocess.run([sys.executable, "-m", "stages.teacher_logprobs", "--params", str(TINY_PARAMS),
                               "--models", str(run_copy / "models/base"), "--rollouts", str(run_copy / "data/rollouts"),
                               "--out", str(cache), "--replace-stale"],
                              cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return {p.name: p.stat().st_mtime_ns for p in shards.list_shards(cache)}

    before = {p.name: p.stat().st_mtime_ns for p in shards.list_shards(cache)}
    assert rescore() == before  # the project's own code wrote them: nothing to do
    # A docstring of a config field, a progress line, the wording of an error and of a log line, a comment.
    _edit(project / "pipeline/config.py", "Optimizer steps", "Number of optimizer steps")
    _edit(project / "pipeline/progress.py", "ETA", "eta")
    _edit(project / "pipeline/engines.py", "Fix: set engine.name to hf or", "To fix it, set engine.name to hf or")
    _edit(project / "stages/teacher_logprobs.py", '"%s: %d of %d shards scored now"', '"%s: scored %d of %d shards"')
    _edit(project / "data_schemas/__init__.py", "def topk_column(", "# top-k columns\ndef topk_column(")
    assert rescore() == before
    # How a value is stored: every shard is stale and rescored.
    _edit(project / "data_schemas/__init__.py", "np.concatenate([a.reshape(-1) for a in arrays])",
          "np.concatenate([a.reshape(-1) + 0 for a in arrays])")
    after = rescore()
    assert after.keys() == before.keys() and all(after[name] != before[name] for name in before)


def test_stages_whose_shards_all_exist_load_no_model(run_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an engine was loaded although every shard exists")

    monkeypatch.setattr(engines, "load_engine", refuse)
    engine = section("engine")
    assert sft_data.run(section("sft_data"), engine, run_copy / "models/base", run_copy / "data/prompts",
                        run_copy / "data/sft") == 0
    assert rollouts.run(section("rollouts"), engine, run_copy / "models/sft", run_copy / "data/prompts",
                        run_copy / "data/rollouts") == 0
    assert teacher_logprobs.run(section("teacher_logprobs"), engine, run_copy / "models/base",
                                run_copy / "data/rollouts", run_copy / "data/teacher_cache") == 0


def test_a_lazy_engine_loads_once_and_closes_at_the_end_of_its_block(run_copy):
    with engines.LazyEngine(run_copy / "models/sft", section("engine")) as lazy:
        assert lazy.engine is None
        first = lazy.get()
        assert lazy.get() is first and first.model is not None
    assert lazy.engine is None and first.model is None
