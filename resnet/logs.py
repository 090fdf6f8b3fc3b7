"""What the product says on the console, and how it stays apart from library chatter.

- `RateLimitedLogger`: rank-tagged lines, at most one per key per interval, written through
  `tqdm.write` so they print above an active progress bar instead of through it. Used by the
  trainer, the metrics sinks and the data loader's workers (so it imports neither torch nor
  any other part of the package).
- `configure`: the `resnet.*` loggers of the standard `logging` module print in the same
  format; the verbosity comes from ``RESNET_LOG_LEVEL``.
- `write_unlocked`: the same line format from a signal handler or a watchdog thread.
- `is_product_line`: recognises those lines and tqdm bars in captured output, which is how
  `resnet quickstart` shows what the product says and sends the rest to a log file.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

# Below this interval per key, repeated lines are counted instead of printed.
DEFAULT_EVERY_S = 30.0
LEVEL_ENV = "RESNET_LOG_LEVEL"  # debug: everything, libraries included; info (default); warning
_LINE_RE = re.compile(r"^\d\d:\d\d:\d\d \[rank \d+\] (INFO|WARNING|ERROR): ")
_BAR_RE = re.compile(r"\d+/\d+ \[\d+:\d+")  # tqdm: "n/total [elapsed<remaining, rate]"


def rank_from_env() -> int:
    """The process's global rank as torchrun and `accelerate launch` set it (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def level() -> int:
    """The console level from ``RESNET_LOG_LEVEL`` (a name or a number; default INFO)."""
    value = os.environ.get(LEVEL_ENV, "").strip().upper() or "INFO"
    number = logging.getLevelName(value) if not value.isdigit() else int(value)
    return number if isinstance(number, int) else logging.INFO


def verbose() -> bool:
    """True when the console should show library output too (``RESNET_LOG_LEVEL=debug``)."""
    return level() <= logging.DEBUG


def format_line(rank: int, levelname: str, message: str) -> str:
    return f"{time.strftime('%H:%M:%S')} [rank {rank}] {levelname}: {message}"


def write_unlocked(rank: int, levelname: str, message: str) -> None:
    """One product line written straight to file descriptor 2, taking no lock: for a signal
    handler and a watchdog thread. `logging`, `tqdm.write` and sys.stderr's buffer each take a
    lock; a handler that interrupted its own thread inside one of them, or a watchdog whose
    stuck main thread holds one, would wait on it for ever."""
    os.write(2, (format_line(rank, levelname, message) + "\n").encode())


def is_product_line(line: str) -> bool:
    """A line the product prints on purpose: one of our log lines, or a progress bar."""
    return bool(_LINE_RE.match(line) or _BAR_RE.search(line))


class RateLimitedLogger:
    """Log lines that name the rank, at most one per key per `every_s` seconds.

    Rank 0 prints info and above; other ranks print warnings and above only. A line held back
    is counted, and the next line with that key says how many were suppressed.
    """

    LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def __init__(
        self,
        rank: int,
        every_s: float = DEFAULT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self.rank = rank
        self.every_s = every_s
        self._clock = clock
        self._stream = stream
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @classmethod
    def for_accelerator(cls, accelerator, every_s: float = DEFAULT_EVERY_S) -> "RateLimitedLogger":
        return cls(rank=accelerator.process_index, every_s=every_s)

    def info(self, message: str, key: str | None = None) -> bool:
        return self._log("info", message, key)

    def warning(self, message: str, key: str | None = None) -> bool:
        return self._log("warning", message, key)

    def error(self, message: str, key: str | None = None) -> bool:
        return self._log("error", message, key)

    def _log(self, level_name: str, message: str, key: str | None) -> bool:
        """Print the line unless this rank is quiet at `level` or the key spoke recently."""
        if self.rank != 0 and self.LEVELS[level_name] < logging.WARNING:
            return False
        key = key or message
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        suffix = f" ({held} similar lines suppressed)" if held else ""
        tqdm.write(format_line(self.rank, level_name.upper(), message + suffix),
                   file=self._stream or sys.stderr)
        return True


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(format_line(rank_from_env(), record.levelname, record.getMessage()),
                       file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise into the caller)
            self.handleError(record)


def configure() -> None:
    """Print the `resnet.*` loggers' records as product lines, at the ``RESNET_LOG_LEVEL``
    level (default INFO); idempotent."""
    logger = logging.getLogger("resnet")
    logger.setLevel(level())
    logger.propagate = False  # printed here only, even where the root logger prints too
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
