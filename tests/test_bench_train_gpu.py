"""bench/train_gpu.py at --tiny on the CPU: every variant trains through the real loop and is reported; the memory
plan's parts add up. No timing asserted."""

import pytest

from bench import train_gpu


def test_parameter_count_matches_the_built_qwen3_models():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for shape in (train_gpu.TINY, train_gpu.SMALL):
        model = Qwen3ForCausalLM(Qwen3Config(**shape))
        assert train_gpu.parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_memory_plan_of_the_papers_setting():
    plan = train_gpu.memory_plan(train_gpu.QWEN3_8B, 4096, 64, 1024, devices=8, fsdp=True)
    n = train_gpu.parameter_count(train_gpu.QWEN3_8B)
    assert 8.0e9 < n < 8.3e9  # Qwen3-8B's 8.2B
    assert plan["weights"] + plan["gradients"] + plan["AdamW state"] == pytest.approx(16 * n / 8)
    full = train_gpu.memory_plan(train_gpu.QWEN3_8B, 4096, 64, 0, devices=8, fsdp=True)
    assert full["loss"] > plan["loss"]  # [T, V] logits against a chunk's
    ckpt = train_gpu.memory_plan(train_gpu.QWEN3_8B, 4096, 64, 1024, devices=8, fsdp=True, checkpointing=True)
    assert ckpt["activations"] < plan["activations"] / 10


@pytest.mark.slow
def test_tiny_run_reports_each_variant(capsys):
    train_gpu.main(["--tiny", "--steps", "2", "--warmup", "1", "--variants", "packed", "full logits", "fsdp"])
    out = capsys.readouterr().out
    assert "failed" not in out, out
    for name in ("packed", "full logits", "fsdp"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "MFU = 6 x N x tokens/s / 9.89e+14" in out
