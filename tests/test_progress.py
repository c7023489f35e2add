"""What a run shows: progress lines (not on a terminal) or bars (on one), and each stage's summary line."""

from __future__ import annotations

import logging
import os
import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import cli, progress, shards
from tests.conftest import TINY_PARAMS


@pytest.fixture(autouse=True)
def keep_logging():
    """A stage's main() points the root logger at this test's captured stderr; put it back afterwards."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture
def in_a_log(monkeypatch):
    """Not on a terminal, whatever runs pytest, and a progress line at every update."""
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)


def on_disk(directory) -> tuple[int, int, int]:
    """Rows, response tokens (response_ids or teacher_token_logprobs list lengths) and bytes, counted directly."""
    rows = tokens = 0
    for path in shards.list_shards(directory):
        table = pq.read_table(path)
        column = "response_ids" if "response_ids" in table.column_names else "teacher_token_logprobs"
        rows += table.num_rows
        tokens += sum(len(values) for values in table[column].to_pylist())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)
    return rows, tokens, size


def summary_of(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def test_generation_and_scoring_log_progress_and_print_their_summaries(tiny_run, tmp_path, capsys, in_a_log):
    """tiny params: 20 prompts x 2 samples, 8 prompts a shard, engine batches of 8 sequences."""
    from stages import rollouts, teacher_logprobs

    out, cache = tmp_path / "rollouts", tmp_path / "teacher_cache"
    rollouts.main(["--params", str(TINY_PARAMS), "--policy", str(tiny_run / "models/sft"),
                   "--prompts", str(tiny_run / "data/prompts"), "--out", str(out)])
    captured = capsys.readouterr()
    assert re.search(r"generate: 8/16 sequences \(50%\), [\d,]+ tokens/s, ETA [\d.]+ s", captured.err), captured.err
    assert re.search(r"generate: 16/16 sequences, [\d,]+ tokens/s, done in [\d.]+ s", captured.err)
    rows, tokens, size = on_disk(out)
    assert (rows, tokens) == (40, pc.sum(pc.list_value_length(pq.read_table(out)["response_ids"])).as_py())
    assert re.fullmatch(rf"rollouts: 40 rows, {tokens:,} response tokens, [\d.]+ s, "
                        rf"{re.escape(cli.format_bytes(size))} "
                        rf"-> {re.escape(str(out))}", summary_of(captured.out)), captured.out

    teacher_logprobs.main(["--params", str(TINY_PARAMS), "--models", str(tiny_run / "models/base"),
                           "--rollouts", str(out), "--out", str(cache)])
    captured = capsys.readouterr()
    assert re.search(r"score: 16/16 sequences, [\d,]+ tokens/s, done in", captured.err), captured.err
    rows, cache_tokens, size = on_disk(cache)
    assert (rows, cache_tokens) == (40, tokens)  # a cache row holds one entry per response token
    assert re.fullmatch(rf"teacher_logprobs: 40 rows, {tokens:,} response tokens, [\d.]+ s, "
                        rf"{re.escape(cli.format_bytes(size))} -> {re.escape(str(cache))}", summary_of(captured.out))


def test_training_logs_progress_and_a_model_stage_prints_its_summary(tiny_run, tmp_path, capsys, in_a_log):
    from stages import sft

    out = tmp_path / "sft"
    sft.main(["--params", str(TINY_PARAMS), "--models", str(tiny_run / "models/base"),
              "--sft-data", str(tiny_run / "data/sft"), "--out", str(out)])
    captured = capsys.readouterr()
    assert re.search(r"train: 1/3 steps \(33%\), loss [\d.]+, [\d,]+ tokens/s, ETA [\d.]+ s",
                     captured.err), captured.err
    assert re.search(r"train: 3/3 steps, loss [\d.]+, [\d,]+ tokens/s, done in", captured.err)
    assert "\r" not in captured.err + captured.out  # no progress bar
    _, _, size = on_disk(out)
    # a model directory: no rows or tokens, its steps instead
    assert re.fullmatch(rf"sft: 3 steps, [\d.]+ s, {re.escape(cli.format_bytes(size))} -> {re.escape(str(out))}",
                        summary_of(captured.out)), captured.out


def test_on_a_terminal_bars_are_drawn_instead(tmp_path, capsys, monkeypatch):
    """What CI never sees: the engines' tqdm bar, and Lightning's own bar (rich or tqdm, with tokens/s) in training."""
    from pipeline import data, models, toy_task, training
    from pipeline.config import ToyModelConfig, TrainConfig

    with progress.Progress("generate", 4, "sequences", tty=True) as shown:
        shown.update(3, tokens=30)
        assert shown.bar.n == 3 and shown.bar.postfix.endswith(" tokens/s")
    assert "generate:   0%|" in capsys.readouterr().err  # tqdm redraws at most every 0.1 s

    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    tokenizer = toy_task.build_tokenizer()
    model = models.build_toy_model(ToyModelConfig(64, 1, 64, 1), tokenizer, seed=0)
    rows = [{"prompt_ids": [1, 5, 6], "response_ids": [7, 2]}] * 8
    cfg = TrainConfig(steps=2, batch_size=4)
    trainer = training.train(model, data.in_memory(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed), cfg,
                             tmp_path)
    assert not any(isinstance(c, training.LogProgress) for c in trainer.callbacks)
    captured = capsys.readouterr()
    assert "tokens/s" in captured.out and "train: " not in captured.err


def test_durations_and_sizes_read_as_people_write_them():
    assert [progress.format_seconds(s) for s in (3.14, 725, 11225)] == ["3.1 s", "12 min 05 s", "3 h 07 min"]
    assert ([cli.format_bytes(n) for n in (812, 12_600, 2_000_000, 5 << 30)]
            == ["812 B", "12.3 KiB", "1.9 MiB", "5.0 GiB"])
