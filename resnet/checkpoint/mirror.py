"""The S3 (or any storage URL) mirror of a run's checkpoints, both ways: uploads that never
stop training, and the restore of the mirror's newest checkpoint onto a node's disk.

Uploads. Rank 0 hands each complete checkpoint to one background thread. A failed upload is
retried with exponential backoff and jitter for as long as the run goes on; a checkpoint handed
over meanwhile replaces the one waiting (the backlog is one checkpoint: a restart needs only the
newest), so an outage of any length costs memory and disk for at most two checkpoints: the
one in flight and the one waiting, which pruning leaves alone. Failures are logged at most
once per 30 s; `lag_steps` says how far the mirror is behind. After each upload the mirror
is pruned to the same keep-K as the local folder, in the order the checkpoints were written.
A checkpoint is complete on the mirror once its marker (`MARKER`: every file's name and size,
and the order it was written in) is there; the marker goes up after every file and before
`latest`, so a killed upload is never `latest`, never restored, and pruned before any complete
checkpoint. Checkpoints the previous release mirrored carry no marker; one counts as complete
(`legacy`) when it holds trainer_state.json (that release's rule) and was written before every
marked checkpoint. An upload of this version can never look like one: it removes the marker,
then trainer_state.json, and puts trainer_state.json back only after every other file.
At the end of the run `close` waits, at most `wait_s`, for the last upload, and says so if it
could not finish: training itself never fails because of the mirror.

Restores. `newest` takes the mirror's keys as untrusted (storage.checked_key, `checked_name`):
`latest` if its upload finished, else the newest complete checkpoint. `restore` downloads into
a folder of its own, checks it against the marker (every file, its size) and renames it; nodes
sharing run.dir restore one at a time (`restore_lock`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.files import TMP_PREFIX, fsync_tree, unique_suffix, write_atomic
from resnet.data import storage
from resnet.logs import RateLimitedLogger
from resnet.runfolder import (CHECKPOINT_NAME, LATEST, STATE_FILE, WRITTEN_ORDER, step_of,
                              written_key)

MARKER = "mirror-complete.json"  # {"files": {relative name: bytes}, "written": N}
# Held (fcntl.lockf: POSIX locks, which NFS and EFS carry to every client) by the one process
# restoring into this folder: nodes that share run.dir must not download into each other.
RESTORE_LOCK = ".restore-lock"

logger = logging.getLogger(__name__)  # (self.log: the uploads' rate-limited warnings)


def read_marker(url: str, name: str) -> dict | None:
    """The completion marker of checkpoint `name` on the mirror `url` (None: a partial upload,
    or one written before markers existed)."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(url, name, MARKER)))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise storage.StorageError(f"{url}/{name}/{MARKER} is not valid JSON: {exc}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise storage.StorageError(f"{url}/{name}/{MARKER} lists no files")
    return marker


def legacy_order(url: str, name: str) -> int | None:
    """The write order of an unmarked checkpoint `name` if it holds trainer_state.json, the
    previous release's evidence of a complete upload (None: it does not)."""
    state_url = storage.join(url, name, STATE_FILE)
    try:
        state = json.loads(storage.read_bytes(state_url))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise storage.StorageError(f"{state_url} is not valid JSON: {exc}") from None
    order = state.get(WRITTEN_ORDER, 0) if isinstance(state, dict) else None
    if not isinstance(order, int):
        raise storage.StorageError(f"{state_url}: {WRITTEN_ORDER!r} is not a whole number: {order!r}")
    return order


def complete_on_mirror(url: str, markers: dict | None = None) -> list[str]:
    """The complete checkpoints on the mirror, in the order they were written: the marked
    ones, and the legacy ones (unmarked, with trainer_state.json, written before every marked
    one: uploaded by the previous release, before this version marked anything). `markers`
    (name -> marker) caches what was read before."""
    markers = {} if markers is None else markers
    orders, unmarked = {}, []
    for name in storage.listdir(url) if storage.exists(url) else []:
        if CHECKPOINT_NAME.fullmatch(name):
            marker = markers.get(name) or read_marker(url, name)
            if marker is None:
                unmarked.append(name)
                continue
            markers[name] = marker
            orders[name] = int(marker.get("written", 0))
    first_marked = min(orders.values(), default=None)
    for name in unmarked:
        order = legacy_order(url, name)
        if order is not None and (first_marked is None or order < first_marked):
            orders[name] = order
    return sorted(orders, key=lambda n: (orders[n], step_of(n)))


def checked_name(name: str, where: str) -> str:
    """A checkpoint name read from outside (a mirror's `latest`): never a path of its own."""
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{where} names {name[:80]!r}, not a checkpoint "
                              f"(step-NNNNNNNNN); refusing to use it")
    return name


@contextmanager
def restore_lock(directory: Path):
    """Held while restoring into `directory`, or while clearing its leftovers (one may be a
    restore another node is making)."""
    with open(directory / RESTORE_LOCK, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)  # waits for a restore another node is making
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


class Mirror:
    def __init__(self, url: str, keep: int, *, retry_base_s: float = 1.0,
                 retry_max_s: float = 60.0, log: RateLimitedLogger | None = None,
                 fence: Callable[[str], None] = lambda what: None) -> None:
        self.url = url.rstrip("/")
        self.keep = keep
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        self.log = log or RateLimitedLogger(0)
        self.fence = fence  # returns only while this rank belongs to the current group
        self._cv = threading.Condition()
        self._waiting: Path | None = None  # the newest checkpoint not yet taken up
        self._uploading: Path | None = None
        self._saved_step: int | None = None  # the newest checkpoint handed over
        self._mirrored_step: int | None = None  # the newest the mirror is known to hold
        self._last_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._markers: dict[str, dict] = {}  # mirrored name -> its completion marker

    # -- the training thread ----------------------------------------------------------------
    def note_mirrored(self, name: str) -> None:
        """The mirror already holds `name` (its `latest` at start)."""

        with self._cv:
            self._mirrored_step = step_of(name)

    def submit(self, checkpoint: Path) -> None:
        """Upload `checkpoint` in the background, replacing any older one still waiting."""

        with self._cv:
            self._waiting = checkpoint
            self._saved_step = step_of(checkpoint.name)
            self._cv.notify_all()  # also cuts a retry's backoff short: try the newest now
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="checkpoint-mirror",
                                                daemon=True)
                self._thread.start()

    def busy(self) -> set[Path]:
        """The checkpoints that are being or will be uploaded: pruning must leave them."""
        with self._cv:
            return {p for p in (self._waiting, self._uploading) if p is not None}

    @property
    def lag_steps(self) -> int:
        """Steps between the newest checkpoint handed over and the newest mirrored (0: none)."""
        with self._cv:
            if self._saved_step is None:
                return 0
            return max(0, self._saved_step - (self._mirrored_step or 0))

    def close(self, wait_s: float) -> bool:
        """Wait at most `wait_s` for the uploads; True when the mirror holds the newest."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            self._cv.notify_all()  # a thread in backoff tries once more right away
            while self._waiting is not None or self._uploading is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(timeout=left)
            pending = self._waiting or self._uploading
            error = self._last_error
        if pending is None:
            return True
        self.log.warning(
            f"the mirror {self.url} does not hold the newest checkpoint {pending.name}: its "
            f"upload did not finish within checkpoint.mirror_wait_s={wait_s:g} s (last error: "
            f"{error or 'none, still uploading'}). It is complete on this disk ({pending}); "
            f"copy it to {self.url}/{pending.name} and write its name to {self.url}/latest "
            f"before another node resumes from the mirror", key="mirror-close")
        return False

    # -- restores (the local main process of each node) --------------------------------------
    def holds_run(self) -> bool:
        """Whether the mirror holds checkpoints (or a `latest`) of a run."""
        return storage.exists(self.url) and any(
            n == LATEST or CHECKPOINT_NAME.fullmatch(n) for n in storage.listdir(self.url))

    def newest(self) -> str | None:
        """The mirror's newest complete checkpoint: `latest`, if its upload finished."""
        pointer = storage.join(self.url, LATEST)
        if not storage.exists(pointer):
            return None
        name = checked_name(storage.read_bytes(pointer).decode().strip(), pointer)
        if read_marker(self.url, name) is not None:
            return name
        complete = complete_on_mirror(self.url)
        if name in complete:  # a legacy checkpoint: restore() says so
            return name
        if not complete:
            raise CheckpointError(f"{pointer} names {name}, whose upload never finished (no "
                                  f"{self.url}/{name}/{MARKER}), and no checkpoint on the "
                                  f"mirror is complete")
        logger.info(f"{pointer} names {name}, whose upload never finished; using the "
                    f"newest complete one, {complete[-1]}")
        return complete[-1]

    def restore(self, name: str, directory: Path, location: str) -> None:
        """Download the mirror's copy of `name` into `directory` (a node's checkpoints folder):
        into a folder of this process's own, checked against the mirror's marker (every file,
        its size; a legacy checkpoint, complete_on_mirror: its trainer_state.json), renamed,
        and made `latest`. The caller holds `restore_lock(directory)`."""
        marker = read_marker(self.url, name)
        if marker is None and name not in complete_on_mirror(self.url):
            raise CheckpointError(f"mirrored checkpoint {self.url}/{name} is incomplete "
                                  f"(no {MARKER}): its upload never finished")
        if marker is None:
            logger.warning(f"{self.url}/{name} has no {MARKER}: restoring it as a checkpoint "
                           f"the previous release mirrored (it holds {STATE_FILE} and was "
                           f"written before every marked one); its file sizes cannot be "
                           f"checked")
            marker = {"files": {}}
        tmp = directory / f"{TMP_PREFIX}{name}.{unique_suffix()}"
        try:
            storage.download_dir(storage.join(self.url, name), str(tmp))
            wrong = [f"{rel} ({'missing' if not (tmp / rel).is_file() else 'size differs'})"
                     for rel, size in marker["files"].items()
                     if not (tmp / rel).is_file() or (tmp / rel).stat().st_size != size]
            if wrong or not (tmp / STATE_FILE).is_file():
                raise CheckpointError(
                    f"restoring {self.url}/{name}: {len(wrong)} of the "
                    f"{len(marker['files'])} files its {MARKER} lists did not arrive whole, "
                    f"e.g. {', '.join(wrong[:3]) or STATE_FILE}")
            (tmp / MARKER).unlink(missing_ok=True)  # the mirror's; an upload writes its own
            fsync_tree(tmp)
            shutil.rmtree(directory / name, ignore_errors=True)  # an incomplete local copy
            os.replace(tmp, directory / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_atomic(directory / LATEST, name)
        logger.info(f"{location}: restored {name} from {self.url}")

    # -- the upload thread ------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.retry_base_s
        while True:
            with self._cv:
                while self._waiting is None:
                    self._cv.wait()
                checkpoint, self._waiting = self._waiting, None
                self._uploading = checkpoint
            done = self._upload(checkpoint)
            with self._cv:
                self._uploading = None
                if done:
                    delay = self.retry_base_s
                elif self._waiting is None:  # retry it, unless a newer one is waiting
                    self._waiting = checkpoint
                self._cv.notify_all()
                if not done:  # back off; a new checkpoint or close() wakes it early
                    self._cv.wait(timeout=delay * (0.5 + random.random()))
                    delay = min(2 * delay, self.retry_max_s)

    def _upload(self, checkpoint: Path) -> bool:
        self.fence(f"uploading {checkpoint.name} to {self.url}")
        remote = storage.join(self.url, checkpoint.name)
        try:
            storage.remove(storage.join(remote, MARKER))  # re-uploaded: partial until done
            # Until every file is up, no trainer_state.json either: with it and no marker, a
            # partial upload would look like a complete one of the previous release.
            storage.remove(storage.join(remote, STATE_FILE))
            files = storage.upload_dir(str(checkpoint), remote, last=STATE_FILE)
            marker = {"files": files, "written": written_key(checkpoint)[0]}
            storage.write_bytes(storage.join(remote, MARKER), json.dumps(marker).encode())
            storage.write_bytes(storage.join(self.url, LATEST), checkpoint.name.encode())
        except Exception as exc:  # noqa: BLE001  (any failure: retried, training goes on)
            with self._cv:
                self._last_error = exc
            self.log.warning(f"mirroring {checkpoint.name} to {self.url} failed: {exc}; "
                             f"training goes on, the upload is retried in the background "
                             f"(mirror_lag_steps {self.lag_steps})", key="mirror")
            return False
        with self._cv:
            self._mirrored_step = step_of(checkpoint.name)
            self._last_error = None
        self._markers.pop(checkpoint.name, None)  # written again (after a rollback): re-read
        try:
            self._prune(checkpoint.name)
        except Exception as exc:  # noqa: BLE001  (an old checkpoint stays; the next try prunes)
            self.log.warning(f"pruning the mirror {self.url} failed: {exc}", key="mirror-prune")
        return True

    def _prune(self, newest: str) -> None:
        """Keep the `keep` complete checkpoints last written on the mirror (`newest` is among
        them); partial uploads (no marker: killed, or cut by an outage) go first."""
        complete = complete_on_mirror(self.url, self._markers)
        ordered = sorted(complete, key=lambda n: n == newest)  # stable: newest last
        partial = [n for n in storage.listdir(self.url)
                   if CHECKPOINT_NAME.fullmatch(n) and n not in complete and n != newest]
        for name in partial + ordered[:-self.keep]:
            storage.remove(storage.join(self.url, name))
            self._markers.pop(name, None)
