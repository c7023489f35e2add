"""collate puts targets and teacher signal at the positions that predict each response token."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.training import collate


def test_collate_aligns_response_fields_with_the_predicting_positions():
    rows = [
        {"prompt_ids": [1, 5, 6], "response_ids": [7, 2], "teacher_logprobs": np.array([-0.5, -0.1], np.float32),
         "teacher_topk_ids": np.array([[7, 8], [2, 3]]), "teacher_topk_logprobs": np.array([[-0.5, -1], [-0.1, -3]], np.float32)},
        {"prompt_ids": [1, 9], "response_ids": [4, 4, 2], "teacher_logprobs": np.array([-1, -2, -3], np.float32),
         "teacher_topk_ids": np.array([[4, 5], [4, 6], [2, 4]]), "teacher_topk_logprobs": np.zeros((3, 2), np.float32)},
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 4, 4]]
    assert batch["targets"].tolist() == [[5, 6, 7, 2], [9, 4, 4, 2]]
    assert batch["mask"].tolist() == [[False, False, True, True], [False, True, True, True]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # where the mask is on, the target is the response token the teacher fields describe
    assert batch["teacher_logprobs"][0, 2:].tolist() == [-0.5, -0.10000000149011612]
    assert batch["teacher_topk_ids"][1, 1:].tolist() == [[4, 5], [4, 6], [2, 4]]
    assert batch["teacher_topk_ids"].dtype == torch.long
    assert "behavior_logprobs" not in batch


def test_collate_pads_short_rows_on_the_right():
    batch = collate([{"prompt_ids": [1, 5], "response_ids": [2]}, {"prompt_ids": [1, 5, 6, 7], "response_ids": [8, 2]}], pad_id=0)
    assert batch["input_ids"][0].tolist() == [1, 5, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0, 0]
    assert batch["mask"][0].tolist() == [False, True, False, False, False]
