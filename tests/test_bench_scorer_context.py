"""bench/scorer_context.py on the tiny pipeline: the plain prompt gives the evaluate stage's greedy accuracy, each
template is measured once."""

from __future__ import annotations

import json

from bench.scorer_context import PLAIN, scorer_context
from tests.conftest import TINY_PARAMS


def test_plain_prompts_give_evaluates_accuracy_and_templates_are_filled_in(tiny_run):
    results = scorer_context(tiny_run, TINY_PARAMS, ["models/sft", "models/base/teacher"],
                             ["{answer}{prompt}", "{prompt}"])
    evaluated = json.loads((tiny_run / "metrics/eval.json").read_text())
    assert results["models/sft"][PLAIN] == evaluated["sft_student"]["accuracy"]
    assert results["models/base/teacher"][PLAIN] == evaluated["teacher"]["accuracy"]
    assert list(results["models/sft"]) == [PLAIN, "{answer}{prompt}"]  # the plain prompt once, first
    assert all(0 <= acc <= 1 for accs in results.values() for acc in accs.values())
