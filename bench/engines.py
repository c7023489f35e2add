"""Rollout and teacher-scoring throughput of the `hf` and `vllm` engines, side by side in one run.

    python bench/engines.py [--size toy|small|0.5b] [--prompts 256] [--prompt-len 32] [--new-tokens 32] [--k 8]

Builds one randomly initialised Llama-style model of the given size locally (no download), with a
word-level tokenizer of the preset's vocabulary, then runs each engine in its own process (vLLM pins
threads, which would slow whatever ran after it in the same process) on the same random prompts:

- rollouts: `generate` with n = 1 at temperature 1 (tokens/s counts the tokens actually sampled);
- scoring: `score` of the same prompt + response sequences (fixed random tokens) with top-k.

Uses CUDA when present (bfloat16 there, float32 on the CPU). The ratio column is vllm / hf.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    # name: hidden, layers, heads (head_dim 64), intermediate, vocab
    "toy": (128, 2, 2, 512, 512),
    "small": (512, 4, 8, 1536, 32_000),
    "0.5b": (896, 24, 14, 4864, 151_936),  # Qwen2.5-0.5B's shape
    "1b": (2048, 16, 32, 8192, 128_256),  # Llama-3.2-1B's shape
}


def build_model(size: str, out: Path) -> None:
    from transformers import LlamaConfig

    hidden, layers, heads, inter, vocab = SIZES[size]
    save_random_model(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                  head_dim=64, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3,
                                  pad_token_id=1, tie_word_embeddings=True), out)


def save_random_model(config, out: Path) -> None:
    """A randomly initialised causal LM of `config` (seed 0) and a word-level tokenizer of its vocabulary
    (ids 0-3: unk, pad, bos, eos), saved to `out` as any model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(config.vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def padded_score(engine, prompts: list[list[int]], responses: list[list[int]], k: int) -> list:
    """The `hf` engine's scoring before packing and chunking, kept as the reference: batches of
    `engine.cfg.batch_size` right-padded sequences, one `model(...).logits` of [B, L, V] per batch."""
    import numpy as np
    import torch

    from pipeline.engines import Scores

    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), engine.cfg.batch_size):
            rows = [p + r for p, r in zip(prompts[start : start + engine.cfg.batch_size], responses[start:])]
            ids, mask = engine._pad(rows, left=False)
            logits = engine.model(input_ids=ids, attention_mask=mask).logits
            for row in range(len(rows)):
                p_len = len(prompts[start + row])
                r_len = len(rows[row]) - p_len
                logprobs = torch.log_softmax(logits[row, p_len - 1 : p_len - 1 + r_len].float(), -1)
                top_lp, top_ids = logprobs.topk(k, dim=-1)
                token_lp = logprobs.gather(-1, ids[row, p_len : p_len + r_len, None]).squeeze(-1)
                out.append(Scores(token_lp.cpu().numpy(), top_ids.cpu().numpy().astype(np.int32), top_lp.cpu().numpy()))
    return out


def workload(vocab: int, prompts: int, prompt_len: int, new_tokens: int) -> tuple[list, list]:
    import random

    rng = random.Random(0)
    draw = lambda n: [rng.randrange(4, vocab) for _ in range(n)]  # noqa: E731 (no special tokens)
    return [[2] + draw(prompt_len - 1) for _ in range(prompts)], [draw(new_tokens) for _ in range(prompts)]


def measure(engine_name: str, model_dir: str, args) -> dict:
    """One engine, in this process: load, warm up, then time generate and score."""
    import torch

    from pipeline import engines
    from pipeline.config import EngineConfig, SamplingConfig

    cuda = torch.cuda.is_available()
    cfg = EngineConfig(name=engine_name, batch_size=args.batch_size, dtype="bfloat16" if cuda else "float32",
                       gpu_memory_utilization=0.5 if cuda else 0.3, enforce_eager=not cuda)
    prompts, responses = workload(SIZES[args.size][4], args.prompts, args.prompt_len, args.new_tokens)
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=args.new_tokens)
    start = time.perf_counter()
    engine = engines.load_engine(model_dir, cfg, args.k)
    load_s = time.perf_counter() - start
    engine.generate(prompts[:4], sampling, seed=1)  # warm-up (compilation, allocator)
    engine.score(prompts[:4], responses[:4], args.k)
    start = time.perf_counter()
    gens = engine.generate(prompts, sampling, seed=0)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.score(prompts, responses, args.k)
    score_s = time.perf_counter() - start
    sampled = sum(len(g.response_ids) for g in gens)
    scored = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return {"engine": engine.version, "device": "cuda" if cuda else "cpu", "load_s": load_s,
            "rollout_tok_s": sampled / gen_s, "sampled_tokens": sampled,
            "score_tok_s": scored / score_s, "scored_tokens": scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="toy")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="hf batch / vllm max_num_seqs")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--model-dir", help="reuse a model directory built by an earlier run")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.model_dir, args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(Path(tmp) / "model")
        if not args.model_dir:
            build_model(args.size, Path(model_dir))
        results = {}
        for name in args.engines:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--model-dir", model_dir, "--measure", name]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(lines[-1][len("RESULT "):])
    hidden, layers, heads, inter, vocab = SIZES[args.size]
    print(f"\nmodel {args.size}: hidden {hidden}, {layers} layers, {heads} heads, vocab {vocab}; "
          f"{args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, k = {args.k}")
    print(f"{'':<22}" + "".join(f"{n:>16}" for n in results) + ("   vllm/hf" if len(results) == 2 else ""))
    for key, label in [("load_s", "load (s)"), ("rollout_tok_s", "rollout tokens/s"), ("score_tok_s", "scoring tokens/s")]:
        row = [results[n][key] for n in results]
        ratio = f"{row[1] / row[0]:>10.2f}" if len(row) == 2 else ""
        print(f"{label:<22}" + "".join(f"{v:>16.1f}" for v in row) + ratio)
    for name, r in results.items():
        print(f"{name}: {r['engine']} on {r['device']}, {r['sampled_tokens']} tokens sampled, {r['scored_tokens']} scored")


if __name__ == "__main__":
    main()
