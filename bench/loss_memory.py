"""Peak memory and time of one loss forward + backward at V = 151,936: chunked (from hidden states) against naive.

    python bench/loss_memory.py [--tokens N|auto] [--chunk 256] [--hidden 896] [--vocab 151936] [--batch 1]
                                [--loss topk_fkl] [--k 64] [--repeats 1] [--precision 32|bf16-mixed|bf16]

The two variants compute the same loss (pipeline.losses.compute_loss) on the same synthetic inputs: final
hidden states [B, T, H] and an LM head [V, H] (both trained: their gradients are computed), random targets
and a random teacher signal (sampled-token log-probs, top-k ids and float16 log-probs, as the cache holds),
every position a response token (the chunked path gains nothing from prompt positions here):

- naive: logits = hidden @ W.T, the full [B, T, V] tensor, then compute_loss(student_logits=logits);
- chunked: compute_loss(hidden=..., lm_head_weight=W, chunk_size=--chunk), the logits of --chunk
  positions at a time, differentiated as they go.

Each variant runs in its own subprocess (--warmup untimed runs, then --repeats timed ones; time: the
median), so that neither sees the other's memory. Peak memory is what the loss adds on top of its inputs,
the gradients of hidden and W included:

- CPU: ru_maxrss (the kernel's peak resident set: it sees every allocation, torch's included, which
  tracemalloc does not) after the runs, minus ru_maxrss once the inputs exist. Large tensors are
  mmapped and returned to the OS when freed, so the peak is what a run held at once.
- CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the runs.

--tokens auto: the longest T (a multiple of 256) at which the naive variant fits in 85% of the memory
available, from two naive probes at small T (its peak is linear in T).
--precision: 32 (float32), bf16-mixed (float32 tensors under torch.autocast(bfloat16), as Lightning's
bf16-mixed trains) or bf16 (bfloat16 tensors).

Defaults by device: on CUDA T = auto, chunk 1024 (TrainConfig.loss_chunk_tokens' default), 3 runs after
1 warm-up, bf16-mixed; on CPU T = 2048, chunk 256, 1 run, float32, so that a run takes about 2 minutes
on 2 cores (about 25 s per 1,024 positions per run at H = 896).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB = 151_936  # Qwen2.5's
HIDDEN = 896  # Qwen2.5-0.5B's
FIT_FRACTION = 0.85  # of the available memory, for --tokens auto: room for the OS and the other processes
PROBE_TOKENS = (256, 512)  # naive runs that measure its peak per token, for --tokens auto
TOKEN_STEP = 256


def make_inputs(args, device: torch.device) -> dict:
    """Hidden states and head (leaves that need gradients) and a teacher signal; seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    b, t, v, k = args.batch, args.tokens, args.vocab, args.k

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    hidden = randn(b, t, args.hidden).requires_grad_()
    weight = (randn(v, args.hidden) / args.hidden**0.5).requires_grad_()
    top_lp = torch.log_softmax(randn(b, t, k, dtype=torch.float32) * 2, -1).sort(-1, descending=True).values
    return dict(
        hidden=hidden,
        weight=weight,
        targets=torch.randint(0, v, (b, t), generator=gen, device=device),
        mask=torch.ones(b, t, dtype=torch.bool, device=device),
        teacher_logprobs=-torch.rand(b, t, generator=gen, device=device) * 5,
        behavior_logprobs=-torch.rand(b, t, generator=gen, device=device) * 5,
        teacher_topk_ids=torch.randint(0, v, (b, t, k), generator=gen, device=device),
        teacher_topk_logprobs=top_lp.half(),
    )


def run_once(variant: str, inputs: dict, args) -> float:
    """One forward + backward of the loss; returns the loss."""
    from pipeline.losses import compute_loss

    hidden, weight = inputs["hidden"], inputs["weight"]
    hidden.grad = weight.grad = None
    signals = {key: value for key, value in inputs.items() if key not in ("hidden", "weight")}
    options = dict(topk_tail=args.tail, token_fraction=args.token_fraction)
    autocast = torch.autocast(hidden.device.type, torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    with autocast:
        if variant == "naive":
            out = compute_loss(args.loss, student_logits=F.linear(hidden, weight), **signals, **options)
        else:
            out = compute_loss(args.loss, hidden=hidden, lm_head_weight=weight, chunk_size=args.chunk, **signals,
                               **options)
    out["loss"].backward()
    return out["loss"].item()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def child(args) -> dict:
    """One variant in this process: its peak memory above the inputs, its times, its loss and gradient norms."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    inputs = make_inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_bytes(device)
    available = _available_bytes(device)
    times, loss = [], None
    for _ in range(args.warmup + args.repeats):
        start = time.perf_counter()
        loss = run_once(args.variant, inputs, args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return dict(peak=_peak_bytes(device) - base, times=times[args.warmup:], loss=loss, available=available,
                grad_hidden=inputs["hidden"].grad.double().norm().item(),
                grad_weight=inputs["weight"].grad.double().norm().item())


def spawn(args, variant: str, **overrides) -> dict:
    """child() in a fresh interpreter."""
    argv = {**vars(args), "variant": variant, **overrides}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in argv.items() if key != "child"]
    proc = subprocess.run([sys.executable, __file__, "--child", *flags], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{variant} at T = {argv['tokens']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_tokens(args) -> int:
    """The longest T (a multiple of TOKEN_STEP) at which the naive variant fits in FIT_FRACTION of the memory.

    Its peak is linear in T: two probes give the slope and the constant part. The probes measure the
    memory available with their own inputs (the head included) allocated; the inputs grow by a hidden
    row and the teacher fields per position.
    """
    probes = [spawn(args, "naive", tokens=t, warmup=0, repeats=1) for t in PROBE_TOKENS]
    (t0, t1), (p0, p1) = PROBE_TOKENS, (probes[0]["peak"], probes[1]["peak"])
    slope = (p1 - p0) / (t1 - t0)
    inputs_per_token = (args.hidden * 4 + args.k * 10 + 17) * args.batch
    tokens = (FIT_FRACTION * probes[0]["available"] - (p0 - slope * t0)) / (slope + inputs_per_token)
    return max(TOKEN_STEP, int(tokens) // TOKEN_STEP * TOKEN_STEP)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in (--tokens stays "auto" or becomes an int)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=None, help="positions per sequence, or auto: the longest the naive fits "
                                                       "(default: auto on CUDA, 2048 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--chunk", type=int, default=None,
                        help="positions whose logits exist at once, chunked (default: 1024 on CUDA, 256 on CPU)")
    parser.add_argument("--loss", default="topk_fkl")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tail", default="rest_bucket", help="top-k tail (rest_bucket works with every loss)")
    parser.add_argument("--token-fraction", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--precision", default=None, choices=("32", "bf16-mixed", "bf16"),
                        help="default: bf16-mixed on CUDA, 32 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    # On CPU the defaults keep a run near 2 minutes on 2 cores (about 25 s per 1,024 positions per run at H = 896).
    defaults = dict(tokens="auto", chunk=1024, repeats=3, warmup=1, precision="bf16-mixed") if cuda else \
        dict(tokens="2048", chunk=256, repeats=1, warmup=0, precision="32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens != "auto":
        args.tokens = int(args.tokens)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    device = torch.device(args.device)

    start = time.perf_counter()
    fitted = args.tokens == "auto"
    if fitted:
        args.tokens = fit_tokens(args)
    for attempt in range(3 if fitted else 1):
        try:
            naive = spawn(args, "naive")
            break
        except RuntimeError as error:  # the fit is an estimate: on CUDA out of memory, 10% fewer positions
            if "out of memory" not in str(error).lower() or attempt == 2 or not fitted:
                raise
            args.tokens = int(args.tokens * 0.9) // TOKEN_STEP * TOKEN_STEP
    chunked = spawn(args, "chunked")
    total_s = time.perf_counter() - start

    gib = 2**30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.loss} (k = {args.k}, tail {args.tail}, token_fraction {args.token_fraction}), V = {args.vocab:,}, "
          f"H = {args.hidden}, B = {args.batch}, T = {args.tokens:,}{' (the longest naive fits)' if fitted else ''}, "
          f"precision {args.precision}, {name}")
    print(f"peak: {'CUDA max_memory_allocated' if device.type == 'cuda' else 'ru_maxrss'} above the inputs; "
          f"time: median of {args.repeats} after {args.warmup} warm-up\n")
    print(f"{'':<22}{'peak GiB':>10}{'time s':>10}{'loss':>14}{'|grad h|':>12}{'|grad W|':>12}")
    for label, r in (("naive (full logits)", naive), (f"chunked ({args.chunk})", chunked)):
        print(f"{label:<22}{r['peak'] / gib:>10.2f}{statistics.median(r['times']):>10.3f}{r['loss']:>14.6f}"
              f"{r['grad_hidden']:>12.5g}{r['grad_weight']:>12.5g}")
    peak_ratio = chunked["peak"] / naive["peak"]
    time_ratio = statistics.median(chunked["times"]) / statistics.median(naive["times"])
    print(f"{'chunked / naive':<22}{peak_ratio:>10.3f}{time_ratio:>10.3f}")
    met = peak_ratio <= 0.25 and time_ratio <= 1.2
    logits_bytes = args.batch * args.tokens * args.vocab * (4 if args.precision == "32" else 2)
    print(f"\ngoal (peak <= 0.25x at time <= 1.2x): {'met' if met else 'missed'}; the naive logits alone: "
          f"{logits_bytes / gib:.2f} GiB; whole run {total_s:.0f} s")


if __name__ == "__main__":
    main()
