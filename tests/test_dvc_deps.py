"""dvc.yaml lists as code deps exactly the files of each stage's identity (pipeline/provenance.py): the project
files it imports, transitively, outside the presentation layer."""

from __future__ import annotations

import pytest
import yaml

from pipeline.provenance import stage_files
from tests.conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_exactly_the_identity_files(stage):
    imported = stage_files(stage)
    expected = {str(p.relative_to(ROOT)) for p in imported
                if p.name != "__init__.py" or p.parent.name == "data_schemas"}
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == expected, (f"dvc.yaml stage {stage}: missing {sorted(expected - declared)}, "
                                  f"extra {sorted(declared - expected)}")
