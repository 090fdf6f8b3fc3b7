"""Test-only fault injection, the one place it lives. Nothing happens unless these are set:

    RESNET_FAULT_AFTER_STEP=N     act right after optimizer step N (its checkpoint, if one is
                                  due at N, already written): the process SIGKILLs itself
    RESNET_FAULT_IN_CHECKPOINT=1  die inside step N's checkpoint write instead: after
                                  save_state, before the rename that makes it visible
    RESNET_FAULT_HOLD=PATH        instead of dying after step N, write this process id to PATH
                                  and wait (at most 120 s) until PATH is removed, so a test can
                                  kill or signal the run at a known point
    RESNET_FAULT_RANK=R           only on global rank R (default: every rank)

Faults fire in the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0), so an elastic
restart runs clean. Used by tests/test_fault_tolerance.py.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOLD_LIMIT_S = 120.0


def _armed() -> int | None:
    step = os.environ.get("RESNET_FAULT_AFTER_STEP")
    if not step or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return None
    return int(step)


AFTER_STEP = _armed()  # read once; None (the normal case) makes every hook a no-op
IN_CHECKPOINT = os.environ.get("RESNET_FAULT_IN_CHECKPOINT") == "1"
HOLD = os.environ.get("RESNET_FAULT_HOLD", "")
RANK = os.environ.get("RESNET_FAULT_RANK", "")


def _fires(step: int, rank: int) -> bool:
    return step == AFTER_STEP and (not RANK or int(RANK) == rank)


def after_step(step: int, rank: int) -> None:
    if AFTER_STEP is None or IN_CHECKPOINT or not _fires(step, rank):
        return
    if HOLD:
        hold = Path(HOLD)
        hold.write_text(str(os.getpid()))
        deadline = time.monotonic() + HOLD_LIMIT_S
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def in_checkpoint(step: int, rank: int) -> None:
    if AFTER_STEP is not None and IN_CHECKPOINT and _fires(step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
