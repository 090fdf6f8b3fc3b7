"""Writing files so that a crash leaves the old version or the new one, never a mix.

A checkpoint counts once a rename makes it visible; before that rename its contents must be on
the disk (`fsync_tree`), or a power loss leaves a "complete" checkpoint of truncated tensors.
Temporary names start with `TMP_PREFIX` (the manager removes leftovers at the next start) and
carry `unique_suffix()`, so nodes writing into one shared run.dir never collide.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

TMP_PREFIX = ".tmp-"


def unique_suffix() -> str:
    """Host, pid and a random part: containers on one shared run.dir often share pids."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new, flushed."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{unique_suffix()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: that persists its entries (renames)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk: the rename that makes a checkpoint
    visible must not reach the disk before its contents do."""
    for path in sorted(folder.rglob("*")) + [folder]:
        fsync(path)
