"""Training throughput, model FLOPs utilisation and peak memory of a Qwen3-1.7B-shaped student, variant by variant.

    python bench/train_gpu.py                 # on a GPU: Qwen3-1.7B shape, bf16-mixed, 4,096-token batches
    python bench/train_gpu.py --tiny          # anywhere (CPU): a tiny Qwen3 shape, float32, the same code path
    python bench/train_gpu.py --small --steps 2 --warmup 1 --variants packed "full logits" checkpointing
                                              # CPU: a small shape at V = 151,936, the memory plan's check
    python bench/train_gpu.py --plan          # the README's memory plan: Qwen3-8B, 8 x 80 GB, 4,096 tokens, k = 64

The student is built from a Qwen3 config (random weights, V = 151,936; --tiny: a tiny shape) and trained by the
real loop (pipeline.training.train: Lightning, the OPD module, topk_fkl at k = 64 against a synthetic cache of
rows whose lengths are bench/packing.py's, 200 to 4,096 tokens), each variant in its own process:

- packed: pack_tokens 4,096, the chunked loss (loss_chunk_tokens 1,024);
- full logits: the same with loss_chunk_tokens 0 ([1, T, V] logits);
- padded: length-bucketed batches of --padded-rows rows instead of packing;
- fsdp: packed and chunked under strategy fsdp (FSDP2) on this one device;
- checkpointing: packed and chunked with activation_checkpointing.

After --warmup steps, --steps steps are timed (CUDA synchronised around each). tokens/s counts the real
(unpadded) positions the model trains on, prompts included. MFU = 6 x N x tokens/s / peak, N the student's
parameter count (tied embedding counted once), peak = --peak-flops (989e12: an H200's dense bf16); attention's
FLOPs are left out, so this understates a little. Peak memory: torch.cuda.max_memory_allocated over the timed
steps on a GPU; on a CPU, ru_maxrss above its value when training starts (weights and data already exist).
"plan" is memory_plan's estimate of the same peak: what training adds on top of the weights on a CPU (gradients,
AdamW state, activations, loss chunk), everything on a GPU; at --tiny it checks the plan's formula.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=True)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=False)
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, vocab_size=151_936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, vocab_size=512, tie_word_embeddings=True)
VARIANTS = {
    "packed": {},
    "full logits": {"loss_chunk_tokens": 0},
    "padded": {"pack_tokens": 0},
    "fsdp": {"strategy": "fsdp"},
    "checkpointing": {"activation_checkpointing": True},
}
GIB = 2**30


def parameter_count(shape: dict, per_layer: bool = False) -> int:
    """The model's parameters (tied embedding once), or one decoder layer's."""
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * shape["head_dim"]  # attention, MLP, norms
    return layer if per_layer else layers * layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def memory_plan(shape: dict, tokens: int, k: int, chunk: int, devices: int = 1, fsdp: bool = False,
                checkpointing: bool = False, bf16: bool = True) -> dict[str, float]:
    """Bytes per device of one training step's parts; `chunk` 0 is the full-logits loss over all `tokens`.

    Weights, gradients and AdamW's two moments are float32 (Lightning's bf16-mixed keeps float32 weights), sharded
    over `devices` (FSDP; 1: DDP or one device). FSDP also holds gathered (unsharded) copies in the compute dtype:
    the root's parameters (embeddings, LM head, final norm) for the whole step and two decoder layers (the one
    computing and the one prefetched). Activations per token and decoder layer: the tensors a Qwen3 layer
    keeps for backward, counted from its code, 4h + 5q + 5kv + 4i elements (two RMSNorms' input and normalised
    output; q, k, v; q/k norms; RoPE; attention output; gate, up, act(gate), act(gate) * up), bf16 under autocast
    but float32 in the norms; with checkpointing, each layer's input only, plus one layer's full set while it is
    recomputed. The loss chunk: bf16 logits, their float32 copy, its gradient and one float32 temporary, and the
    LM head's float32 gradient that the chunked loss holds from forward to backward. The teacher signal: k int64 ids,
    k float32 log-probs and 3 float32 per-token fields (pipeline.data.collate's dtypes) per token.
    """
    n = parameter_count(shape)
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    act_bytes = 2 if bf16 else 4
    layer = (4 * h) * 4 + (5 * q + 5 * kv + 4 * i) * act_bytes  # per token
    activations = tokens * (layers * h * act_bytes + layer if checkpointing else layers * layer)
    positions = chunk or tokens
    loss = positions * v * (act_bytes + 4 + 4 + 4) + (v * h * 4 if chunk else 0)
    layer_n = parameter_count(shape, per_layer=True)
    gathered = ((n - layers * layer_n) + 2 * layer_n) * act_bytes if fsdp else 0
    return {"weights": 4 * n / devices, "gradients": 4 * n / devices, "AdamW state": 8 * n / devices,
            "FSDP gathered": gathered, "activations": activations, "loss": loss,
            "teacher signal": tokens * (k * 12 + 12)}


def synthetic_rows(n_rows: int, vocab: int, k: int, scale: int, seed: int = 0) -> list[dict]:
    """Rows of bench/packing.py's length distribution (divided by `scale`), 10% prompt, with a random top-k cache."""
    from bench.packing import lengths

    rng = np.random.default_rng(seed)
    rows = []
    for n in np.maximum(lengths(n_rows, seed) // scale, 4):
        prompt = max(1, n // 10)
        r = n - prompt
        rows.append({"prompt_ids": rng.integers(0, vocab, prompt), "response_ids": rng.integers(0, vocab, r),
                     "teacher_topk_ids": rng.integers(0, vocab, (r, k)).astype(np.int32),
                     "teacher_topk_logprobs": np.sort(-rng.exponential(1.0, (r, k)), 1)[:, ::-1].astype(np.float16)})
    return rows


def run_variant(args, name: str) -> dict:
    """One variant in this process: train, time the steps after warm-up, measure the peak."""
    import lightning as L
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipeline import data, training
    from pipeline.config import OpdConfig

    shape, scale = (TINY, 64) if args.tiny else (SMALL, 4) if args.small else (QWEN3_1_7B, 1)
    cuda = torch.cuda.is_available()
    budget = args.pack_tokens // scale
    options = {"loss_chunk_tokens": max(1, args.chunk // scale), "pack_tokens": budget, **VARIANTS[name]}
    cfg = OpdConfig(steps=args.warmup + args.steps, batch_size=args.padded_rows, loss="topk_fkl", lr=1e-5,
                    precision="bf16-mixed" if cuda else "32-true", grad_clip=1.0, **options)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(Qwen3Config(**shape, attn_implementation=args.attn))
    rows = synthetic_rows(args.rows, shape["vocab_size"], args.k, scale)

    class Meter(L.Callback):
        def __init__(self):
            self.times, self.tokens, self.base = [], [], 0

        def on_train_start(self, trainer, module):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx >= args.warmup:
                self.times.append(time.perf_counter() - self.start)
                positions = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
                self.tokens.append(int(positions))

    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp:
        training.train(model, data.in_memory(rows, cfg.batch_size, 0, cfg.seed), cfg, Path(tmp), loss=cfg.loss,
                       callbacks=[meter])
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - meter.base)
    tokens_per_s = sum(meter.tokens) / sum(meter.times)
    n = parameter_count(shape)
    assert n == sum(p.numel() for p in model.parameters()), (n, sum(p.numel() for p in model.parameters()))
    plan = memory_plan(shape, max(meter.tokens), args.k, cfg.loss_chunk_tokens, 1, cfg.strategy == "fsdp",
                       cfg.activation_checkpointing, bf16=cuda)
    if not cuda:
        plan.pop("weights")  # they exist before training starts, in the CPU baseline
    return {"tokens_per_s": tokens_per_s, "mfu": 6 * n * tokens_per_s / args.peak_flops, "peak": peak,
            "plan": sum(plan.values()), "step_s": float(np.median(meter.times)), "params": n,
            "tokens_per_step": float(np.mean(meter.tokens))}


def print_plan() -> None:
    """The README's memory plan: Qwen3-8B on 8 x 80 GB, 4,096-token packed batches, k = 64."""
    n = parameter_count(QWEN3_8B)
    print(f"Qwen3-8B: {n / 1e9:.2f}B parameters; GiB per GPU for one 4,096-token batch, k = 64, bf16-mixed")
    settings = {"DDP, chunked": (1024, 1, False), "FSDP x 8, full logits": (0, 8, False),
                "FSDP x 8, chunked": (1024, 8, False), "FSDP x 8, chunked, checkpointing": (1024, 8, True)}
    plans = {label: memory_plan(QWEN3_8B, 4096, 64, chunk, devices, devices > 1, ckpt)
             for label, (chunk, devices, ckpt) in settings.items()}
    parts = list(next(iter(plans.values())))
    print("| setting | " + " | ".join(parts) + " | total | fits 80 GB (90%) |")
    for label, plan in plans.items():
        total = sum(plan.values())
        print(f"| {label} | " + " | ".join(f"{plan[p] / GIB:.3f}" for p in parts) + f" | {total / GIB:.1f} | "
              f"{'yes' if total < 80e9 * 0.9 else 'no'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3 shape and lengths / 64: runs on a CPU")
    parser.add_argument("--small", action="store_true",
                        help="a small Qwen3 shape at V = 151,936, lengths / 4: the plan's check on a CPU")
    parser.add_argument("--plan", action="store_true", help="print the Qwen3-8B memory plan and exit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="synthetic cache rows (enough for every step)")
    parser.add_argument("--pack-tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--padded-rows", type=int, default=3, help="rows of a padded batch (about 4k tokens)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, flash_attention_2, flex_attention")
    parser.add_argument("--peak-flops", type=float, default=989e12)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run this one variant, print JSON
    args = parser.parse_args(argv)
    if args.plan:
        return print_plan()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args, args.variant)))
        return
    flags = [f"--{key}" for key in ("tiny", "small") if getattr(args, key)]
    base = flags + [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                    if key not in ("tiny", "small", "plan", "variants", "variant")]
    results = {}
    for name in args.variants:
        done = subprocess.run([sys.executable, __file__, *base, "--variant", name], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed\n{done.stderr[-3000:]}")
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    first = next(iter(results.values()))
    shape = "tiny Qwen3" if args.tiny else "small Qwen3" if args.small else "Qwen3-1.7B"
    print(f"\n{shape} shape, {first['params'] / 1e6:.1f}M parameters, {device}, "
          f"topk_fkl k = {args.k}, {args.steps} timed steps; MFU = 6 x N x tokens/s / {args.peak_flops:.3g}")
    print(f"{'variant':<16}{'tokens/step':>12}{'step s':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}"
          f"{'vs packed':>11}")
    def seconds_per_token(r):
        return r["step_s"] / r["tokens_per_step"]

    for name, r in results.items():
        ratio = seconds_per_token(r) / seconds_per_token(results["packed"]) if "packed" in results else float("nan")
        print(f"{name:<16}{r['tokens_per_step']:>12,.0f}{r['step_s']:>10.3f}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}"
              f"{r['peak'] / GIB:>10.2f}{r['plan'] / GIB:>10.2f}{ratio:>10.2f}x")


if __name__ == "__main__":
    main()
