"""What a person watching the terminal sees: rank-tagged, rate-limited log lines and a progress bar.

Only the main process shows a bar and info lines; the other ranks stay quiet unless something
goes wrong (warnings and errors), so an 8 x 8 GPU job does not print 64 copies of every line.
Everything goes through `tqdm.write`, which prints above an active bar instead of through it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

# Below this interval per key, repeated lines are counted instead of printed.
DEFAULT_EVERY_S = 30.0
# A bar redrawn every 0.5 s in a log file (SLURM, systemd) would fill it: redraw rarely there.
TTY_REFRESH_S = 0.5
FILE_REFRESH_S = 60.0


class RateLimitedLogger:
    """Log lines that name the rank, at most one per key per `every_s` seconds.

    Rank 0 prints info and above; other ranks print warnings and above only. A line held back
    is counted, and the next line with that key says how many were suppressed.
    """

    LEVELS = {"info": 20, "warning": 30, "error": 40}

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

    def _log(self, level: str, message: str, key: str | None) -> bool:
        """Print the line unless this rank is quiet at `level` or the key spoke recently."""
        if self.rank != 0 and self.LEVELS[level] < self.LEVELS["warning"]:
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
        stamp = time.strftime("%H:%M:%S")
        self._emit(f"{stamp} [rank {self.rank}] {level.upper()}: {message}{suffix}")
        return True

    def _emit(self, line: str) -> None:
        tqdm.write(line, file=self._stream or sys.stderr)


class ProgressBar:
    """A tqdm bar over optimizer steps on the main process: images/s, loss, epoch and ETA.

    Starts at `initial_step` so a resumed run shows its true position and an ETA computed from
    the steps left, not from the steps since the restart. Does nothing where `enabled` is false.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self._bar = None
        if not enabled:
            return
        stream = stream or sys.stderr
        interactive = getattr(stream, "isatty", lambda: False)()
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            file=stream,
            mininterval=TTY_REFRESH_S if interactive else FILE_REFRESH_S,
            smoothing=0.05,  # an ETA from a long average: eval pauses do not make it jump
        )

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, step: int, loss: float | None = None, img_per_s: float | None = None,
               epoch: float | None = None) -> None:
        """Move the bar to `step` (absolute, so skipped updates never make it drift)."""
        if self._bar is None:
            return
        postfix = {}
        if img_per_s is not None:
            postfix["img/s"] = f"{img_per_s:,.0f}"
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if epoch is not None:
            postfix["epoch"] = f"{epoch:.2f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        delta = step - self._bar.n
        if delta > 0:
            self._bar.update(delta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
