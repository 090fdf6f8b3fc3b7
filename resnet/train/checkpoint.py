"""One checkpoint manager over the accelerator's tensors and a dict of JSON-stateful parts.

Layout of ``run.dir/checkpoints/``::

    step-000001200/        complete checkpoints (a rename makes them visible)
        pytorch_model/ ... accelerator.save_state: model, optimizer (DeepSpeed: per-rank)
            zero/, universal.json  ZeRO-1/2 resumed on another world size: DeepSpeed's
                               universal checkpoint, added once (resnet/train/universal.py)
        trainer_state.json the parts' state_dicts (loader, progress, ...), written before rename
    .tmp-step-000001300/   a checkpoint being written; ignored and removed at the next start
    latest                 the name of the newest complete checkpoint, replaced atomically, last

A crash at any point leaves the previous checkpoint intact and `latest` pointing at it.
With ``checkpoint.mirror=s3://...`` each complete checkpoint is uploaded in the background
(its ``latest`` last; mirror.py retries through an outage, which never stops training), and the mirror is the truth across nodes: at start every node
restores the mirror's newest checkpoint unless all nodes already hold the same newest one
(a shared run.dir), so nodes with their own disks (empty, behind or ahead) all resume from
the same step. Without a mirror, run.dir must be shared, and nodes that see different
newest checkpoints are an error naming both, never a silent restart from step 0.
A restore takes the mirror's keys as untrusted (storage.checked_key), downloads into a folder
of its own, checks it against the mirror's completion marker (mirror.py) and renames it; nodes
sharing run.dir restore one at a time (RESTORE_LOCK).
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Protocol

from resnet.runfolder import (CHECKPOINT_NAME, CHECKPOINT_PREFIX, LATEST, STATE_FILE,
                              WRITTEN_ORDER, checkpoint_name, complete_checkpoints, find_latest,
                              read_state, step_of, written_key)
from resnet.train import diskspace, dswrites

TMP_PREFIX = ".tmp-"
# Held (fcntl.lockf: POSIX locks, which NFS and EFS carry to every client) by the one process
# restoring into this folder: nodes that share run.dir must not download into each other.
RESTORE_LOCK = ".restore-lock"


class CheckpointError(RuntimeError):
    """No checkpoint every rank can resume from: nodes see different ones (training from
    either would fork the run), or preparing one failed on some rank."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def unique_suffix() -> str:
    """Host, pid and a random part: containers on one shared run.dir often share pids."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{unique_suffix()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: that persists its entries (renames)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk: the rename that makes a checkpoint
    visible must not reach the disk before its contents do (a power loss would leave a
    "complete" checkpoint of truncated tensors)."""
    for path in sorted(folder.rglob("*")) + [folder]:
        _fsync(path)


def checked_name(name: str, where: str) -> str:
    """A checkpoint name read from outside (a mirror's `latest`): never a path of its own."""
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{where} names {name[:80]!r}, not a checkpoint "
                                 f"(step-NNNNNNNNN); refusing to use it")
    return name


@contextmanager
def _restore_lock(directory: Path):
    with open(directory / RESTORE_LOCK, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)  # waits for a restore another node is making
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


class CheckpointManager:
    def __init__(self, accelerator: Any, run_dir: Path, parts: dict[str, Stateful],
                 keep: int = 3, mirror: str = "",
                 gather: Callable[[Any], list] = lambda item: [item],
                 mirror_wait_s: float = 60.0, resume: bool = True,
                 fence: Callable[[str], None] = lambda what: None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be at least 1, got {keep}")
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.parts = parts
        self.keep = keep
        self.mirror = mirror.rstrip("/")
        self.gather = gather  # every rank's item, in rank order (a collective: all ranks call)
        self.mirror_wait_s = mirror_wait_s
        self.fence = fence  # returns only while this rank belongs to the current group
        self.resume = resume  # false: a mirror that holds a run is refused, as run.dir is
        self._uploads = None
        if self.mirror:
            from resnet.train.mirror import Mirror

            self._uploads = Mirror(self.mirror, keep, fence=fence)  # the main process only
        # The step of the checkpoint this process last saved or loaded. Every rank calls save()
        # and load() at the same steps, so this is the same on all ranks, unlike what each one
        # sees on its disk (node-local run.dir + mirror, NFS lookup caching): deciding "already
        # saved" from the file system could send rank 0 past a barrier the others enter.
        self._saved_step: int | None = None

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self) -> Path | None:
        """The checkpoint every rank resumes from (None: a fresh start), the same on all ranks.

        Half-written checkpoints are cleaned; where the mirror's newest is the agreed one, each
        node that lacks it restores it before any rank goes on.
        """
        local_main = self.accelerator.is_local_main_process
        if local_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Never a restore from the mirror that another node (shared run.dir) is making.
            with _restore_lock(self.dir) if self.mirror else nullcontext():
                for leftover in self.dir.glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else \
                        leftover.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        # Every step that can fail on one rank reports through the gather, so all ranks raise
        # together instead of the others waiting at the next barrier for one that is gone.
        mirrored = self._on_every_rank(lambda: self._mirror_latest() if self.mirror and
                                       self._main else None)[0]
        if mirrored and self._main:
            self._uploads.note_mirrored(mirrored)
        local = find_latest(self.dir)
        views = self.gather((self.location, local.name if local else None))
        chosen = self._agree(views, mirrored)

        def restore() -> None:
            if chosen and local_main:
                with _restore_lock(self.dir):  # nodes on a shared run.dir: one at a time
                    if not (self.dir / chosen / STATE_FILE).is_file():
                        self._restore(chosen)
                    self._discard_newer_than(chosen)

        self._on_every_rank(restore)
        if chosen and self._main and self._uploads and chosen != mirrored:
            # Newer here than on the mirror (its upload was cut off by the stop): put it
            # there now, in the background, instead of at the next save.
            self._uploads.submit(self.dir / chosen)
        # A disk too full for the next checkpoint would train until the save and fail there,
        # restart after restart: stop now, on every rank.
        short = diskspace.shortfall(self.dir, self.dir / chosen if chosen else None)
        failures = [f for f in self.gather(short and f"{self.location}: {short}") if f]
        if failures:
            raise diskspace.CheckpointSpaceError(
                f"not enough space for the next checkpoint: {'; '.join(failures)}. Free space "
                f"there (or move run.dir), then run the same command again")
        return self.dir / chosen if chosen else None

    def _on_every_rank(self, step: Callable[[], Any]) -> list:
        """Run `step` here; if it failed on any rank, raise on every rank naming where."""
        try:
            result, error = step(), None
        except Exception as exc:  # noqa: BLE001  (anything: the other ranks must hear of it)
            result, error = None, f"{self.location}: {type(exc).__name__}: {exc}"
        outcomes = self.gather((result, error))
        failed = [e for _, e in outcomes if e]
        if failed:
            raise CheckpointError(f"preparing the checkpoint to resume from failed on "
                                  f"{len(failed)} rank(s): {failed[0]}")
        return [r for r, _ in outcomes]

    def _discard_newer_than(self, chosen: str) -> None:
        """Local checkpoints past the agreed one (written here, never mirrored) would be a fork
        of the run: the resumed run writes those steps again."""
        for path in self.dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if CHECKPOINT_NAME.fullmatch(path.name) and step_of(path.name) > step_of(chosen):
                print(f"[checkpoint] {path} is newer than {chosen}, which every node can load "
                      f"(from the mirror); removing it", flush=True)
                shutil.rmtree(path, ignore_errors=True)
        _write_atomic(self.dir / LATEST, chosen)

    @property
    def location(self) -> str:
        return (f"rank {self.accelerator.process_index} on {socket.gethostname()} "
                f"({self.dir})")

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
                _fsync_tree(tmp)
            if self._main:
                state = {name: part.state_dict() for name, part in self.parts.items()}
                state.update(extra or {})
                complete = complete_checkpoints(self.dir)  # in write order: the last is newest
                state[WRITTEN_ORDER] = 1 + (written_key(complete[-1])[0] if complete else 0)
                _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
            failed = None
        except Exception as exc:  # noqa: BLE001  (any failure: every rank must hear of it)
            failed = (diskspace.is_no_space(exc), f"{self.location}: {type(exc).__name__}: {exc}")
        failures = [f for f in self.gather(failed) if f]  # every rank stops, or none
        if failures:
            if self.accelerator.is_local_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = find_latest(self.dir)
            if all(no_space for no_space, _ in failures):
                raise diskspace.CheckpointSpaceError(diskspace.no_space_message(
                    final.name, self.dir, [f for _, f in failures], previous))
            raise CheckpointError(
                f"writing checkpoint {final.name} to {self.dir} failed on {len(failures)} "
                f"rank(s): {'; '.join(f for _, f in failures)}. The partial checkpoint was "
                f"removed; {previous.name if previous else 'no earlier checkpoint'} is the "
                f"newest")
        self.accelerator.wait_for_everyone()
        if self._main:
            self.fence(f"publishing checkpoint {final.name} and {LATEST}")
            if final.exists():  # a stale one (an earlier run in this run.dir): replace it
                shutil.rmtree(final)
            _fsync(tmp)  # the entry of trainer_state.json (its content is already flushed)
            os.replace(tmp, final)
            _write_atomic(self.dir / LATEST, final.name)
            _fsync(self.dir)  # the rename and the new `latest` themselves
            if self.mirror:  # in the background; a mirror outage never stops training
                self._uploads.submit(final)
            self._prune()
        self._saved_step = step
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_local_main_process and not final.exists():
            # Another node's own disk: rank 0's node holds the checkpoint (and mirrors it);
            # what this node's ranks wrote there (their RNG states) is not needed to resume.
            shutil.rmtree(tmp, ignore_errors=True)
        return final

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
        return self._uploads.close(self.mirror_wait_s) if self._uploads else True

    def mirror_metrics(self) -> dict:
        """{"mirror_lag_steps": ...} on the main process of a mirrored run, else {}."""
        return {"mirror_lag_steps": self._uploads.lag_steps} if self._uploads and self._main \
            else {}

    def _prune(self) -> None:
        """Keep the last `keep` written (the one just written is the last of them), and every
        checkpoint that is being or will be uploaded to the mirror."""
        busy = self._uploads.busy() if self._uploads else set()
        for old in complete_checkpoints(self.dir)[: -self.keep]:
            if old not in busy:
                shutil.rmtree(old, ignore_errors=True)

    def _mirror_latest(self) -> str | None:
        """The mirror's newest complete checkpoint: `latest`, if its upload finished."""
        from resnet.data import storage
        from resnet.train.mirror import complete_on_mirror, read_marker

        pointer = storage.join(self.mirror, LATEST)
        held = storage.exists(self.mirror) and any(
            n == LATEST or CHECKPOINT_NAME.fullmatch(n) for n in storage.listdir(self.mirror))
        if held and not self.resume:
            raise CheckpointError(
                f"checkpoint.mirror={self.mirror} already holds checkpoints and "
                f"checkpoint.resume=false: this run would restore them, then prune them with "
                f"its own. Give a new checkpoint.mirror, or delete {self.mirror} to start this "
                f"run over")
        if not storage.exists(pointer):
            return None
        name = checked_name(storage.read_bytes(pointer).decode().strip(), pointer)
        if read_marker(self.mirror, name) is not None:
            return name
        complete = complete_on_mirror(self.mirror)
        if name in complete:  # a legacy checkpoint: _restore says so
            return name
        if not complete:
            raise CheckpointError(f"{pointer} names {name}, whose upload never finished (no "
                                  f"{self.mirror}/{name}/mirror-complete.json), and no "
                                  f"checkpoint on the mirror is complete")
        print(f"[checkpoint] {pointer} names {name}, whose upload never finished; using the "
              f"newest complete one, {complete[-1]}", flush=True)
        return complete[-1]

    def _restore(self, name: str) -> None:
        """Download the mirror's copy of `name` onto this node's disk: into a folder of this
        process's own, checked against the mirror's marker (every file, its size; a legacy
        checkpoint, mirror.complete_on_mirror: its trainer_state.json), renamed."""
        from resnet.data import storage
        from resnet.train.mirror import MARKER, complete_on_mirror, read_marker

        marker = read_marker(self.mirror, name)
        if marker is None and name not in complete_on_mirror(self.mirror):
            raise CheckpointError(f"mirrored checkpoint {self.mirror}/{name} is incomplete "
                                  f"(no {MARKER}): its upload never finished")
        if marker is None:
            print(f"[checkpoint] warning: {self.mirror}/{name} has no {MARKER}: restoring it "
                  f"as a checkpoint the previous release mirrored (it holds {STATE_FILE} and "
                  f"was written before every marked one); its file sizes cannot be checked",
                  flush=True)
            marker = {"files": {}}
        tmp = self.dir / f"{TMP_PREFIX}{name}.{unique_suffix()}"
        try:
            storage.download_dir(storage.join(self.mirror, name), str(tmp))
            wrong = [f"{rel} ({'missing' if not (tmp / rel).is_file() else 'size differs'})"
                     for rel, size in marker["files"].items()
                     if not (tmp / rel).is_file() or (tmp / rel).stat().st_size != size]
            if wrong or not (tmp / STATE_FILE).is_file():
                raise CheckpointError(
                    f"restoring {self.mirror}/{name}: {len(wrong)} of the "
                    f"{len(marker['files'])} files its {MARKER} lists did not arrive whole, "
                    f"e.g. {', '.join(wrong[:3]) or STATE_FILE}")
            (tmp / MARKER).unlink(missing_ok=True)  # the mirror's; an upload writes its own
            _fsync_tree(tmp)
            shutil.rmtree(self.dir / name, ignore_errors=True)  # an incomplete local copy
            os.replace(tmp, self.dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _write_atomic(self.dir / LATEST, name)
        print(f"[checkpoint] {self.location}: restored {name} from {self.mirror}", flush=True)


def _first_difference(views: list) -> tuple:
    """Two ranks' views whose checkpoint names differ (the first rank and the first other)."""
    first = views[0]
    return first, next(v for v in views if v[1] != first[1])
