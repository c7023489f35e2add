r"""Where the SFT student's rollouts first go wrong on the embedded task: whether on-policy states can help.

    python bench/rollout_errors.py --seeds 0 1 2 3 4 [--root runs/seeds]

Reads each seed's rollouts (data/rollouts: the SFT student's samples at rollouts.temperature) and prompts
under --root, as bench/seeds.py left them (nothing is run), and sorts every rollout by its first step that
differs from the reference answer (either notation: steps are compared as carry and units digits):

- correct: the verifier accepts it (the final answer is right);
- malformed: not a sequence of worked steps (empty included);
- otherwise, by its first step that differs: units (carry right, units digit wrong), carry (the reverse), both;
- length: the steps it has are right, but it has too few or too many.

A units digit is a digit of the stated answer and nothing later rewrites it, so a rollout past a wrong units
digit cannot end correct: OPD's states that the teacher's own answers never visit are then states from which
no correct answer is reachable. Prints the fractions per seed and as mean +- std, and writes
<root>/rollout_errors.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seeds import means, print_table, stds  # noqa: E402
from pipeline import toy_task  # noqa: E402

KINDS = ("correct", "malformed", "units", "carry", "both", "length")


def first_error(response: str, answer: str) -> str:
    """The KINDS entry of one response against its reference answer."""
    steps, reference = toy_task.steps_of(response), toy_task.steps_of(answer)
    if not steps:
        return "malformed"
    if toy_task.is_correct(response, answer):
        return "correct"
    for (carry, units), (ref_carry, ref_units) in zip(steps, reference):
        if (carry, units) != (ref_carry, ref_units):
            return "units" if carry == ref_carry else "carry" if units == ref_units else "both"
    return "length"


def seed_errors(out: Path) -> dict[str, float]:
    """The fraction of one seed's rollouts (out/data/rollouts) of each kind."""
    tokenizer = toy_task.build_tokenizer()
    rollouts = pl.read_parquet(str(out / "data/rollouts/part-*.parquet"), columns=["prompt_id", "response_ids"])
    prompts = pl.read_parquet(str(out / "data/prompts/part-*.parquet"), columns=["prompt_id", "answer"])
    rows = rollouts.join(prompts, on="prompt_id", how="left")
    if rows["answer"].null_count():
        raise ValueError(f"{out / 'data/rollouts'}: {rows['answer'].null_count()} rollouts of prompts that "
                         f"{out / 'data/prompts'} does not hold; rerun bench/seeds.py for this seed")
    kinds = [first_error(tokenizer.decode(ids, skip_special_tokens=True), answer)
             for ids, answer in zip(rows["response_ids"].to_list(), rows["answer"].to_list())]
    return {kind: kinds.count(kind) / len(kinds) for kind in KINDS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "seeds")
    args = parser.parse_args(argv)
    results = {seed: seed_errors(args.root / f"seed{seed}") for seed in args.seeds}
    print_table(results, {kind: kind for kind in KINDS})
    wrong = {seed: sum(r[k] for k in KINDS[2:]) for seed, r in results.items()}
    units = {seed: results[seed]["units"] / wrong[seed] if wrong[seed] else 0.0 for seed in results}
    print("\nunits-digit first errors, of the well-formed wrong rollouts: "
          + ", ".join(f"{units[seed]:.3f}" for seed in results))
    report = {"seeds": results, "mean": means(results, KINDS), "std": stds(results, KINDS),
              "units_of_wrong": units}
    (args.root / "rollout_errors.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
