"""bench/rollout_errors.py: each rollout is sorted by its first wrong step, and the fractions are those of the
seed's real rollouts cache."""

from __future__ import annotations

import json

import polars as pl
import pytest

from bench import rollout_errors
from pipeline import toy_task

PROMPT = toy_task.make_prompt(347, 589, 3)  # 347 + 589 = 936: "16;13;09;" in carry_first


@pytest.mark.parametrize("response, kind", [
    ("16;13;09;", "correct"),
    ("61:31:90:", "correct"),  # the other notation, same steps
    ("16;14;09;", "units"),  # second step: carry 1 right, units 4 wrong
    ("16;13;19;", "carry"),  # the last carry is the answer's first digit
    ("16;03;09;", "correct"),  # a wrong carry before the last one leaves the answer right: the verifier decides
    ("16;04;09;", "both"),
    ("17;03;09;", "units"),  # the first wrong step decides, not the later ones
    ("16;13;", "length"),
    ("16;13;09;00;", "length"),
    ("16;13;0", "malformed"),
    ("", "malformed"),
])
def test_first_error_names_the_first_wrong_step(response, kind):
    assert rollout_errors.first_error(response, toy_task.solve(PROMPT)) == kind


def test_fractions_of_a_seeds_rollouts(tiny_seed_root):
    report = rollout_errors.main(["--seeds", "0", "--root", str(tiny_seed_root)])
    fractions = report["seeds"][0]
    assert set(fractions) == set(rollout_errors.KINDS)
    assert sum(fractions.values()) == pytest.approx(1.0)

    out = tiny_seed_root / "seed0"
    rollouts = pl.read_parquet(str(out / "data/rollouts/part-*.parquet"))
    answers = dict(pl.read_parquet(str(out / "data/prompts/part-*.parquet")).select("prompt_id", "answer").iter_rows())
    tokenizer = toy_task.build_tokenizer()
    correct = sum(toy_task.is_correct(tokenizer.decode(ids, skip_special_tokens=True), answers[pid])
                  for pid, ids in rollouts.select("prompt_id", "response_ids").iter_rows())
    assert fractions["correct"] == correct / len(rollouts)  # the verifier's own count
    assert json.loads((tiny_seed_root / "rollout_errors.json").read_text())["seeds"]["0"] == fractions


def test_rollouts_of_unknown_prompts_are_refused(tiny_seed_root, tmp_path):
    out = tmp_path / "seed0"
    (out / "data/rollouts").mkdir(parents=True), (out / "data/prompts").mkdir(parents=True)
    pl.read_parquet(str(tiny_seed_root / "seed0/data/rollouts/part-*.parquet")).write_parquet(
        out / "data/rollouts/part-00000.parquet")
    prompts = pl.read_parquet(str(tiny_seed_root / "seed0/data/prompts/part-*.parquet"))
    prompts.filter(pl.col("split") != "opd").write_parquet(out / "data/prompts/part-00000.parquet")
    with pytest.raises(ValueError, match="rollouts of prompts that .* does not hold"):
        rollout_errors.seed_errors(out)
