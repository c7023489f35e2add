"""Can a scorer read the context `teacher_logprobs.teacher_prompt` gives it? Greedy accuracy of each model on
the eval prompts, written plainly and through each template.

    python bench/scorer_context.py --run runs/seeds/seed0 [--params params.yaml] \
        [--models models/sft models/base/teacher] [--templates '{prompt}{answer}{prompt}' '{answer}{prompt}']

--run is a finished run's root (a `dvc repro` checkout, or one seed of bench/seeds.py). Each model answers
every `eval` prompt greedily (the evaluate stage's code, `evaluate` and `engine` params) after the template
filled in with the prompt and its reference answer, as teacher_logprobs fills it in for the scorer. A
self-distillation scorer (`teacher_logprobs.model: sft`) gives a useful signal only if, with the answer in
view, it answers at least as well as from the plain prompt.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_section  # noqa: E402
from pipeline.prompts import fill_teacher_prompt, read_chat, read_split  # noqa: E402
from pipeline.verifiers import accuracy  # noqa: E402

PLAIN = "{prompt}"


def scorer_context(run: Path, params: Path, model_dirs: list[str], templates: list[str]) -> dict:
    """{model: {template: greedy accuracy}}, the plain prompt first."""
    cfg = replace(load_section("evaluate", params), n_samples=1, temperature=0.0, pass_k=[], sampled_n=0)
    engine = load_section("engine", params)
    prompts_dir = run / "data" / "prompts"
    rows, chat = read_split(prompts_dir, "eval"), read_chat(prompts_dir)
    results = {}
    for model in model_dirs:
        results[model] = {}
        for template in [PLAIN, *templates]:
            filled = [{**r, "prompt": fill_teacher_prompt(template, r, prompts_dir)} for r in rows]
            results[model][template] = accuracy(run / model, filled, cfg, engine, chat)["accuracy"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=None, help="default: the run's params.yaml")
    parser.add_argument("--models", nargs="+", default=["models/sft", "models/base/teacher"])
    parser.add_argument("--templates", nargs="+", default=["{prompt}{answer}{prompt}", "{answer}{prompt}"])
    args = parser.parse_args()
    params = args.params or next(p for p in (args.run / "params.yaml", ROOT / "params.yaml") if p.exists())
    results = scorer_context(args.run, params, args.models, args.templates)
    templates = list(next(iter(results.values())))
    print("| model | " + " | ".join(f"`{t}`" for t in templates) + " |")
    print("| --- |" + " --- |" * len(templates))
    for model, accs in results.items():
        print(f"| {model} | " + " | ".join(f"{accs[t]:.3f}" for t in templates) + " |")


if __name__ == "__main__":
    main()
