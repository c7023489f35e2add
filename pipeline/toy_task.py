"""The embedded default task: long addition written out digit by digit, with carries.

A prompt lists the digit pairs of two n-digit numbers, least significant first, e.g. 347 + 589 is
``"79,48,35="``. The answer writes, for each pair, the column total (pair plus incoming carry) as
its carry digit then its units digit, then ``;``: ``"16;13;09;"`` (7+9=16, 4+8+1=13, 3+5+1=09),
so the sum 936 is read back from the units digits in reverse.

Why this shape: each answer token depends on inputs at a fixed relative distance (the pair it
adds and the previous carry), so a tiny transformer learns it in minutes on a CPU. The carry comes
first because it grows with each input (a units digit alone is a sum mod 10, which no single input
predicts, and small models stall on it). A single wrong carry corrupts every later column, so errors
compound over the long answer: the regime where on-policy distillation helps, since the student
learns from the teacher on its own mistakes.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
SYMBOLS = list("0123456789,=;")


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


def solve(prompt: str) -> str:
    """The reference answer for a prompt, written out step by step."""
    pairs = prompt.rstrip("=").split(",")
    carry, steps = 0, []
    for pair in pairs:
        total = int(pair[0]) + int(pair[1]) + carry
        carry = total // 10
        steps.append(f"{carry}{total % 10};")
    return "".join(steps)


def make_examples(count: int, n_digits: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (prompt, answer) pairs drawn with `seed`."""
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
    """Exact-match verifier: the whole worked answer must be right (a wrong carry is wrong)."""
    return response.strip() == answer
