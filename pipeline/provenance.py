"""What a shard's numbers depend on, recorded in its provenance: a rerun keeps a finished shard only if
this matches, and recomputes it (`--replace-stale`) or refuses it otherwise.

A shard's identity is its inputs' hashes (prompts, rollouts, model weights and tokenizer), the params
the stage reads, the engine and its version, the schema version (in the shard's footer) and the code
that computes its values. That code is the stage's own module and every project module it imports,
transitively, except the presentation layer (PRESENTATION: the command line, progress bars and
summaries), which never touches a value. Each file counts by its meaning, not its text: it is hashed
as `ast.unparse` of its syntax tree with docstrings, log calls and the messages of raised errors
removed (an error stops the stage, so its wording changes no value written). So a docstring, comment,
reflow or error-message edit keeps every shard, and a change to how a value is computed makes them
stale. dvc.yaml lists exactly these files as each stage's code deps (tests/test_dvc_deps.py): a
cosmetic edit of one of them reruns the stage under `dvc repro`, which then reuses its shards.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
from pathlib import Path

from pipeline import shards

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "data_schemas")
PRESENTATION = ("pipeline/cli.py", "pipeline/progress.py")
"""Project files outside every stage's identity (and not followed into): they parse the command line and
print progress and summaries."""
_LOGGERS = ("log", "logger", "logging")


def module_file(name: str) -> Path | None:
    """The project file of module `name`, or None if it is not one of ours."""
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def project_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """`path` and every project file it imports, transitively (imports inside functions too), not following
    into the PRESENTATION files."""
    seen = set() if seen is None else seen
    if path in seen or str(path.relative_to(ROOT)) in PRESENTATION:
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


def stage_files(stage: str) -> list[Path]:
    """The files of stage `stage`'s identity, sorted."""
    return sorted(project_imports(ROOT / "stages" / f"{stage}.py"))


class _Meaning(ast.NodeTransformer):
    """Removes what cannot change a value: docstrings (any bare string statement), log calls, and the
    arguments of raised errors."""

    def visit_Expr(self, node):
        value = node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return None
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Name) and value.func.value.id in _LOGGERS):
            return None
        return node

    def visit_Raise(self, node):
        if isinstance(node.exc, ast.Call):
            node.exc = node.exc.func
        node.cause = None
        return node

    def generic_visit(self, node):
        super().generic_visit(node)
        if isinstance(getattr(node, "body", None), list) and not node.body:  # e.g. a class that held only a docstring
            node.body = [ast.Pass()]
        return node


def code_meaning(source: str) -> str:
    """`source` as the identity sees it: unparsed from its syntax tree without docstrings, log calls and
    error messages (so also without comments and layout)."""
    return ast.unparse(_Meaning().visit(ast.parse(source)))


@functools.cache  # the code does not change while a process runs (OPD refresh rounds ask every round)
def code_sha256(stage: str) -> str:
    """sha256 of the code that computes stage `stage`'s values (module docstring: the rule)."""
    return shards.listing_sha256((str(f.relative_to(ROOT)),
                                  hashlib.sha256(code_meaning(f.read_text()).encode()).hexdigest())
                                 for f in stage_files(stage))


def stage_provenance(stage: str, config=None, engine: str | None = None, **fields) -> dict:
    """The provenance a stage's shards record: the stage, the hash of its code, `fields` (its inputs'
    hashes and identities), the engine's name and version (engines.engine_version) and the logprob mode
    when an engine computes the values, and the stage's config section as a dict."""
    from pipeline import engines

    record = {"stage": stage, "code_sha256": code_sha256(stage), **fields}
    if engine is not None:
        record.update(engine=engines.engine_version(engine), logprob_mode=engines.LOGPROB_MODE)
    if config is not None:
        record["config"] = dataclasses.asdict(config)
    return record
