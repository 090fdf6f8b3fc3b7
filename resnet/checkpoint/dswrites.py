"""DeepSpeed's checkpoint writes, made to fail in step on every rank.

DeepSpeed's `save_checkpoint` makes collectives between and after its writes: a barrier after
rank 0 creates the folder, the checkpoint tag check, a closing barrier. A write that raises on
one rank (ENOSPC in rank 0's model file, or in a rank's ZeRO shard) takes that rank out of the
collectives the other ranks then wait in, and every rank hangs for the process group's timeout
(30 minutes). So, during a save, the writes DeepSpeed makes through its checkpoint engine
record their error and return: every rank goes through the same collectives. The writes it
makes outside that engine (rank 0's `latest` file, the recovery script) come after all of them
but the closing barrier, which a rank that failed there joins before raising. Each rank raises
its first error once `save_checkpoint` is over, where the checkpoint manager gathers them.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


class _RecordingEngine:
    """DeepSpeed's checkpoint engine, whose `save` and `makedirs` record errors instead."""

    def __init__(self, real: Any, errors: list[BaseException]) -> None:
        self._real, self._errors = real, errors

    def save(self, *args, **kwargs):
        return self._record(self._real.save, *args, **kwargs)

    def makedirs(self, *args, **kwargs):
        return self._record(self._real.makedirs, *args, **kwargs)

    def _record(self, write, *args, **kwargs):
        if self._errors:  # the checkpoint already failed here: write nothing more
            return None
        try:
            return write(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (torch.save reports a full disk as RuntimeError)
            self._errors.append(exc)
            return None

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def guard(accelerator: Any) -> None:
    """Make the accelerator's DeepSpeed engine (if any) fail its saves in step; idempotent."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = getattr(wrapped, "engine", None)
    if engine is None or "save_checkpoint" in vars(engine):
        return
    real_save = engine.save_checkpoint

    def save_checkpoint(save_dir, *args, **kwargs):
        errors: list[BaseException] = []
        real_engine = engine.checkpoint_engine
        engine.checkpoint_engine = _RecordingEngine(real_engine, errors)
        try:
            real_save(save_dir, *args, **kwargs)
        except OSError as exc:  # a write of its own, before only the closing barrier
            errors.append(exc)
            dist.barrier()
        finally:
            engine.checkpoint_engine = real_engine
        if errors:
            raise errors[0]
        return True

    engine.save_checkpoint = save_checkpoint
