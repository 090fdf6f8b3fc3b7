"""What a person watching the terminal sees: a progress bar, and (resnet.logs) rank-tagged,
rate-limited log lines.

Only the main process shows a bar and info lines; the other ranks stay quiet unless something
goes wrong (warnings and errors), so an 8 x 8 GPU job does not print 64 copies of every line.
Log lines go through `tqdm.write`, which prints above an active bar instead of through it.
"""
from __future__ import annotations

import os
import sys
from typing import TextIO

from tqdm.auto import tqdm


# A bar redrawn every 0.5 s in a log file (SLURM, systemd) would fill it: redraw rarely there.
TTY_REFRESH_S = 0.5
FILE_REFRESH_S = 60.0
# Set by `resnet quickstart`, which reads the output through a pipe and shows it to a person.
TTY_ENV = "RESNET_TTY"


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
        interactive = (getattr(stream, "isatty", lambda: False)()
                       or os.environ.get(TTY_ENV) == "1")
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
