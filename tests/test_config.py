"""params.yaml and every config dataclass stay in step; bad keys and values get clear errors."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import SECTIONS, ConfigError, from_dict, load_params, load_section
from tests.conftest import ROOT, TINY_PARAMS


@pytest.mark.parametrize("params", [ROOT / "params.yaml", TINY_PARAMS, ROOT / "examples/qwen3-math/params.yaml"])
def test_every_section_loads(params):
    raw = load_params(params)
    assert set(raw) == set(SECTIONS)
    for name in SECTIONS:
        assert isinstance(load_section(name, params), SECTIONS[name])


def test_dvc_yaml_declares_each_section_it_passes():
    """Every params section is a DVC param dependency of some stage, so DVC sees each change."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {p for stage in stages.values() for p in stage.get("params", [])}
    assert declared == set(SECTIONS)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("opd: {lr: 0.1, learning_rate: 0.2}\n")
    with pytest.raises(ConfigError, match=r"opd: unknown key\(s\) \['learning_rate'\]"):
        load_section("opd", path)


def test_unknown_nested_key_and_section_are_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("models: {toy_teacher: {layers: 3}}\n")
    with pytest.raises(ConfigError, match=r"models.toy_teacher: unknown key\(s\) \['layers'\]"):
        load_section("models", path)
    path.write_text("opdd: {}\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['opdd'\]"):
        load_section("opd", path)


def test_wrong_types_and_values_are_explained():
    with pytest.raises(ConfigError, match=r"sft.steps: expected int, found '10'"):
        from_dict(SECTIONS["sft"], {"steps": "10"}, "sft")
    with pytest.raises(ConfigError, match="opd.loss must be one of"):
        from_dict(SECTIONS["opd"], {"loss": "kl"}, "opd")
    with pytest.raises(ConfigError, match="num_heads must be > 0"):
        from_dict(SECTIONS["models"], {"toy_student": {"num_heads": 0}}, "models")
    assert from_dict(SECTIONS["opd"], {"lr": 1}, "opd").lr == 1.0  # ints are fine where floats are expected


def test_missing_params_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
