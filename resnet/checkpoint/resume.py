"""Resuming a run, in one call: find the checkpoint every rank agrees on (local or the
mirror's), check that this run can continue it, load it (plainly, or through DeepSpeed's
universal checkpoint for ZeRO shards of another world size) and check that every rank resumed
at the same point. (torchtitan's CheckpointManager.load is the model.)

Preflight, before any process group exists, asks `local_resume_point` the same questions about
the newest local checkpoint: the global batch it was trained with (an elastic restart keeps
it) and whether the engine must be started to load a universal checkpoint. `resume` asks them
again of the checkpoint it loads, which may have come from the mirror.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from resnet.checkpoint import universal
from resnet.checkpoint.errors import CheckpointError, ResumeError
from resnet.checkpoint.manager import CheckpointManager
from resnet.runfolder import latest_checkpoint, read_state

# The part of trainer_state.json that says which run wrote a checkpoint: fingerprint,
# global_batch, world_size, zero_stage (the trainer's TrainerState, saved under this name).
PROGRESS = "progress"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must agree with for this run to continue it (the world size may
    differ: ZeRO-1/2 shards are then converted)."""

    fingerprint: str  # the training data set's
    global_batch: int
    world_size: int


@dataclass(frozen=True)
class LocalResume:
    """The newest local checkpoint, checked before any process group exists."""

    checkpoint: Path
    global_batch: int  # the one it was trained with: the run keeps it
    load_universal: bool  # ZeRO-1/2 of another world size: the engine loads it universally


def saved_progress(checkpoint: Path) -> dict:
    return read_state(checkpoint)[PROGRESS]


def local_resume_point(run_dir: str | Path, *, resume: bool, fingerprint: str,
                       global_batch: int, world_size: int) -> LocalResume | None:
    """The newest local checkpoint this run would continue (None: a fresh start), or
    ResumeError saying why it cannot. `global_batch` is the configured one; a checkpoint's
    own wins (the schedule depends on it)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    if not resume:
        # Training on would mix two runs' checkpoints, metrics and audit in one folder.
        raise ResumeError(f"run.dir={run_dir} already holds checkpoints (newest: "
                          f"{latest.name}) and checkpoint.resume=false: use a new run.dir, or "
                          f"delete {latest.parent} to start this run over")
    saved = saved_progress(latest)
    run = RunIdentity(fingerprint, saved["global_batch"] or global_batch, world_size)
    return LocalResume(latest, run.global_batch, check_resumable(latest, saved, run))


def check_resumable(checkpoint: Path, saved: dict, run: RunIdentity) -> bool:
    """Refuse, with what to do, a checkpoint this run cannot continue. True: it is ZeRO-1/2
    of another world size, loaded through DeepSpeed's universal checkpoint (universal.py)."""
    if saved["fingerprint"] != run.fingerprint:
        raise ResumeError(f"{checkpoint} was trained on another data set (fingerprint "
                          f"{saved['fingerprint'][:12]}, data.train has "
                          f"{run.fingerprint[:12]}); use a new run.dir or the original "
                          f"data.train")
    if saved["global_batch"] != run.global_batch:
        raise ResumeError(f"{checkpoint} was trained with global batch "
                          f"{saved['global_batch']}; set "
                          f"train.global_batch_size={saved['global_batch']}")
    if universal.needs_conversion(saved, run.world_size):  # ZeRO shards of another world size
        universal.check_convertible(checkpoint, saved, run.world_size)
        return True
    return False


def resume(checkpoints: CheckpointManager, model: Any, run: RunIdentity,
           resumed_at: Callable[[], tuple]) -> Path | None:
    """Every rank: resume from the checkpoint every rank agrees on; returns it (None: a fresh
    start). `model` is the prepared model (a DeepSpeed engine loads universal checkpoints);
    `resumed_at()`, once loaded, is the point this rank continues from (step, epoch, data
    set), which must be the same on every rank."""
    latest = checkpoints.prepare()
    if latest is None or not checkpoints.resume_allowed:
        return None
    # Checked in preflight for a local checkpoint; again here for one from the mirror.
    if check_resumable(latest, saved_progress(latest), run):
        _load_universal(checkpoints, latest, model)
    else:
        checkpoints.load(latest)
    _check_same_point(checkpoints, latest, resumed_at())
    return latest


def _load_universal(checkpoints: CheckpointManager, checkpoint: Path, model: Any) -> None:
    """Resume from a ZeRO checkpoint of another world size: rank 0 converts it (once) while
    the others wait, every rank loads it through DeepSpeed's universal loading, and the
    module's buffers come from the model states file (the loader re-splits the rest of the
    epoch by itself)."""
    if not universal.loads_universal(model):
        raise ResumeError(f"{checkpoint} holds ZeRO shards of another world size and was "
                          f"found only after start (on the mirror); start again to convert it")
    mirror = checkpoints.mirror.url if checkpoints.mirror else ""

    def convert() -> None:
        if checkpoints.accelerator.is_main_process and not universal.is_converted(checkpoint):
            seconds = universal.convert(checkpoint, mirror)
            log.info(f"converted {checkpoint.name} to DeepSpeed's universal checkpoint in "
                     f"{seconds:.1f} s")

    checkpoints.on_every_rank(convert, f"converting {checkpoint} to a universal checkpoint")
    checkpoints.load(checkpoint)
    universal.restore_buffers(checkpoints.accelerator.unwrap_model(model), checkpoint)


def _check_same_point(checkpoints: CheckpointManager, checkpoint: Path, point: tuple) -> None:
    """Every rank loaded its own copy (node-local disks): they must be the same point."""
    views = checkpoints.gather((checkpoints.location, checkpoint.name, point))
    differ = [v for v in views if v[2] != views[0][2]]
    if differ:
        (where_a, name_a, a), (where_b, name_b, b) = views[0], differ[0]
        raise CheckpointError(
            f"ranks resumed from different points: {where_a} loaded {name_a} (step, epoch, "
            f"data set = {a[0]}, {a[1]}, {a[2][:12]}), {where_b} loaded {name_b} "
            f"({b[0]}, {b[1]}, {b[2][:12]}); run.dir must be shared or mirrored")
