"""bench/loss_memory.py: its two variants agree, and the chunked loss's peak memory is a fraction of the naive one's.

Memory only: no timing is asserted.
"""

import pytest

from bench import loss_memory


def test_chunked_peak_is_under_a_quarter_of_naive_at_full_vocabulary():
    # V = 151,936 and 512 positions: 0.29 GiB of float32 logits, about 1.5 GiB at the naive peak; a small H
    # keeps the products cheap (the head's gradient, V * H, is in both peaks).
    args = loss_memory.parse_args(["--device", "cpu", "--tokens", "512", "--hidden", "16", "--chunk", "64",
                                   "--repeats", "1", "--warmup", "0", "--threads", "1"])
    naive, chunked = (loss_memory.spawn(args, variant) for variant in ("naive", "chunked"))
    assert chunked["peak"] < naive["peak"] / 4, (chunked["peak"], naive["peak"])
    assert naive["peak"] > args.tokens * args.vocab * 4  # the measure sees the full logits
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-5)
    for key in ("grad_hidden", "grad_weight"):
        assert chunked[key] == pytest.approx(naive[key], rel=1e-4), key
