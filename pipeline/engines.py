"""Inference engines: batched sampling with per-token log-probs, and teacher scoring.

One small interface (`generate`, `score`), selected by `engine.name` in params.yaml. `hf` runs
transformers in-process and is the embedded default (CPU or GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.models import load_model, load_tokenizer

LOGPROB_MODE = "raw"
"""Log-probs are log_softmax of the raw logits (temperature 1, no top-p), whatever the sampler used:
that is the policy pi(y_t|s_t) the losses compare against the teacher."""


@dataclass
class Generation:
    """One sampled response: token ids (ending in EOS when it stopped), their raw log-probs."""

    prompt_index: int
    sample_idx: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS produced) or "length" (hit max_new_tokens)


@dataclass
class Scores:
    """Teacher scores of one response: the sampled token's exact log-prob, and the top-k."""

    token_logprobs: np.ndarray  # [R] float32
    topk_ids: np.ndarray  # [R, k] int32
    topk_logprobs: np.ndarray  # [R, k] float32


class HFEngine:
    """transformers in-process engine: left-padded batched `generate`, right-padded scoring."""

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

    @property
    def version(self) -> str:
        return engine_version(self.name)

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
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Generation]:
        """`sampling.n` responses per prompt, in prompt order; reproducible for a given seed."""
        torch.manual_seed(seed)
        jobs = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        out = []
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
            logits = torch.stack(result.logits, dim=1).float()  # [b, steps, V] raw
            logprobs = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row, (p, s) in enumerate(batch):
                out.append(self._finish(p, s, new[row].tolist(), logprobs[row].tolist()))
        return out

    def _finish(self, prompt_index, sample_idx, tokens, logprobs) -> Generation:
        if self.eos_id in tokens:
            end = tokens.index(self.eos_id) + 1
            return Generation(prompt_index, sample_idx, tokens[:end], logprobs[:end], "stop")
        return Generation(prompt_index, sample_idx, tokens, logprobs, "length")

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[Scores]:
        """Teacher log-probs of each response token given prompt and previous tokens, plus top-k."""
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            rows = [p + r for p, r in zip(prompts[start : start + self.cfg.batch_size], responses[start:])]
            ids, mask = self._pad(rows, left=False)
            logprobs = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            for row in range(len(rows)):
                p_len = len(prompts[start + row])
                r_len = len(rows[row]) - p_len
                # position t predicts token t + 1, so response token j is scored at p_len - 1 + j
                pos = slice(p_len - 1, p_len - 1 + r_len)
                targets = ids[row, p_len : p_len + r_len]
                token_lp = logprobs[row, pos].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                out.append(
                    Scores(
                        token_lp.cpu().numpy().astype(np.float32),
                        top_ids[row, pos].cpu().numpy().astype(np.int32),
                        top_lp[row, pos].cpu().numpy().astype(np.float32),
                    )
                )
        return out


def engine_version(name: str) -> str:
    """Engine name and library version, recorded in every artefact's provenance."""
    import transformers

    return f"hf (transformers {transformers.__version__})"


def load_engine(model_dir, cfg: EngineConfig) -> HFEngine:
    if cfg.name == "hf":
        return HFEngine(model_dir, cfg)
    raise ValueError(f"unknown engine {cfg.name!r}")
