"""Reading the samples a worker needs from one WebDataset tar shard, and nothing else.

The reader walks the tar's 512-byte headers itself (no tarfile stream state to corrupt), so it
always knows the byte offset of the member it is reading:
- reading starts at byte 0, or at a sample whose offset the manifest gives (format.py);
- members of samples that are not needed are skipped without being read (local files: seek;
  remote: read-and-drop for small gaps, a new Range request for large ones), and reading
  stops after the last needed sample, so resuming never fetches consumed parts of a shard;
- on a transient failure (the stream ended early, a local read error) the shard is reopened
  at the current member's header and parsing continues there, under the one retry policy
  (`storage.Backoff`: backoff with jitter, data.io_timeout_s from the first failure). Remote
  streams retry their own transient errors under the same policy; once they give up
  (StorageError) the shard fails at once, naming its URL and the last cause: no retries stacked.
Samples are the runs of consecutive members sharing a key (WebDataset's convention); the i-th
run is sample i, the index the plan uses.
"""
from __future__ import annotations

import logging
import os
import tarfile
from typing import Callable, Iterator

from resnet.data import storage
from resnet.data.format import split_name
from resnet.data.storage import Backoff, StorageError

log = logging.getLogger(__name__)

BLOCK = 512
REOPEN_GAP = 1 << 20  # remote gaps larger than this are skipped with a new Range request
MAX_NAME_HEADER = 1 << 20  # pax / GNU long-name headers larger than this are corrupt


class ShardError(RuntimeError):
    """A shard cannot be read (missing, or still failing after the retries); names its URL."""


class _Interrupted(Exception):
    """The stream ended or failed in the middle; reopen at the current member."""


class _Corrupt(Exception):
    """The bytes themselves are wrong (a crafted or damaged header): reopening cannot help."""


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any. Each record is "LEN KEY=VALUE\\n"
    with LEN counting the whole record: a length that is not a number, or that does not reach
    past its own digits, is a corrupt header (and a zero would never advance)."""
    while data:
        space = data.find(b" ")
        if space <= 0:
            return None
        if not data[:space].isdigit() or not space + 2 <= int(data[:space]) <= len(data):
            raise _Corrupt(f"pax record length {data[:space][:20]!r} is not valid")
        length = int(data[:space])
        key, _, value = data[space + 1:length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        data = data[length:]
    return None


class _Cursor:
    """A stream positioned at a known byte offset, that can skip forward cheaply."""

    def __init__(self, url: str, offset: int, opener: Callable):
        self.url, self.pos, self.opener = url, offset, opener
        self.stream = opener(url, offset)
        self.seekable = bool(getattr(self.stream, "seekable", lambda: False)())
        self.size = _local_size(self.stream) if self.seekable else None

    def read(self, n: int) -> bytes:
        try:
            data = self.stream.read(n)
        except StorageError:  # storage's own retries gave up: final
            raise
        except (OSError, ValueError) as exc:  # a connection broke, a local read error
            raise _Interrupted(str(exc)) from exc
        if len(data) != n:
            raise _Interrupted(f"stream ended at byte {self.pos + len(data)}")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(self.pos + n)
            self.pos += n
        elif n > REOPEN_GAP:
            self.close()
            try:
                self.stream = self.opener(self.url, self.pos + n)
            except StorageError:
                raise
            except OSError as exc:  # reopened (with retries) at the member by read_samples
                raise _Interrupted(f"reopening past a gap failed: {exc}") from exc
            self.pos += n
        else:
            self.read(n)

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001  (a broken connection may fail to close)
            pass


def _local_size(stream) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it
        return None


def _open(url: str, offset: int, opener: Callable, backoff: Backoff) -> _Cursor:
    """Open, retrying transient errors under `backoff`; a missing shard, or one storage gave
    up on, is a ShardError naming the URL and the cause at once."""
    while True:
        try:
            return _Cursor(url, offset, opener)
        except FileNotFoundError:
            raise ShardError(f"shard {url} is missing; the packed data set is incomplete: "
                             f"re-run `resnet pack`") from None
        except StorageError as exc:
            raise ShardError(f"cannot read shard {url}: {exc}") from None
        except OSError as exc:  # a local error, or an opener without retries of its own
            _wait(backoff, exc, url, offset)


def _wait(backoff: Backoff, exc: BaseException, url: str, offset: int) -> None:
    try:
        backoff.wait(exc, f"shard {url} at byte {offset}")
    except StorageError as final:
        raise ShardError(str(final)) from None


def read_samples(url: str, needed: set[int], *, opener: Callable = storage.open_read,
                 deadline_s: float | None = None, shard_bytes: int | None = None,
                 start: tuple[int, int] = (0, 0)
                 ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (sample index, key, {ext: bytes}) for each needed sample, in tar order.
    `shard_bytes` (the manifest's size of the shard) bounds every member: a size field that
    reaches past it is corrupt, not an allocation of what it claims. `start` is (byte offset,
    index) of a sample's first header (the manifest's offsets): reading begins there."""
    offset, first = start
    if not needed:
        return
    if min(needed) < first:
        raise ValueError(f"shard {url}: sample {min(needed)} lies before the start, sample "
                         f"{first} at byte {offset}")
    last = max(needed)
    state = {"index": first - 1, "key": None, "files": {}, "end": shard_bytes}
    backoff = Backoff(deadline_s)
    cursor = _open(url, offset, opener, backoff)
    try:
        while True:
            try:
                for item in _walk(cursor, state, needed, last):
                    backoff.reset()
                    yield item
                return
            except _Corrupt as exc:
                raise ShardError(f"shard {url} is corrupt at byte {state['member']}: {exc}; "
                                 f"re-pack it (`resnet verify` lists the bad shards)") from None
            except StorageError as exc:
                raise ShardError(f"cannot read shard {url} at byte {state['member']}: "
                                 f"{exc}") from None
            except _Interrupted as exc:
                offset = state["member"]
                _wait(backoff, exc, url, offset)
                log.warning("shard %s: %s; reopening at byte %d", url, exc, offset)
                cursor.close()
                cursor = _open(url, offset, opener, backoff)
    finally:
        cursor.close()


def _walk(cursor: _Cursor, state: dict, needed: set[int], last: int):
    """Parse members from the cursor; `state` survives reopenings (index, key, files, member)."""
    while True:
        state["member"] = cursor.pos  # a reopening restarts at this member's first header
        name, size, kind = _next_header(cursor)
        if name is None:  # end of archive
            break
        end = state["end"] if state["end"] is not None else cursor.size
        if size < 0 or (end is not None and cursor.pos + size > end):
            raise _Corrupt(f"a member of {size} bytes at byte {state['member']} would end "
                           f"outside the shard's {end} bytes")
        key, ext = split_name(name)
        ext = ext.lower()
        if key != state["key"]:
            if state["index"] in needed:
                yield state["index"], state["key"], state["files"]
            if state["index"] >= last:
                return
            state.update(index=state["index"] + 1, key=key, files={})
        padded = -(-size // BLOCK) * BLOCK
        if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) and state["index"] in needed:
            state["files"][ext] = cursor.read(size)
            cursor.skip(padded - size)
        else:
            cursor.skip(padded)
    if state["index"] in needed:
        yield state["index"], state["key"], state["files"]


def _next_header(cursor: _Cursor) -> tuple[str | None, int, bytes]:
    """The next member's (name, size, type), folding pax and GNU long-name headers in."""
    long_name = None
    while True:
        block = cursor.read(BLOCK)
        if block.count(0) == BLOCK:
            return None, 0, b""
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _Interrupted(f"bad tar header at byte {cursor.pos - BLOCK}: {exc}") from None
        padded = -(-info.size // BLOCK) * BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            if info.size > MAX_NAME_HEADER:  # a crafted size must not allocate gigabytes
                raise _Corrupt(f"a {info.size}-byte name header at byte {cursor.pos - BLOCK}")
            data = cursor.read(padded)[: info.size]
            if info.type == tarfile.XHDTYPE:
                long_name = _pax_path(data) or long_name
            else:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XGLTYPE:
            cursor.skip(padded)
            continue
        return long_name or info.name, info.size, info.type
