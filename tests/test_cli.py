"""The stage command lines: `--set` overrides any params key, `--help` lists the params a stage reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_schemas import prompts as prompts_schema
from pipeline import cli, shards
from pipeline.config import ConfigError, Params, load_section
from tests.conftest import ROOT, TINY_PARAMS


def test_set_overrides_keys_of_any_section_with_yaml_values():
    params = Params(TINY_PARAMS, ("opd.lr=0.0005", "opd.importance_cap=null", "opd.loss=opd",
                                  "models.toy_teacher.num_layers=3"))
    opd = load_section("opd", params)
    assert (opd.lr, opd.importance_cap, opd.loss) == (0.0005, None, "opd")
    assert load_section("opd", TINY_PARAMS).lr != 0.0005  # the file is untouched
    assert load_section("models", params).toy_teacher.num_layers == 3


@pytest.mark.parametrize("override, message", [
    ("opd.lrr=0.1", r"unknown key\(s\) \['lrr'\]"),
    ("opd.lr", r"expected section.key=value"),
    ("lr=0.1", r"expected section.key=value"),
    ("opdd.lr=0.1", r"unknown section\(s\) \['opdd'\]"),
    ("opd.lr=fast", r"opd.lr: expected float, found 'fast'"),
])
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_section("opd", Params(TINY_PARAMS, (override,)))


def test_stage_help_lists_the_params_it_reads_with_defaults(capsys):
    from stages import opd

    with pytest.raises(SystemExit):
        cli.stage_args("opd", opd.__doc__, ["--help"], "out")
    text = capsys.readouterr().out
    assert "--set SECTION.KEY=VALUE" in text
    for line in ("  opd:", "refresh_every = 0  # Optimizer steps between online refreshes", "  rollouts:", "  engine:"):
        assert line in text
    assert cli.stage_sections("opd") == ["opd", "rollouts", "teacher_logprobs", "engine"]


def test_a_stage_run_by_hand_takes_the_override(tmp_path):
    out = tmp_path / "prompts"
    subprocess.run([sys.executable, "-m", "stages.prompts", "--params", str(TINY_PARAMS), "--out", str(out),
                    "--set", "task.opd_prompts=5"], cwd=ROOT, check=True, capture_output=True)
    table, provenance = shards.read_shards(out, prompts_schema)
    assert table["split"].to_pylist().count("opd") == 5
    assert provenance["config"]["opd_prompts"] == 5
