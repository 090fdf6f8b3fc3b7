"""The node-local shard cache (data.cache_dir, data.cache_limit_gb): each remote shard crosses
the network once per node, not once per epoch and reader.

    cache = ShardCache("/mnt/nvme/resnet-cache", limit_gb=800)
    read_samples(url, needed, opener=cache.opener(shard_info))

- A shard is stored whole under its manifest SHA-256 (`<sha256>.tar`): the same shard of two
  copies of a data set is one file, and a file under that name is only ever that shard.
- Filling is once per node: the first reader of a shard takes the shard's file lock
  (`fcntl.flock`, released by the kernel if the process dies), downloads to `<name>.part`,
  checks size and SHA-256 against the manifest while writing, fsyncs and renames. The other
  ranks and workers of the node wait on that lock and then read the finished file.
- Every opening hashes the cached file again before a byte is handed out, through the same
  file descriptor the reader then uses: a truncated, damaged or foreign file is removed and
  fetched again, never trained on (hashing runs at disk speed; docs/benchmarks.md has the cost).
- Least recently used first (the file's mtime, set at every hit: atime is often off) is
  evicted to keep the cache under data.cache_limit_gb and the disk from filling. A disk that
  is full anyway (ENOSPC/EDQUOT) evicts and tries once more, then streams that shard from the
  source with a warning: a cache problem never stops training.
- The files outlive the job: a restarted or re-formed job on the node starts warm.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator

from resnet.data import iostats, storage
from resnet.data.format import ShardInfo

log = logging.getLogger(__name__)

GB = 10**9
CHUNK = 1 << 20
_CACHED = re.compile(r"^[0-9a-f]{64}\.tar$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheSettingError(ValueError):
    """data.cache_dir or data.cache_limit_gb cannot work; the message names the key."""


class SourceMismatch(storage.StorageError):
    """The source's shard is not the one the manifest describes (size or SHA-256)."""


def check_settings(directory: str, limit_gb: float, largest_shard: int) -> None:
    """Refuse, before training starts, a cache that cannot work: a directory that cannot be
    created or written, a negative limit, or a limit that cannot hold the largest shard."""
    if limit_gb < 0:
        raise CacheSettingError(f"data.cache_limit_gb={limit_gb:g} is negative; 0 means no "
                                f"limit but the disk's")
    if limit_gb and limit_gb * GB < largest_shard:
        raise CacheSettingError(
            f"data.cache_limit_gb={limit_gb:g} ({limit_gb * GB:,.0f} bytes) cannot hold one "
            f"shard: the largest has {largest_shard:,} bytes; raise it or leave data.cache_dir "
            f"empty")
    try:
        os.makedirs(os.path.join(directory, ".locks"), exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise CacheSettingError(f"data.cache_dir={directory} is not a writable directory: "
                                f"{exc.strerror or exc}") from None


class _CachedFile(io.RawIOBase):
    """A verified cached shard; counts the bytes the reader takes from it."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        iostats.COUNTS.cache_bytes += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class ShardCache:
    """The cache in one directory; cheap to pickle into loader workers (two fields)."""

    def __init__(self, directory: str, limit_gb: float = 0.0):
        self.directory = os.path.abspath(directory)
        self.limit = int(limit_gb * GB)  # 0: no limit but the disk's free space

    def opener(self, info: ShardInfo) -> Callable[[str, int], io.RawIOBase]:
        """An `opener(url, offset)` for shardio.read_samples that reads `info`'s shard here."""
        return lambda url, offset: self.open(url, info, offset)

    def path(self, info: ShardInfo) -> str:
        return os.path.join(self.directory, f"{info.sha256}.tar")

    def open(self, url: str, info: ShardInfo, offset: int = 0):
        """The shard from the cache (filled first if needed) at `offset`, or streamed from
        `url` when the disk cannot take it."""
        f = self._verified(info)
        if f is None:
            with self._locked(info.sha256):
                f = self._verified(info)  # another process of the node may have filled it
                if f is None and self._fill(url, info):
                    f = self._verified(info)
        if f is None:
            return storage.open_read(url, offset)
        iostats.COUNTS.cache_hits += 1
        f.seek(offset)
        return io.BufferedReader(_CachedFile(f), buffer_size=CHUNK)

    # ------------------------------------------------------------------ reading
    def _verified(self, info: ShardInfo):
        """An open file holding exactly the shard, or None (a bad file is removed)."""
        path = self.path(info)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        try:
            size, digest = _hash(f)
        except OSError as exc:
            f.close()
            log.warning("shard cache: cannot read %s (%s); fetching %s again", path, exc,
                        info.name)
            _remove(path)
            return None
        if (size, digest) != (info.bytes, info.sha256):
            f.close()
            log.warning("shard cache: %s is not shard %s (%d bytes, sha256 %s..., the manifest "
                        "says %d, %s...): removed, fetching it again", path, info.name, size,
                        digest[:12], info.bytes, info.sha256[:12])
            _remove(path)
            return None
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return f

    # ------------------------------------------------------------------ filling
    def _fill(self, url: str, info: ShardInfo) -> bool:
        """Download the shard into the cache (the caller holds its lock); False: no room."""
        part = self.path(info) + ".part"
        for attempt in range(2):
            self._make_room(info.bytes, keep=info.sha256)
            try:
                self._download(url, info, part)
                os.replace(part, self.path(info))
            except (storage.StorageError, FileNotFoundError):
                _remove(part)
                raise  # the source's problem, not the cache's: the reader reports it
            except OSError as exc:
                _remove(part)
                if exc.errno in _FULL and attempt == 0:
                    self._evict(info.bytes, keep=info.sha256)  # the disk is fuller than it said
                    continue
                log.warning("shard cache: cannot write %s under %s (%s); streaming it from the "
                            "source instead", info.name, self.directory, exc.strerror or exc)
                return False
            iostats.COUNTS.cache_fills += 1
            return True
        return False

    def _download(self, url: str, info: ShardInfo, part: str) -> None:
        digest, size = hashlib.sha256(), 0
        with storage.open_read(url) as src, open(part, "wb") as dst:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())  # the rename below must not publish a file still in memory
        if (size, digest.hexdigest()) != (info.bytes, info.sha256):
            raise SourceMismatch(f"shard {url} has {size} bytes and sha256 "
                                 f"{digest.hexdigest()[:12]}..., its manifest says {info.bytes} "
                                 f"and {info.sha256[:12]}...: the data set changed after it was "
                                 f"packed; re-pack it")

    # ------------------------------------------------------------------ eviction
    def _make_room(self, need: int, keep: str) -> None:
        """Evict until `need` more bytes fit under the limit and on the disk."""
        with self._locked("evict"):
            entries = self._entries(keep)
            used = sum(size for _, size, _ in entries)
            free = shutil.disk_usage(self.directory).free
            while entries and ((self.limit and used + need > self.limit) or free < need):
                _, size, path = entries.pop(0)
                if _remove(path):
                    used, free = used - size, free + size

    def _evict(self, need: int, keep: str) -> None:
        """Free at least `need` bytes (oldest first), whatever the accounting says."""
        with self._locked("evict"):
            freed = 0
            for _, size, path in self._entries(keep):
                if freed >= need:
                    break
                if _remove(path):
                    freed += size

    def _entries(self, keep: str) -> list[tuple[int, int, str]]:
        """(mtime, size, path) of the cached shards, least recently used first; stale partial
        downloads (their shard's lock is free) are removed on the way."""
        out = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(".tar.part") and not entry.name.startswith(keep):
                    self._remove_stale_part(entry.path, entry.name[:64])
                if not _CACHED.match(entry.name) or entry.name.startswith(keep):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                out.append((st.st_mtime_ns, st.st_size, entry.path))
        return sorted(out)

    def _remove_stale_part(self, path: str, name: str) -> None:
        with self._try_locked(name) as free:
            if free:
                _remove(path)

    # ------------------------------------------------------------------ locks
    def _lock_path(self, name: str) -> str:
        locks = os.path.join(self.directory, ".locks")
        os.makedirs(locks, exist_ok=True)
        return os.path.join(locks, f"{name}.lock")

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self._lock_path(name), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def _try_locked(self, name: str) -> Iterator[bool]:
        with open(self._lock_path(name), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _hash(f) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return size, digest.hexdigest()
        digest.update(chunk)
        size += len(chunk)


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
