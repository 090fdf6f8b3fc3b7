"""The parts of storage that talk to a remote service: the S3 client, error translation, retries.

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
from typing import Any, Callable, TypeVar

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


def retry(
    fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2
) -> T:
    """Call ``fn``; on a transient error wait ``base_delay * 2**i`` (with jitter) and try again,
    at most ``attempts`` times in all. Other errors are raised at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  (filtered just below)
            if not is_transient(exc) or attempt == attempts - 1:
                if is_transient(exc):
                    raise StorageError(
                        f"{what}: still failing after {attempts} attempts: {exc}"
                    ) from exc
                raise
            # Full jitter: spreads the retries of many workers hitting the same store.
            time.sleep(base_delay * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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
        # Our `retry` does the backoff; keep botocore's own short so failures surface quickly.
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=float(os.environ.get("RESNET_S3_CONNECT_TIMEOUT", 10)),
        read_timeout=float(os.environ.get("RESNET_S3_READ_TIMEOUT", 60)),
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", config=config)


def reset_clients() -> None:
    """Forget cached clients (after changing credentials or endpoint in-process)."""
    with _clients_lock:
        _clients.clear()


def _s3_error(exc: Exception, url: str, what: str) -> Exception:
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


def _s3_call(url: str, what: str, fn: Callable[[], T]) -> T:
    def attempt() -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            translated = _s3_error(exc, url, what)
            if translated is exc:
                raise
            raise translated from None

    return retry(attempt, what=f"{what} {url}")
