"""Small valid tables of every artefact, shared by the schema and shard tests."""

from __future__ import annotations

import pyarrow as pa

from data_schemas import prompts, rollouts, sft_samples, teacher_cache


def prompts_table(**overrides):
    columns = {
        "prompt_id": ["p0", "p1", "p2"],
        "prompt": ["1+1=", "2+2=", "3+3="],
        "answer": ["2", None, "6"],
        "split": ["train", "train", "test"],
    }
    return pa.table({**columns, **overrides}, schema=None if overrides else prompts.schema())


def sft_table():
    return pa.table(
        {"prompt_id": ["p0", "p1"], "prompt_ids": [[1, 2], [3]], "response_ids": [[4, 5, 6], [7]]},
        schema=sft_samples.schema(),
    )


def rollouts_table(**overrides):
    columns = {
        "prompt_id": ["p0", "p0", "p1"],
        "sample_idx": [0, 1, 0],
        "round": [0, 0, 0],
        "prompt_ids": [[1, 2], [1, 2], [3]],
        "response_ids": [[4, 5], [6], [7, 8, 9]],
        "behavior_logprobs": [[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6]],
        "finish_reason": ["stop", "length", "stop"],
    }
    columns.update(overrides)
    return pa.Table.from_pydict(columns, schema=rollouts.schema())


def cache_table(k=2, lengths=(2, 1, 3), keys=None):
    keys = keys or [("p0", 0, 0), ("p0", 1, 0), ("p1", 0, 0)]
    return pa.Table.from_pydict(
        {
            "prompt_id": [key[0] for key in keys],
            "sample_idx": [key[1] for key in keys],
            "round": [key[2] for key in keys],
            "teacher_token_logprobs": [[-0.5] * n for n in lengths],
            "teacher_topk_ids": [[list(range(k))] * n for n in lengths],
            "teacher_topk_logprobs": [[[-1.0] * k] * n for n in lengths],
        },
        schema=teacher_cache.schema(k),
    )
