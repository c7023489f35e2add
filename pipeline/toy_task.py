"""The embedded default task: long addition written out column by column, in one of two notations.

A prompt lists the digit pairs of two n-digit numbers, least significant first, e.g. 347 + 589 is
``"79,48,35="``. A worked answer writes one 3-character step per column (pair plus incoming carry):

- ``carry_first``: carry digit, units digit, ``;``  -> ``"16;13;09;"``
- ``units_first``: units digit, carry digit, ``:``  -> ``"61:31:90:"``

Both are correct; the separator says which notation a step uses, so an answer may even mix them. The
verifier reads the sum back from the steps (units digits, least significant first, then the last carry)
and checks that final answer only: 936 here.

Why this shape:
- Each answer token depends on inputs at a fixed relative distance, so small transformers learn it in
  minutes on a CPU, and a wrong carry corrupts the rest of the answer: errors compound over the answer,
  which is where training on the student's own samples (on-policy) helps.
- Two valid notations make teacher consistency testable: a teacher trained on one notation (its style,
  `models.teacher_style`) scores the other notation's text as unlikely, so a student that learnt one
  teacher's style and is distilled by the other is pulled between the two.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

TASK = "toy_addition"
"""The prompts stage's provenance names the toy task so; the models stage then trains the toy teacher in its style."""
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
SYMBOLS = list("0123456789,=;:")
STYLES = {"carry_first": ";", "units_first": ":"}
"""Notations of a worked step, and the separator that ends a step of each."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer for the task, built locally (no download)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Prepend <s> like the tokenizers of real models do, so prompts are encoded the same way.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _digits(x: int, n: int) -> list[int]:
    """The n digits of x, least significant first."""
    return [(x // 10**i) % 10 for i in range(n)]


def make_prompt(a: int, b: int, n_digits: int) -> str:
    return ",".join(f"{x}{y}" for x, y in zip(_digits(a, n_digits), _digits(b, n_digits))) + "="


def solve(prompt: str, style: str = "carry_first") -> str:
    """The worked answer to a prompt in notation `style` (one of STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {sorted(STYLES)}")
    pairs = prompt.rstrip("=").split(",")
    carry, steps = 0, []
    for pair in pairs:
        total = int(pair[0]) + int(pair[1]) + carry
        carry = total // 10
        step = f"{carry}{total % 10}" if style == "carry_first" else f"{total % 10}{carry}"
        steps.append(step + STYLES[style])
    return "".join(steps)


def steps_of(response: str) -> list[tuple[str, str]] | None:
    """The (carry, units) digits of each step of a worked answer (either notation, mixed or not); None if it
    is malformed."""
    text, steps = response.strip(), []
    if len(text) % 3:
        return None
    for i in range(0, len(text), 3):
        step = text[i : i + 3]
        if not (step[0].isdigit() and step[1].isdigit()) or step[2] not in STYLES.values():
            return None
        steps.append((step[0], step[1]) if step[2] == STYLES["carry_first"] else (step[1], step[0]))
    return steps


def final_answer(response: str) -> int | None:
    """The sum a worked answer states; None if it is malformed or empty."""
    steps = steps_of(response)
    if not steps or steps[-1][0] not in "01":
        return None
    return int(steps[-1][0] + "".join(unit for _, unit in reversed(steps)))


def make_examples(count: int, n_digits: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (prompt, carry_first answer) pairs drawn with `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples = []
    while len(examples) < count:
        prompt = make_prompt(rng.randrange(10**n_digits), rng.randrange(10**n_digits), n_digits)
        if prompt not in seen:
            seen.add(prompt)
            examples.append((prompt, solve(prompt)))
    return examples


def is_correct(response: str, answer: str) -> bool:
    """The response's final answer (the sum its steps state) is the reference's, whatever its notation, with one
    step per column (a correct sum written with a column left out is wrong)."""
    steps, reference = steps_of(response), steps_of(answer)
    return bool(steps) and len(steps) == len(reference) and final_answer(response) == final_answer(answer)
