"""storage: one API over local paths, s3:// (against moto_server on loopback) and http(s)://."""
from __future__ import annotations

import http.client
import os

import botocore.exceptions as bce
import pytest

from resnet.data import remote, storage
from resnet.data.storage import StorageError


def _client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject")


def _roundtrip(root: str) -> None:
    url = storage.join(root, "a", "b.bin")
    storage.write_bytes(url, b"0123456789")
    assert storage.exists(url) and storage.exists(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "b"))  # a prefix of a name is no match
    assert storage.read_bytes(url) == b"0123456789"
    assert storage.size(url) == 10
    with storage.open_read(url, offset=4) as f:
        assert f.read() == b"456789"
    with storage.open_read(url, offset=10) as f:
        assert f.read() == b""
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"x")
    storage.write_bytes(storage.join(root, "a", "d", "e.bin"), b"y")
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "c.bin", "d"]
    storage.remove(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError):
        storage.open_read(url)
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "d", "e.bin"))


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_s3_roundtrip(s3_server):
    _roundtrip(f"s3://{s3_server.bucket}/prefix")


def test_s3_reaches_the_endpoint_from_env_alone(s3_server):
    # AWS_ENDPOINT_URL is the only thing that points boto3 at moto: the object must be there.
    storage.write_bytes(f"s3://{s3_server.bucket}/k", b"v")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="k")["Body"].read()
    assert body == b"v"


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.write_bytes("s3://no-such-bucket/x", b"1")
    with pytest.raises(StorageError, match="does not exist"):
        storage.open_read("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.exists("s3://no-such-bucket/x")


def test_access_denied_is_a_clear_error():
    translated = remote.s3_error(_client_error("AccessDenied", 403), "s3://b/k", "read")
    assert isinstance(translated, StorageError) and "access denied" in str(translated)


def test_upload_and_download_dir(s3_server, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(b"m" * 1000)
    (src / "sub" / "state.json").write_text("{}")
    url = f"s3://{s3_server.bucket}/runs/r1/ckpt"
    storage.upload_dir(str(src), url)
    assert storage.listdir(url) == ["model.bin", "sub"]
    out = tmp_path / "back"
    storage.download_dir(url, str(out))
    assert (out / "model.bin").read_bytes() == b"m" * 1000
    assert (out / "sub" / "state.json").read_text() == "{}"


def test_http_read_with_range(s3_server):
    # moto serves objects over plain path-style HTTP too: a real server with Range support.
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="pub/data.bin",
                                  Body=bytes(range(200)), ACL="public-read")
    url = f"{s3_server.endpoint}/{s3_server.bucket}/pub/data.bin"
    assert storage.read_bytes(url) == bytes(range(200))
    with storage.open_read(url, offset=150) as f:
        assert f.read() == bytes(range(150, 200))
    assert storage.exists(url) and storage.size(url) == 200
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_server.endpoint}/{s3_server.bucket}/pub/missing")
    with pytest.raises(StorageError, match="read-only"):
        storage.write_bytes(url, b"x")


def test_s3_read_resumes_after_server_restart(s3_server, monkeypatch):
    # Larger than what socket buffers can hold (a few MiB on loopback), so the restart cuts
    # the stream and the reader has to reopen it at the byte it reached.
    data = os.urandom(32 << 20)
    url = f"s3://{s3_server.bucket}/big.bin"
    storage.write_bytes(url, data)
    opened = []
    open_once = storage._open_remote_once
    monkeypatch.setattr(storage, "_open_remote_once",
                        lambda u, offset: opened.append(offset) or open_once(u, offset))
    with storage.open_read(url) as f:
        head = f.read(1 << 20)
        s3_server.stop()
        s3_server.start()
        rest = f.read()
    assert head + rest == data
    assert opened[0] == 0 and len(opened) >= 2 and opened[1] >= len(head), opened


@pytest.mark.parametrize("exc, transient", [
    (_client_error("SlowDown", 503), True),
    (_client_error("InternalError", 500), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("AccessDenied", 403), False),
    (bce.EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (http.client.IncompleteRead(b""), True),
    (ValueError("bad"), False),
    (FileNotFoundError("x"), False),
])
def test_is_transient(exc, transient):
    assert storage.is_transient(exc) is transient


def test_retry_retries_transient_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert storage.retry(flaky, what="t", base_delay=0.001) == "ok" and len(calls) == 3


def test_retry_gives_up_and_raises_others_at_once():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("no")

    with pytest.raises(ValueError):
        storage.retry(broken, what="t", base_delay=0.001)
    assert len(calls) == 1
    with pytest.raises(StorageError, match=r"t: still failing after .* s and 3 attempts .*last cause: TimeoutError"):
        storage.retry(lambda: (_ for _ in ()).throw(TimeoutError()), what="t", attempts=3,
                      base_delay=0.001)


def test_join():
    assert storage.join("s3://b/p/", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("s3://b", "m.json") == "s3://b/m.json"
    assert storage.join("/d", "x") == os.path.join("/d", "x")
    assert storage.is_remote("https://h/x") and not storage.is_remote("/tmp/x")


def test_s3_remove_reports_keys_that_were_not_deleted(s3_server, monkeypatch):
    """delete_objects answers 200 and lists failed keys per key: that is an error, named."""
    url = f"{s3_server.url}/dir"
    storage.write_bytes(f"{url}/a", b"1")
    storage.write_bytes(f"{url}/b", b"2")
    client = storage.s3_client()
    real = client.delete_objects

    def partly_denied(**kwargs):
        answer = real(**kwargs)  # deletes everything but reports b as denied, like a policy
        answer["Errors"] = [{"Key": "dir/b", "Code": "AccessDenied", "Message": "Access Denied"}]
        return answer

    monkeypatch.setattr(client, "delete_objects", partly_denied)
    with pytest.raises(StorageError, match=r"cannot remove s3://.*/dir: 1 of 3 objects were not "
                                           r"deleted, e.g. s3://.*/dir/b: AccessDenied"):
        storage.remove(url)
