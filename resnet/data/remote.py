"""The parts of storage that talk to a remote service: the S3 client, error translation, retries,
and listing what is under an S3 prefix.

Kept apart from `storage` (the public API, which re-exports `StorageError`, `retry`,
`is_transient`, `s3_client` and `reset_clients`) so each file reads on its own.
"""
from __future__ import annotations

import http.client
import os
import random
import socket
import threading
import time
import urllib.error
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

# S3 error codes that mean "try again"; 5xx statuses count as well (see is_transient).
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "TooManyRequestsException", "PriorRequestNotComplete", "500", "502", "503", "504",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(OSError):
    """Storage refused an operation for a reason retrying will not fix (no bucket, access denied,
    unsupported operation); the message names the URL."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL has no bucket: {url!r}")
    return bucket, key


# ----------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not hit: 5xx, throttling, resets, timeouts."""
    import botocore.exceptions as bce
    import urllib3.exceptions as u3e

    if isinstance(exc, StorageError):  # already final (e.g. retries exhausted): never nest
        return False
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return err.get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    transient_types = (
        bce.EndpointConnectionError, bce.ConnectionClosedError, bce.ReadTimeoutError,
        bce.ConnectTimeoutError, bce.ResponseStreamingError, bce.IncompleteReadError,
        u3e.ProtocolError, u3e.ReadTimeoutError, u3e.IncompleteRead, u3e.NewConnectionError,
        http.client.IncompleteRead, http.client.RemoteDisconnected,
        ConnectionError, socket.timeout, TimeoutError,
    )
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, (OSError, socket.timeout))
    if isinstance(exc, transient_types):
        return True
    # Wrapped errors (e.g. botocore wrapping urllib3) keep the root cause in __context__.
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and isinstance(cause, transient_types)


DEFAULT_IO_TIMEOUT_S = 120.0
MAX_DELAY_S = 10.0


def io_timeout_s() -> float:
    """The total time one read may keep failing before it is an error (data.io_timeout_s; the
    trainer puts it in RESNET_IO_TIMEOUT_S, so DataLoader worker processes see it too)."""
    return float(os.environ.get("RESNET_IO_TIMEOUT_S") or DEFAULT_IO_TIMEOUT_S)


def set_io_timeout_s(seconds: float) -> None:
    os.environ["RESNET_IO_TIMEOUT_S"] = str(float(seconds))


class Backoff:
    """The one retry policy: exponential backoff with full jitter under a total deadline that
    starts when the first failed attempt began. `attempt(fn)` runs one attempt, cut off at the
    time left once something failed (a read timeout alone can take 70 s); `wait(exc, what)`
    sleeps before the next try, or raises a StorageError naming `what`, the time spent and the
    last cause once the deadline passed."""

    def __init__(self, deadline_s: float | None = None, base_delay: float = 0.2,
                 attempts: int | None = None) -> None:
        self.deadline_s = io_timeout_s() if deadline_s is None else deadline_s
        self.base_delay, self.attempts = base_delay, attempts
        self.failures, self.first = 0, 0.0
        self.attempt_started: float | None = None

    def reset(self) -> None:
        self.failures, self.attempt_started = 0, None

    def time_left(self) -> float | None:
        """Seconds to the deadline (None: nothing failed yet, so no deadline runs)."""
        if self.failures == 0:
            return None
        return self.deadline_s - (time.monotonic() - self.first)

    def attempt(self, fn: Callable[[], T]) -> T:
        self.attempt_started = time.monotonic()
        left = self.time_left()
        return fn() if left is None else _within(fn, max(left, 0.0))

    def wait(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self.failures == 0:
            self.first = self.attempt_started if self.attempt_started is not None else now
        self.failures += 1
        spent = now - self.first
        delay = min(MAX_DELAY_S, self.base_delay * 2 ** (self.failures - 1)) * random.random()
        out_of_tries = self.attempts is not None and self.failures >= self.attempts
        if out_of_tries or spent + delay > self.deadline_s:
            raise StorageError(f"{what}: still failing after {spent:.1f} s and {self.failures} "
                               f"attempts (data.io_timeout_s={self.deadline_s:g}); last cause: "
                               f"{type(exc).__name__}: {exc}") from exc
        time.sleep(delay)  # full jitter: spreads the retries of many workers on one store


def _within(fn: Callable[[], T], seconds: float) -> T:
    """`fn()`, or TimeoutError after `seconds` (the call goes on in its daemon thread until its
    own socket timeout; its result is dropped)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            box["error"] = exc

    thread = threading.Thread(target=run, name="storage-attempt", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"an attempt took longer than the {seconds:.1f} s left")
    if "error" in box:
        raise box["error"]
    return box["value"]


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None,
          base_delay: float = 0.2, deadline_s: float | None = None) -> T:
    """Call ``fn``; on a transient error back off (`Backoff`) and try again until the deadline
    (default data.io_timeout_s) or ``attempts``. Other errors are raised at once."""
    backoff = Backoff(deadline_s, base_delay, attempts)
    while True:
        try:
            return backoff.attempt(fn)
        except Exception as exc:  # noqa: BLE001  (filtered just below)
            if not is_transient(exc):
                raise
            backoff.wait(exc, what)


# ----------------------------------------------------------------------------- S3 client

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client():
    """The process's boto3 S3 client, made on first use in each process (fork-safe)."""
    key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_PROFILE"),
    )
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _make_s3_client()
                _clients.clear()  # clients of a parent process or an old endpoint are stale
                _clients[key] = client
    return client


def _make_s3_client():
    import boto3
    from botocore.config import Config

    config = Config(
        # `retry`/`Backoff` is the one retry layer, under data.io_timeout_s: botocore makes
        # one attempt per call instead of stacking its own retries underneath.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=float(os.environ.get("RESNET_S3_CONNECT_TIMEOUT", 10)),
        read_timeout=float(os.environ.get("RESNET_S3_READ_TIMEOUT", 60)),
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", config=config)


def reset_clients() -> None:
    """Forget cached clients (after changing credentials or endpoint in-process)."""
    with _clients_lock:
        _clients.clear()


def s3_error(exc: Exception, url: str, what: str) -> Exception:
    """Translate a botocore ClientError into FileNotFoundError / StorageError, or keep it."""
    import botocore.exceptions as bce

    if not isinstance(exc, bce.ClientError) or is_transient(exc):
        return exc
    code = exc.response.get("Error", {}).get("Code", "")
    if code in _MISSING_CODES:
        return FileNotFoundError(f"no such object: {url}")
    if code == "NoSuchBucket":
        return StorageError(f"cannot {what} {url}: the bucket {split_s3(url)[0]!r} does not exist")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"cannot {what} {url}: access denied ({code}); check the AWS credentials "
            f"(standard chain: env, ~/.aws, instance role) and the bucket policy"
        )
    return StorageError(f"cannot {what} {url}: {code}: {exc}")


def is_range_past_end(exc: Exception) -> bool:
    """A ranged GET that starts at or past the object's end (nothing left to read)."""
    import botocore.exceptions as bce

    return isinstance(exc, bce.ClientError) and exc.response.get("Error", {}).get("Code") in (
        "InvalidRange", "416"
    )


def s3_call(url: str, what: str, fn: Callable[[], T]) -> T:
    """`fn()`, an S3 request about `url`: retried while it fails transiently, its final
    failure translated by `s3_error` (`what` names the operation in messages)."""
    def attempt() -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            translated = s3_error(exc, url, what)
            if translated is exc:
                raise
            raise translated from None

    return retry(attempt, what=f"{what} {url}")


# ----------------------------------------------------------------------------- S3 listing


def s3_keys(url: str, delimiter: Optional[str]) -> tuple[list[str], list[str]]:
    """(object keys, common prefixes) under ``url`` treated as a directory."""
    bucket, key = split_s3(url)
    prefix = key.rstrip("/") + "/" if key else ""
    keys: list[str] = []
    prefixes: list[str] = []

    def list_all() -> None:
        keys.clear()
        prefixes.clear()
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        for page in s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
            keys.extend(o["Key"] for o in page.get("Contents", ()))
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))

    s3_call(url, "list", list_all)
    return keys, prefixes


def s3_listing(url: str) -> dict[str, int]:
    """{key relative to ``url``: size} of every object under it ("folder" placeholders left out)."""
    bucket, key = split_s3(url)
    base = key.rstrip("/") + "/" if key else ""
    listing: dict[str, int] = {}

    def list_all() -> None:
        listing.clear()
        for page in s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=base):
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):  # a "folder" placeholder object
                    listing[item["Key"][len(base):]] = int(item["Size"])

    s3_call(url, "list", list_all)
    return listing
