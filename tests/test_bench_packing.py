"""bench/packing.py end to end on a small size: its ratios come from the real sampler and collate. No timing
asserted."""

from bench import packing


def test_packing_bench_reports_padding_ratios_and_both_training_speeds(capsys):
    lens = packing.lengths(500)
    assert lens.min() >= packing.MIN_LEN and lens.max() == packing.MAX_LEN
    ratios = packing.padding_ratios(lens, 8, [4096])
    (random, _), (bucketed, _), (packed, fill) = ratios.values()
    assert random > bucketed > 1.0  # bucketing removes most padding, not all
    assert packed == 1.0 and 0.8 < fill <= 1.0  # packed batches hold no padding, and nearly fill their budget
    packing.main(["--rows", "300", "--train-rows", "40", "--steps", "2", "--pack-tokens", "4096"])
    out = capsys.readouterr().out
    assert "bucketed batches of 8" in out and "packed, pack_tokens 512" in out and out.count("response tokens/s") == 2
