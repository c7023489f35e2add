"""dvc.yaml lists as code deps exactly the project files each stage imports (transitively)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import project_imports
from tests.conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_exactly_the_imported_files(stage):
    imported = project_imports(ROOT / "stages" / f"{stage}.py")
    expected = {str(p.relative_to(ROOT)) for p in imported if p.name != "__init__.py" or p.parent.name == "data_schemas"}
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == expected, f"dvc.yaml stage {stage}: missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
