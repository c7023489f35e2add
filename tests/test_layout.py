"""Layering: stages use the libraries in pipeline/ and data_schemas/; neither those libraries nor the
benchmarks import a stage."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["pipeline", "data_schemas", "bench"])
def test_no_library_or_benchmark_imports_a_stage(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        stages = sorted(name for name in imported_modules(path) if name.split(".")[0] == "stages")
        assert not stages, f"{path.relative_to(ROOT)} imports {stages}: move what it needs into pipeline/"
