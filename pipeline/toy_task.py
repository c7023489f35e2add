"""The embedded default task: long addition written out column by column, in one of two notations, and a
second task family (domain), long subtraction, written the same way.

A prompt lists the digit pairs of two n-digit numbers, least significant first, e.g. 347 + 589 is
``"79,48,35="``. A worked answer writes one 3-character step per column (pair plus incoming carry):

- ``carry_first``: carry digit, units digit, ``;``  -> ``"16;13;09;"``
- ``units_first``: units digit, carry digit, ``:``  -> ``"61:31:90:"``

Both are correct; the separator says which notation a step uses, so an answer may even mix them. The
verifier reads the sum back from the steps (units digits, least significant first, then the last carry)
and checks that final answer only: 936 here.

Domains (DOMAINS, `task.domains`): `add` is the task above; `sub` is a - b with a >= b, its prompt the same
digit pairs ending in ``:`` instead of ``=`` (589 - 347 is ``"97,84,53:"``), its steps borrow digit and
difference digit in the same two notations (``"02;04;02;"``: 242). The last borrow of a >= b is 0, so the
same verifier reads the difference back. The end mark is a symbol the tokenizer already has: a new one
would change the vocabulary, and with it every number of the single-domain default.

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
DOMAINS = {"add": "=", "sub": ":"}
"""Task families, and the mark that ends a prompt of each (the prompt says which task it is)."""


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


def make_prompt(a: int, b: int, n_digits: int, domain: str = "add") -> str:
    pairs = ",".join(f"{x}{y}" for x, y in zip(_digits(a, n_digits), _digits(b, n_digits)))
    return pairs + DOMAINS[domain]


def domain_of(prompt: str) -> str:
    """The domain a toy prompt belongs to, read from its end mark."""
    for domain, mark in DOMAINS.items():
        if prompt.endswith(mark):
            return domain
    raise ValueError(f"{prompt!r} is no toy prompt: it ends in none of {sorted(DOMAINS.values())}")


def solve(prompt: str, style: str = "carry_first") -> str:
    """The worked answer to a prompt (either domain) in notation `style` (one of STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {sorted(STYLES)}")
    sign = 1 if domain_of(prompt) == "add" else -1
    carry, steps = 0, []
    for pair in prompt[:-1].split(","):
        # addition: the carry out of x + y + carry; subtraction: the borrow out of x - y - borrow
        total = int(pair[0]) + sign * (int(pair[1]) + carry)
        digit, carry = total % 10, int(total >= 10 if sign == 1 else total < 0)
        step = f"{carry}{digit}" if style == "carry_first" else f"{digit}{carry}"
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


def make_examples(count: int, n_digits: int, seed: int, domain: str = "add") -> list[tuple[str, str]]:
    """`count` distinct (prompt, carry_first answer) pairs of `domain` drawn with `seed` (each domain its own
    stream; `add`'s is the one the task always drew)."""
    rng = random.Random(seed if domain == "add" else f"{domain}:{seed}")
    seen: set[str] = set()
    examples = []
    while len(examples) < count:
        a, b = rng.randrange(10**n_digits), rng.randrange(10**n_digits)
        if domain == "sub" and a < b:
            a, b = b, a
        prompt = make_prompt(a, b, n_digits, domain)
        if prompt not in seen:
            seen.add(prompt)
            examples.append((prompt, solve(prompt)))
    return examples


def is_correct(response: str, answer: str) -> bool:
    """The response's final answer (the sum or difference its steps state) is the reference's, whatever its
    notation, with one step per column (a correct sum written with a column left out is wrong)."""
    steps, reference = steps_of(response), steps_of(answer)
    return bool(steps) and len(steps) == len(reference) and final_answer(response) == final_answer(answer)
