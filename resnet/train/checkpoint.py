"""One checkpoint manager over the accelerator's tensors and a dict of JSON-stateful parts.

Layout of ``run.dir/checkpoints/``::

    step-000001200/        complete checkpoints (a rename makes them visible)
        pytorch_model/ ... accelerator.save_state: model, optimizer (DeepSpeed: per-rank)
        trainer_state.json the parts' state_dicts (loader, progress, ...), written before rename
    .tmp-step-000001300/   a checkpoint being written; ignored and removed at the next start
    latest                 the name of the newest complete checkpoint, replaced atomically, last

A crash at any point leaves the previous checkpoint intact and `latest` pointing at it.
With ``checkpoint.mirror=s3://...`` each complete checkpoint is uploaded in the background
(its ``latest`` last), and a node whose disk has none restores from the mirror.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "trainer_state.json"
LATEST = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
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


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def find_latest(directory: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if valid, else the highest complete step."""
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


class CheckpointManager:
    def __init__(self, accelerator: Any, run_dir: Path, parts: dict[str, Stateful],
                 keep: int = 3, mirror: str = "") -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be at least 1, got {keep}")
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.parts = parts
        self.keep = keep
        self.mirror = mirror.rstrip("/")
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        # The step of the checkpoint this process last saved or loaded. Every rank calls save()
        # and load() at the same steps, so this is the same on all ranks, unlike what each one
        # sees on its disk (node-local run.dir + mirror, NFS lookup caching): deciding "already
        # saved" from the file system could send rank 0 past a barrier the others enter.
        self._saved_step: int | None = None

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self) -> Path | None:
        """Clean half-written checkpoints, pull from the mirror if needed; the newest complete."""
        if self.accelerator.is_local_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            if self.mirror and find_latest(self.dir) is None:
                self._download_from_mirror()
        self.accelerator.wait_for_everyone()
        return find_latest(self.dir)

    def save(self, step: int, extra: dict | None = None) -> Path:
        """Every rank calls this at the same step (DeepSpeed writes per-rank shards)."""
        final = self.dir / checkpoint_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        if step == self._saved_step:  # already saved at this step (e.g. epoch end == interval)
            return final
        if self._main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_local_main_process:  # each node flushes what its ranks wrote
            _fsync_tree(tmp)
        self.accelerator.wait_for_everyone()
        if self._main:
            state = {name: part.state_dict() for name, part in self.parts.items()}
            state.update(extra or {})
            _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
            if final.exists():  # a stale one (an earlier run in this run.dir): replace it
                shutil.rmtree(final)
            _fsync(tmp)  # the entry of trainer_state.json (its content is already flushed)
            os.replace(tmp, final)
            _write_atomic(self.dir / LATEST, final.name)
            _fsync(self.dir)  # the rename and the new `latest` themselves
            if self.mirror:  # waits for the previous upload first: pruning may delete its folder
                self._start_upload(final)
            self._prune()
        self._saved_step = step
        self.accelerator.wait_for_everyone()
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
        if checkpoint.name.startswith(PREFIX) and checkpoint.name[len(PREFIX):].isdigit():
            self._saved_step = int(checkpoint.name[len(PREFIX):])
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
        return state

    def close(self) -> None:
        """Wait for a background upload; its failure is reported, not swallowed."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise RuntimeError(f"mirroring a checkpoint to {self.mirror} failed: {error}")

    def _prune(self) -> None:
        complete = sorted(p for p in self.dir.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _start_upload(self, checkpoint: Path) -> None:
        self.close()  # one upload in flight: the next waits for the previous
        self._upload = threading.Thread(target=self._upload_one, args=(checkpoint,), daemon=True)
        self._upload.start()

    def _upload_one(self, checkpoint: Path) -> None:
        from resnet.data import storage

        try:
            storage.upload_dir(str(checkpoint), storage.join(self.mirror, checkpoint.name))
            storage.write_bytes(storage.join(self.mirror, LATEST), checkpoint.name.encode())
        except BaseException as exc:  # reported by close() on the training thread
            self._upload_error = exc

    def _download_from_mirror(self) -> None:
        from resnet.data import storage

        pointer = storage.join(self.mirror, LATEST)
        if not storage.exists(pointer):
            return
        name = storage.read_bytes(pointer).decode().strip()
        tmp = self.dir / f"{TMP_PREFIX}{name}"
        storage.download_dir(storage.join(self.mirror, name), str(tmp))
        if not (tmp / STATE_FILE).is_file():
            raise RuntimeError(f"mirrored checkpoint {self.mirror}/{name} has no {STATE_FILE}")
        os.replace(tmp, self.dir / name)
        _write_atomic(self.dir / LATEST, name)
