"""evaluate refuses, before any model answers, a prompt that with evaluate.max_new_tokens exceeds a model's
positions: one line naming the prompt and the fix, exit 2 (the fault table's rule), no output changed."""

from __future__ import annotations

import json

from tests.conftest import TINY_PARAMS
from tests.test_faults import refused, snapshot, source_params, write_jsonl


def evaluate_argv(run, prompts_dir, *overrides: str) -> list[str]:
    return ["evaluate", "--params", str(TINY_PARAMS), "--models", str(run / "models/base"),
            "--sft-model", str(run / "models/sft"), "--control-model", str(run / "models/control"),
            "--opd-model", str(run / "models/opd"), "--prompts", str(prompts_dir),
            "--out", str(run / "metrics/eval.json"), "--chart", str(run / "metrics/accuracy.json"),
            *[arg for override in overrides for arg in ("--set", override)]]


def test_a_prompt_longer_than_the_models_is_refused_naming_it(run_copy, tmp_path, capsys):
    from pipeline import cli

    rows = [json.dumps({"prompt": "1" * 600 + f"={i}", "answer": str(i)}).encode() for i in range(4)]
    prompts_dir = tmp_path / "prompts"
    cli.main(["prompts", "--params", source_params(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows),
                                                   answer_column="answer"), "--out", str(prompts_dir)])
    before = snapshot(run_copy)
    refused(capsys, evaluate_argv(run_copy, prompts_dir), str(prompts_dir), "prompt 0 of the split (prompt_id",
            "with evaluate.max_new_tokens 8 that exceeds the 512 positions of", "Fix: set prompts.max_prompt_tokens "
            "to at most 504 (the prompts stage then drops longer prompts) or lower evaluate.max_new_tokens")
    assert snapshot(run_copy) == before


def test_max_new_tokens_beyond_the_models_positions_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    refused(capsys, evaluate_argv(run_copy, run_copy / "data/prompts", "evaluate.max_new_tokens=600"),
            "prompt 0 of the split", "with evaluate.max_new_tokens 600 that exceeds the 512 positions",
            "Fix: lower evaluate.max_new_tokens below 512")  # no negative max_prompt_tokens to suggest
    assert snapshot(run_copy) == before
