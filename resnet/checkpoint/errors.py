"""What the checkpoint room raises, below every module of it (the mirror and the manager both
raise them, and the manager calls the mirror, never the other way round)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """No checkpoint every rank can resume from: nodes see different ones (training from
    either would fork the run), or preparing, writing or restoring one failed on some rank."""


class ResumeError(CheckpointError):
    """This run cannot continue the checkpoint it found (another data set, another global
    batch, ZeRO shards that do not convert, checkpoints where a fresh start was asked for).
    Bad input, as a setup error is: the message says what to change."""
