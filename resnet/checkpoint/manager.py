"""One checkpoint manager over the accelerator's tensors and a dict of JSON-stateful parts.

Layout of ``run.dir/checkpoints/``::

    step-000001200/        complete checkpoints (a rename makes them visible)
        pytorch_model/ ... accelerator.save_state: model, optimizer (DeepSpeed: per-rank)
            zero/, universal.json  ZeRO-1/2 resumed on another world size: DeepSpeed's
                               universal checkpoint, added once (universal.py)
        trainer_state.json the parts' state_dicts (loader, progress, ...), written before rename
    .tmp-step-000001300/   a checkpoint being written; ignored and removed at the next start
    latest                 the name of the newest complete checkpoint, replaced atomically, last

A crash at any point leaves the previous checkpoint intact and `latest` pointing at it.
With ``checkpoint.mirror=s3://...`` each complete checkpoint is uploaded in the background
(its ``latest`` last; mirror.py retries through an outage, which never stops training), and
the mirror is the truth across nodes: at start every node restores the mirror's newest
checkpoint unless all nodes already hold the same newest one (a shared run.dir), so nodes with
their own disks (empty, behind or ahead) all resume from the same step. Without a mirror,
run.dir must be shared, and nodes that see different newest checkpoints are an error naming
both, never a silent restart from step 0. The manager calls the mirror (uploads, restores);
the mirror never calls the manager. Resuming (prepare, check, load) is resume.py's one call.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Protocol

from resnet.checkpoint import diskspace, dswrites
from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.files import TMP_PREFIX, fsync, fsync_tree, write_atomic
from resnet.checkpoint.mirror import Mirror, restore_lock
from resnet.runfolder import (CHECKPOINT_NAME, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, LATEST,
                              STATE_FILE, WRITTEN_ORDER, checkpoint_name, complete_checkpoints,
                              find_latest, read_state, step_of, written_key)

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointManager:
    def __init__(self, accelerator: Any, run_dir: Path, parts: dict[str, Stateful],
                 keep: int = 3, mirror: str = "",
                 gather: Callable[[Any], list] = lambda item: [item],
                 mirror_wait_s: float = 60.0, resume: bool = True,
                 fence: Callable[[str], None] = lambda what: None) -> None:
        if keep < 1:  # checked here too: the manager is used without a config (tests, tools)
            raise CheckpointError(f"checkpoint.keep must be at least 1 (the newest checkpoint "
                                  f"is always kept), got {keep}")
        self.accelerator = accelerator
        self.dir = Path(run_dir) / CHECKPOINTS_DIR
        self.parts = parts
        self.keep = keep
        self.gather = gather  # every rank's item, in rank order (a collective: all ranks call)
        self.mirror_wait_s = mirror_wait_s
        self.fence = fence  # returns only while this rank belongs to the current group
        self.resume_allowed = resume  # false: a mirror that holds a run is refused, as run.dir is
        # Uploads run on the main process only; restores on each node's local main process.
        self.mirror = Mirror(mirror, keep, fence=fence) if mirror.rstrip("/") else None
        # The step of the checkpoint this process last saved or loaded. Every rank calls save()
        # and load() at the same steps, so this is the same on all ranks, unlike what each one
        # sees on its disk (node-local run.dir + mirror, NFS lookup caching): deciding "already
        # saved" from the file system could send rank 0 past a barrier the others enter.
        self._saved_step: int | None = None

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def location(self) -> str:
        return (f"rank {self.accelerator.process_index} on {socket.gethostname()} "
                f"({self.dir})")

    def prepare(self) -> Path | None:
        """The checkpoint every rank resumes from (None: a fresh start), the same on all ranks.

        Half-written checkpoints are cleaned; where the mirror's newest is the agreed one, each
        node that lacks it restores it before any rank goes on.
        """
        local_main = self.accelerator.is_local_main_process
        if local_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Never a restore from the mirror that another node (shared run.dir) is making.
            with restore_lock(self.dir) if self.mirror else nullcontext():
                for leftover in self.dir.glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else \
                        leftover.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        # Every step that can fail on one rank reports through the gather, so all ranks raise
        # together instead of the others waiting at the next barrier for one that is gone.
        mirrored = self.on_every_rank(lambda: self._mirror_newest() if self.mirror and
                                      self._main else None)[0]
        if mirrored and self._main:
            self.mirror.note_mirrored(mirrored)
        local = find_latest(self.dir)
        views = self.gather((self.location, local.name if local else None))
        chosen = self._agree(views, mirrored)

        def restore() -> None:
            if chosen and local_main:
                with restore_lock(self.dir):  # nodes on a shared run.dir: one at a time
                    if not (self.dir / chosen / STATE_FILE).is_file():
                        self.mirror.restore(chosen, self.dir, self.location)
                    self._discard_newer_than(chosen)

        self.on_every_rank(restore)
        if chosen and self._main and self.mirror and chosen != mirrored:
            # Newer here than on the mirror (its upload was cut off by the stop): put it
            # there now, in the background, instead of at the next save.
            self.mirror.submit(self.dir / chosen)
        # A disk too full for the next checkpoint would train until the save and fail there,
        # restart after restart: stop now, on every rank.
        short = diskspace.shortfall(self.dir, self.dir / chosen if chosen else None)
        failures = [f for f in self.gather(short and f"{self.location}: {short}") if f]
        if failures:
            raise diskspace.CheckpointSpaceError(
                f"not enough space for the next checkpoint: {'; '.join(failures)}. Free space "
                f"there (or move run.dir), then run the same command again")
        return self.dir / chosen if chosen else None

    def on_every_rank(self, step: Callable[[], Any],
                      what: str = "preparing the checkpoint to resume from") -> list:
        """Run `step` here; if it failed on any rank, raise on every rank naming where. Every
        rank calls this (a collective); returns each rank's result, in rank order."""
        try:
            result, error = step(), None
        except Exception as exc:  # noqa: BLE001  (anything: the other ranks must hear of it)
            result, error = None, f"{self.location}: {type(exc).__name__}: {exc}"
        outcomes = self.gather((result, error))
        failed = [e for _, e in outcomes if e]
        if failed:
            raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {failed[0]}")
        return [r for r, _ in outcomes]

    def _mirror_newest(self) -> str | None:
        if not self.resume_allowed and self.mirror.holds_run():
            raise CheckpointError(
                f"checkpoint.mirror={self.mirror.url} already holds checkpoints and "
                f"checkpoint.resume=false: this run would restore them, then prune them with "
                f"its own. Give a new checkpoint.mirror, or delete {self.mirror.url} to start "
                f"this run over")
        return self.mirror.newest()

    def _discard_newer_than(self, chosen: str) -> None:
        """Local checkpoints past the agreed one (written here, never mirrored) would be a fork
        of the run: the resumed run writes those steps again."""
        for path in self.dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if CHECKPOINT_NAME.fullmatch(path.name) and step_of(path.name) > step_of(chosen):
                log.info(f"{path} is newer than {chosen}, which every node can load (from the "
                         f"mirror); removing it")
                shutil.rmtree(path, ignore_errors=True)
        write_atomic(self.dir / LATEST, chosen)

    def _agree(self, views: list, mirrored: str | None) -> str | None:
        """All ranks' (where, newest local checkpoint) and the mirror's newest -> one name."""
        names = {name for _, name in views}
        if len(names) == 1 and (name := names.pop()) is not None:
            if mirrored is None or step_of(name) >= step_of(mirrored):
                return name  # a shared run.dir (or identical disks), at least as new
        if mirrored is not None:
            return mirrored
        if len({name for _, name in views}) == 1:
            return None  # nothing anywhere: a fresh start
        (where_a, a), (where_b, b) = _first_difference(views)
        raise CheckpointError(
            f"nodes see different checkpoints: {where_a} has {a or 'none'}, {where_b} has "
            f"{b or 'none'}. run.dir must be storage every node shares, or give "
            f"checkpoint.mirror=s3://... so that nodes with their own disks restore the "
            f"mirror's newest checkpoint")

    def save(self, step: int, extra: dict | None = None) -> Path:
        """Every rank calls this at the same step (DeepSpeed writes per-rank shards)."""
        final = self.dir / checkpoint_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        if step == self._saved_step:  # already saved at this step (e.g. epoch end == interval)
            return final
        self.fence(f"writing checkpoint {final.name}")
        if self._main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            dswrites.guard(self.accelerator)  # a write failing inside DeepSpeed: no hang
            self.accelerator.save_state(str(tmp))
            if self.accelerator.is_local_main_process:  # each node flushes what its ranks wrote
                fsync_tree(tmp)
            if self._main:
                state = {name: part.state_dict() for name, part in self.parts.items()}
                state.update(extra or {})
                complete = complete_checkpoints(self.dir)  # in write order: the last is newest
                state[WRITTEN_ORDER] = 1 + (written_key(complete[-1])[0] if complete else 0)
                write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
            failed = None
        except Exception as exc:  # noqa: BLE001  (any failure: every rank must hear of it)
            failed = (diskspace.is_no_space(exc), f"{self.location}: {type(exc).__name__}: {exc}")
        failures = [f for f in self.gather(failed) if f]  # every rank stops, or none
        if failures:
            self._fail_save(final.name, tmp, failures)
        self.accelerator.wait_for_everyone()
        if self._main:
            self._publish(tmp, final)
        self._saved_step = step
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_local_main_process and not final.exists():
            # Another node's own disk: rank 0's node holds the checkpoint (and mirrors it);
            # what this node's ranks wrote there (their RNG states) is not needed to resume.
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _fail_save(self, name: str, tmp: Path, failures: list) -> None:
        """Remove the partial checkpoint and raise, on every rank, one error saying why."""
        if self.accelerator.is_local_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = find_latest(self.dir)
        if all(no_space for no_space, _ in failures):
            raise diskspace.CheckpointSpaceError(diskspace.no_space_message(
                name, self.dir, [f for _, f in failures], previous))
        raise CheckpointError(
            f"writing checkpoint {name} to {self.dir} failed on {len(failures)} "
            f"rank(s): {'; '.join(f for _, f in failures)}. The partial checkpoint was "
            f"removed; {previous.name if previous else 'no earlier checkpoint'} is the "
            f"newest")

    def _publish(self, tmp: Path, final: Path) -> None:
        """Make the written checkpoint visible, `latest`, mirrored and pruned (main process)."""
        self.fence(f"publishing checkpoint {final.name} and {LATEST}")
        if final.exists():  # a stale one (an earlier run in this run.dir): replace it
            shutil.rmtree(final)
        fsync(tmp)  # the entry of trainer_state.json (its content is already flushed)
        os.replace(tmp, final)
        write_atomic(self.dir / LATEST, final.name)
        fsync(self.dir)  # the rename and the new `latest` themselves
        if self.mirror:  # in the background; a mirror outage never stops training
            self.mirror.submit(final)
        self._prune()

    def load(self, checkpoint: Path) -> dict:
        """Every rank loads the tensors; the JSON parts are restored from the same file."""
        self.accelerator.load_state(str(checkpoint))
        # Checkpoints are saved between optimizer steps, but load_state restores Accelerate's
        # micro-step counter, whose remainder modulo the accumulation decides sync_gradients.
        # After an elastic restart with another accumulation (same global batch, other world
        # size) that remainder is off the boundary: optimizer steps would straddle our steps.
        self.accelerator.step = 0
        state = read_state(checkpoint)
        if CHECKPOINT_NAME.fullmatch(checkpoint.name):
            self._saved_step = step_of(checkpoint.name)
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
        return state

    def close(self) -> bool:
        """Wait (at most mirror_wait_s) for the last upload; False, said in a warning, when
        the mirror does not hold the newest checkpoint. Never raises: training is done."""
        return self.mirror.close(self.mirror_wait_s) if self.mirror else True

    def mirror_metrics(self) -> dict:
        """{"mirror_lag_steps": ...} on the main process of a mirrored run, else {}."""
        return {"mirror_lag_steps": self.mirror.lag_steps} if self.mirror and self._main \
            else {}

    def _prune(self) -> None:
        """Keep the last `keep` written (the one just written is the last of them), and every
        checkpoint that is being or will be uploaded to the mirror."""
        busy = self.mirror.busy() if self.mirror else set()
        for old in complete_checkpoints(self.dir)[: -self.keep]:
            if old not in busy:
                shutil.rmtree(old, ignore_errors=True)


def _first_difference(views: list) -> tuple:
    """Two ranks' views whose checkpoint names differ (the first rank and the first other)."""
    first = views[0]
    return first, next(v for v in views if v[1] != first[1])
