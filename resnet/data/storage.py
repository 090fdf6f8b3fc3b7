"""The one place that does I/O: local paths, ``s3://bucket/key`` and ``http(s)://`` (read only).

Every other module reads and writes through these functions, so retries, error messages and the
S3 client live here only.

- S3 uses boto3 with the standard credential chain; boto3 >= 1.28 honours ``AWS_ENDPOINT_URL``
  (and ``AWS_ENDPOINT_URL_S3``) by itself, which is how S3-compatible stores and the tests'
  ``moto_server`` are reached. One client per process, made lazily: boto3 clients must not cross
  a ``fork`` (DataLoader workers, pack workers).
- Errors: a missing object is ``FileNotFoundError``; a missing bucket, denied access or any other
  refusal is ``StorageError`` naming the URL. Transient failures (5xx, throttling, resets,
  timeouts, truncated bodies) are retried with exponential backoff and jitter by `retry` /
  `Backoff`, the one retry layer, for at most data.io_timeout_s per read (botocore: one attempt).
- `open_read` returns a stream that, on a transient error in the middle of a remote body,
  reopens at the byte it had reached (a Range request), so long shard reads survive a dropped
  connection without the caller knowing.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request

from resnet.data import iostats
from resnet.data.remote import (  # noqa: F401  (re-exported: part of the storage API)
    Backoff, StorageError, is_s3, is_transient, reset_clients, retry, s3_client,
    set_io_timeout_s, split_s3)
from resnet.data.remote import is_range_past_end, s3_call, s3_error, s3_keys, s3_listing

REMOTE_SCHEMES = ("s3://", "http://", "https://")


# ----------------------------------------------------------------------------- URLs


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE_SCHEMES)


def join(root: str, *names: str) -> str:
    """Join path parts; remote URLs always use ``/`` whatever the OS."""
    root = str(root)
    if not is_remote(root):
        return os.path.join(root, *names)
    parts = [root.rstrip("/")] + [n.strip("/") for n in names if n]
    return "/".join(parts)


def _require_not_http(url: str, what: str) -> None:
    if url.startswith(("http://", "https://")):
        raise StorageError(f"cannot {what} {url}: http(s) storage is read-only")


# ----------------------------------------------------------------------------- reading


def _open_remote_once(url: str, offset: int):
    """One attempt at a raw body stream starting at ``offset``."""
    if is_s3(url):
        bucket, key = split_s3(url)
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        iostats.COUNTS.s3_requests += 1
        try:
            return s3_client().get_object(Bucket=bucket, Key=key, **kwargs)["Body"]
        except Exception as exc:  # noqa: BLE001
            translated = s3_error(exc, url, "read")
            if is_range_past_end(exc):
                return io.BytesIO(b"")
            if translated is exc:
                raise
            raise translated from None
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(f"no such object: {url}") from None
        if exc.code == 416:
            return io.BytesIO(b"")
        if exc.code in (401, 403):
            raise StorageError(f"cannot read {url}: access denied (HTTP {exc.code})") from None
        raise
    if offset and response.status != 206:
        response.close()
        raise StorageError(f"cannot read {url} from byte {offset}: the server ignores Range")
    return response


class _ResumingReader(io.RawIOBase):
    """A remote body that reopens at its current offset after a transient error: opening and
    reading share one `Backoff` (data.io_timeout_s from the first failure, reset by progress)."""

    def __init__(self, url: str, offset: int):
        self.url, self.pos = url, offset
        self.backoff = Backoff()
        self.body = self._open()

    def _open(self):
        while True:
            try:
                return self.backoff.attempt(lambda: _open_remote_once(self.url, self.pos))
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc):
                    raise
                self.backoff.wait(exc, f"read {self.url} from byte {self.pos}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self.body.read(len(view))
                break
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc):
                    raise
                self._close_body()
                self.backoff.wait(exc, f"read {self.url} from byte {self.pos}")
                self.body = self._open()
        self.backoff.reset()
        n = len(data)
        view[:n] = data
        self.pos += n
        if is_s3(self.url):
            iostats.COUNTS.s3_bytes += n
        return n

    def _close_body(self) -> None:
        try:
            self.body.close()
        except Exception:  # noqa: BLE001  (closing a broken connection may fail too)
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


def open_read(url: str, offset: int = 0) -> io.BufferedIOBase:
    """A streaming binary reader starting at byte ``offset`` (local seek, or a Range request)."""
    url = str(url)
    if not is_remote(url):
        f = open(url, "rb")  # FileNotFoundError names the path by itself
        if offset:
            f.seek(offset)
        return f
    return io.BufferedReader(_ResumingReader(url, offset), buffer_size=1 << 20)


def read_bytes(url: str) -> bytes:
    # open_read retries the open and resumes a broken body itself.
    with open_read(url) as f:
        return f.read()


# ----------------------------------------------------------------------------- writing


def _local_tmp(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the result should read like any written file
    return tmp


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part."""
    url = str(url)
    _require_not_http(url, "write")
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_call(url, "write", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    tmp = _local_tmp(url)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, url)
    except BaseException:
        _silent_remove(tmp)
        raise


def upload_file(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` (S3: multipart for big files; the object appears whole)."""
    url = str(url)
    _require_not_http(url, "write")
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"no such file to upload: {local_path}")
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_call(url, "upload to", lambda: s3_client().upload_file(str(local_path), bucket, key))
        return
    tmp = _local_tmp(url)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, url)
    except BaseException:
        _silent_remove(tmp)
        raise


def _silent_remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- listing


def size(url: str) -> int:
    """Size in bytes of a file/object; FileNotFoundError if there is none."""
    url = str(url)
    if not is_remote(url):
        return os.path.getsize(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        head = s3_call(url, "stat", lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])
    request = urllib.request.Request(url, method="HEAD")
    try:
        with retry(lambda: urllib.request.urlopen(request, timeout=30), what=f"stat {url}") as r:
            return int(r.headers["Content-Length"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(f"no such object: {url}") from None
        raise


def exists(url: str) -> bool:
    """True if ``url`` is an object/file or a non-empty prefix/directory."""
    url = str(url)
    if not is_remote(url):
        return os.path.exists(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        if not key:
            keys, prefixes = s3_keys(url, "/")
            return bool(keys or prefixes)
        # LIST rather than HEAD: a HEAD's 404 cannot tell a missing key from a missing bucket.
        for prefix in (key, key.rstrip("/") + "/"):
            page = s3_call(url, "check", lambda p=prefix: s3_client().list_objects_v2(
                Bucket=bucket, Prefix=p, MaxKeys=1))
            first = [o["Key"] for o in page.get("Contents", ())]
            if first and (first[0] == key or first[0].startswith(key.rstrip("/") + "/")):
                return True
        return False
    try:
        request = urllib.request.Request(url, method="HEAD")
        retry(lambda: urllib.request.urlopen(request, timeout=30).close(), what=f"check {url}")
        return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def listdir(url: str) -> list[str]:
    """Sorted names directly under a directory / prefix (files and sub-directories)."""
    url = str(url)
    _require_not_http(url, "list")
    if not is_s3(url):
        return sorted(os.listdir(url))
    _, key = split_s3(url)
    base = key.rstrip("/") + "/" if key else ""
    keys, prefixes = s3_keys(url, "/")
    names = {k[len(base):] for k in keys} | {p[len(base):].rstrip("/") for p in prefixes}
    names.discard("")
    return sorted(names)


def remove(url: str, missing_ok: bool = True) -> None:
    """Remove a file/object, or a whole directory/prefix."""
    url = str(url)
    _require_not_http(url, "remove")
    if is_s3(url):
        bucket, key = split_s3(url)
        if not missing_ok and not exists(url):
            raise FileNotFoundError(f"no such object: {url}")
        keys, _ = s3_keys(url, None)
        # Deleting a key that does not exist is a no-op in S3, so the object itself is included.
        targets = keys + ([key] if key else [])
        for i in range(0, len(targets), 1000):  # delete_objects takes at most 1000 keys
            batch = [{"Key": k} for k in targets[i:i + 1000]]
            response = s3_call(url, "remove", lambda b=batch: s3_client().delete_objects(
                Bucket=bucket, Delete={"Objects": b, "Quiet": True}))
            # A 200 response can still have failed keys (AccessDenied, ...), listed per key.
            errors = response.get("Errors") or []
            if errors:
                named = "; ".join(f"s3://{bucket}/{e.get('Key')}: {e.get('Code')} "
                                  f"{e.get('Message', '')}".rstrip() for e in errors[:3])
                raise StorageError(f"cannot remove {url}: {len(errors)} of {len(batch)} "
                                   f"objects were not deleted, e.g. {named}")
        return
    if os.path.isdir(url) and not os.path.islink(url):
        shutil.rmtree(url)
    elif os.path.lexists(url):
        os.remove(url)
    elif not missing_ok:
        raise FileNotFoundError(f"no such file: {url}")


def upload_dir(local_dir: str, url: str, last: str | None = None) -> dict[str, int]:
    """Copy a local directory tree to ``url`` (files only; existing objects are overwritten),
    the file at relative key ``last`` (if any) after every other one.
    Returns what was uploaded: {relative key: size in bytes}."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"no such directory to upload: {local_dir}")
    pending = []
    for dirpath, _, files in os.walk(local_dir):
        rel = os.path.relpath(dirpath, local_dir)
        for name in sorted(files):
            key = "/".join([p for p in rel.split(os.sep) if p not in ("", ".")] + [name])
            pending.append((key, os.path.join(dirpath, name)))
    pending.sort(key=lambda item: item[0] == last)  # stable: `last` goes last
    uploaded = {}
    for key, path in pending:
        uploaded[key] = os.path.getsize(path)
        upload_file(path, join(url, *key.split("/")))
    return uploaded


def checked_key(rel: str, url: str) -> list[str]:
    """A key found under ``url`` as path parts that cannot leave the folder it is copied into:
    a key is data from the store, and `..`, an absolute path, an empty part or a backslash
    (a separator elsewhere) would write outside it."""
    parts = rel.split("/")
    if "\\" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing to download {url}: the key {rel[:200]!r} under it is not "
                           f"a plain relative name (.., an absolute path, an empty part or a "
                           f"backslash) and would not stay inside the target folder")
    return parts


def _local_listing(url: str) -> dict[str, int]:
    """{relative key: size} of the regular files under a local folder; a symbolic link is
    refused (it could point anywhere, and a copy would follow it)."""
    listing = {}
    for dirpath, dirs, files in os.walk(url):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, url).replace(os.sep, "/")
            if os.path.islink(path):
                raise StorageError(f"refusing to download {url}: {rel!r} under it is a "
                                   f"symbolic link")
            checked_key(rel, url)
            if name in files:
                listing[rel] = os.path.getsize(path)
    return listing


def download_dir(url: str, local_dir: str) -> dict[str, int]:
    """Copy everything under ``url`` into ``local_dir`` (created if needed). Every key is
    checked before anything is written (`checked_key`), and every file is checked afterwards
    to have the size the listing gave. Returns {relative key: size}."""
    url = str(url)
    _require_not_http(url, "download a directory from")
    listing = s3_listing(url) if is_s3(url) else _local_listing(url)
    if not listing:
        raise FileNotFoundError(f"nothing under {url}")
    parts = {rel: checked_key(rel, url) for rel in listing}
    for rel, size_ in listing.items():
        target = os.path.join(local_dir, *parts[rel])
        tmp = _local_tmp(target)
        source = join(url, rel)
        try:
            if is_s3(url):
                bucket, key = split_s3(source)
                s3_call(source, "download",
                         lambda b=bucket, k=key, t=tmp: s3_client().download_file(b, k, t))
            else:
                shutil.copyfile(source, tmp, follow_symlinks=False)
            got = os.path.getsize(tmp)
            if got != size_:
                raise StorageError(f"downloading {source}: {got} bytes arrived, the listing "
                                   f"said {size_} (the object changed or the copy was cut)")
            os.replace(tmp, target)
        except BaseException:
            _silent_remove(tmp)
            raise
    return listing
