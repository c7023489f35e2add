"""dvc.yaml lists as code deps exactly the project files each stage imports (transitively)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages", "data_schemas")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def project_imports(path: Path, seen: set[Path]) -> set[Path]:
    """`path` and every project file it imports, following imports inside functions too."""
    if path in seen:
        return seen
    seen.add(path)
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and (found := module_file(name)):
                project_imports(found, seen)
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_exactly_the_imported_files(stage):
    imported = project_imports(ROOT / "stages" / f"{stage}.py", set())
    expected = {str(p.relative_to(ROOT)) for p in imported if p.name != "__init__.py" or p.parent.name == "data_schemas"}
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == expected, f"dvc.yaml stage {stage}: missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
