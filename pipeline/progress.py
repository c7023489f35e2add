"""Progress of the long loops (generation, scoring, training): done/total, tokens/s and ETA.

On a terminal it is a tqdm bar; otherwise (CI, dvc's captured output, nohup) a bar's carriage returns
would flood the log, so it is a plain log line every LOG_EVERY_S seconds and one when the loop ends.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0
"""Seconds between progress lines when not on a terminal: a sign of life in any log, a few lines a shard."""


def is_terminal() -> bool:
    """Whether a person is watching: stderr (where logs and bars go) is a TTY."""
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Not on a terminal, turn off the bars of transformers and the Hugging Face hub (loading weights,
    downloads): in a log their carriage returns are noise."""
    if not is_terminal():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def format_seconds(seconds: float) -> str:
    """`31.2 s`, `12 min 05 s`, `3 h 07 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """`total` units (sequences, steps) with the tokens they hold: a bar on a terminal, log lines otherwise.

        with Progress("generate", len(jobs), "sequences") as progress:
            for batch in batches:
                ...
                progress.update(len(batch), tokens=n_tokens)

    `initial` is work already done before this process started (a resumed run): rates and the ETA
    count only what is done now. `tty` forces the choice (default: `is_terminal()`).
    """

    def __init__(self, desc: str, total: int, unit: str, initial: int = 0, tty: bool | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.initial = self.done = initial
        self.tokens = 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if is_terminal() if tty is None else tty:
            from tqdm import tqdm

            # leave=False: the stage's own log lines (one per shard) stay, finished bars go. tqdm
            # writes its rate as `<unit>/s`, hence the singular.
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.removesuffix("s"), leave=False,
                            dynamic_ncols=True)

    def update(self, n: int, tokens: int = 0, **values: float) -> None:
        """`n` more units done, holding `tokens` tokens; `values` (e.g. loss=0.53) are shown beside them."""
        self.done += n
        self.tokens += tokens
        now = time.perf_counter()
        tokens_per_s = self.tokens / max(now - self.start, 1e-9)
        shown = [f"{key} {value:.4g}" for key, value in values.items()] + [f"{tokens_per_s:,.0f} tokens/s"]
        if self.bar is not None:
            self.bar.update(n)  # tqdm adds the rate of units and the ETA
            self.bar.set_postfix_str(", ".join(shown), refresh=False)
        elif self.done >= self.total or now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            log.info("%s", self._line(now, shown))

    def _line(self, now: float, shown: list[str]) -> str:
        elapsed = now - self.start
        head = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        if self.done >= self.total:
            return ", ".join([head, *shown, f"done in {format_seconds(elapsed)}"])
        rate = (self.done - self.initial) / max(elapsed, 1e-9)
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        return ", ".join([f"{head} ({100 * self.done // max(self.total, 1)}%)", *shown, f"ETA {eta}"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
