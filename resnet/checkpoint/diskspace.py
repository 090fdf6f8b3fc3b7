"""A full disk during a checkpoint: what was needed, where, and what is left intact.

The checkpoint manager turns ENOSPC (or a quota, EDQUOT) on any rank into one error on every
rank, after removing the partial checkpoint, and refuses to start where the next checkpoint
cannot fit, so a full disk never becomes a crash loop of training and failing at the save.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
GIB = 2**30


class CheckpointSpaceError(RuntimeError):
    """No room for a checkpoint; the previous one is intact. The message says what to do."""


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def shortfall(folder: Path, previous: Path | None) -> str | None:
    """Why the next checkpoint cannot fit in `folder` (None: it fits, or nothing to go by).
    The next checkpoint is taken to be as large as `previous`."""
    if previous is None:
        return None
    needed, free = tree_size(previous), free_bytes(folder)
    if free >= needed:
        return None
    return (f"{folder} has {free / GIB:.2f} GiB free, and a checkpoint needs about "
            f"{needed / GIB:.2f} GiB (the size of {previous.name})")


def no_space_message(name: str, folder: Path, failures: list[str],
                     previous: Path | None) -> str:
    needed = f"about {tree_size(previous) / GIB:.2f} GiB (the size of {previous.name})" \
        if previous is not None else "an unknown amount (no earlier checkpoint to go by)"
    kept = (f"{previous.name} is intact and `latest` points to it" if previous is not None
            else "there is no earlier checkpoint")
    return (f"no space left writing checkpoint {name} to {folder} ({'; '.join(failures)}): it "
            f"needs {needed}, and {free_bytes(folder) / GIB:.2f} GiB are free there. The "
            f"partial checkpoint was removed; {kept}. Free space there (or move run.dir), "
            f"then run the same command again")
