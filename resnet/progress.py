"""Progress that fits where it goes: a bar for a person at a terminal, plain lines for a file.

In a terminal (stderr is a TTY) a tqdm bar redraws itself with carriage returns, and log lines
(resnet.logs, through `tqdm.write`) print above it. Anywhere else (nohup, SLURM's output file,
systemd's journal, CloudWatch, a pipe) carriage returns would glue the bar's states and the log
lines into one unreadable line, so there is no bar: a plain log line says where the work is
every `every` units (the trainer's train.log_every_steps) or every `every_s` seconds, whichever
comes first, and once at the end:

    12:00:00 [rank 0] INFO: progress: step 10/18 (56%), epoch 0.56, img/s 1,234, loss 2.3456,
    elapsed 00:05, ETA 00:04

Only the main process shows progress: the other ranks pass enabled=False.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

from resnet.logs import format_line, rank_from_env

TTY_REFRESH_S = 0.5
PLAIN_EVERY_S = 60.0  # a plain line at least this often while the work moves
_PLAIN_RE = re.compile(r"^\d\d:\d\d:\d\d \[rank \d+\] INFO: (progress: .*)$")


def is_progress_line(line: str) -> str | None:
    """The progress text of a plain progress line (without time and rank), else None."""
    match = _PLAIN_RE.match(line)
    return match.group(1) if match else None


def _figures(figures: dict) -> list[tuple[str, str]]:
    """(name, text) of the figures, the usual three first and formatted."""
    formats = {"epoch": "{:.2f}", "img/s": "{:,.0f}", "loss": "{:.4f}"}
    named = {("img/s" if k == "img_per_s" else k): v for k, v in figures.items()}
    order = [k for k in formats if k in named] + [k for k in named if k not in formats]
    return [(k, formats.get(k, "{}").format(named[k])) for k in order]


class ProgressBar:
    """Progress over `total` units (optimizer steps, images) from `initial` (a resumed run
    shows its true position, and an ETA from the units left at the rate since this start)."""

    def __init__(self, total: int, initial: int = 0, *, unit: str = "step", enabled: bool = True,
                 every: int = 0, every_s: float = PLAIN_EVERY_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.unit, self.every, self.every_s = total, unit, every, every_s
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._clock = clock
        self._n = self._start_n = self._shown_n = initial
        self._start = self._shown_at = clock()
        self._figures: dict = {}
        self._bar = None
        if enabled and getattr(self._stream, "isatty", lambda: False)():
            self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                             file=self._stream, mininterval=TTY_REFRESH_S,
                             smoothing=0.05)  # an ETA from a long average: pauses don't jump it

    @property
    def interactive(self) -> bool:
        return self._bar is not None

    def update(self, n: int, **figures) -> None:
        """Move to `n` (absolute, so skipped updates never make it drift), with figures to show
        (loss, img_per_s, epoch, or any name=text)."""
        if not self.enabled:
            return
        self._figures.update({k: v for k, v in figures.items() if v is not None})
        if self._bar is not None:
            self._bar.set_postfix(dict(_figures(self._figures)), refresh=False)
            if n > self._bar.n:
                self._bar.update(n - self._bar.n)
            return
        self._n = max(self._n, n)
        now = self._clock()
        if (self.every and self._n - self._shown_n >= self.every) or \
                now - self._shown_at >= self.every_s:
            self._print(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._n > self._shown_n:
            self._print(self._clock())
        self.enabled = False

    def line(self, now: float) -> str:
        """The plain progress text at `now`."""
        elapsed = now - self._start
        done = self._n - self._start_n
        parts = [f"progress: {self.unit} {self._n:,}/{self.total:,} "
                 f"({100 * self._n / max(self.total, 1):.0f}%)",
                 *(f"{name} {text}" for name, text in _figures(self._figures)),
                 f"elapsed {tqdm.format_interval(elapsed)}"]
        if done > 0 and self._n < self.total:
            parts.append(f"ETA {tqdm.format_interval((self.total - self._n) * elapsed / done)}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        self._stream.write(format_line(rank_from_env(), "INFO", self.line(now)) + "\n")
        self._stream.flush()
        self._shown_n, self._shown_at = self._n, now
