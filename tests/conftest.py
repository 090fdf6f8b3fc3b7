"""Shared fixtures: a real S3 API on loopback (moto_server) and small generated source trees."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    exe = shutil.which("moto_server")
    if exe:
        return [exe, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


class MotoServer:
    """A `moto_server` process on a fixed loopback port that can be stopped and started again.

    `stop()` keeps the buckets' objects (read out before the process ends) and `start()` puts
    them back, so a test can cut the store off mid-stream and restore it on the same endpoint.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._saved: dict[str, dict[str, bytes]] = {}

    def _client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"})

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            _moto_command(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.terminate()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.1)
        self._restore()

    def stop(self) -> None:
        """End the process (connections are then refused); the data comes back on `start()`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._save()
        self.terminate()

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def _save(self) -> None:
        client = self._client()
        self._saved = {}
        for bucket in client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            objects = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", ()):
                    body = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
                    objects[obj["Key"]] = body
            self._saved[name] = objects

    def _restore(self) -> None:
        client = self._client()
        for name, objects in self._saved.items():
            client.create_bucket(Bucket=name)
            for key, body in objects.items():
                client.put_object(Bucket=name, Key=key, Body=body)
        self._saved = {}


class S3Handle:
    """What a test gets: the endpoint, a fresh bucket, and the server's stop/start."""

    def __init__(self, server: MotoServer, bucket: str) -> None:
        self.server = server
        self.endpoint = server.endpoint
        self.bucket = bucket
        self.url = f"s3://{bucket}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def client(self):
        return self.server._client()


@pytest.fixture(scope="session")
def _moto_server():
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.terminate()


@pytest.fixture
def s3_server(_moto_server, monkeypatch):
    """A running S3 API on 127.0.0.1 with a new empty bucket; AWS_* env points at it."""
    from resnet.data import storage

    _moto_server.start()  # a previous test may have left it stopped
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server.endpoint)
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Short timeouts so fault tests fail over quickly instead of hanging on a stopped server.
    monkeypatch.setenv("RESNET_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("RESNET_S3_READ_TIMEOUT", "10")
    storage.reset_clients()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    _moto_server._client().create_bucket(Bucket=bucket)
    yield S3Handle(_moto_server, bucket)
    _moto_server.start()
    storage.reset_clients()


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """An imagefolder tree: 3 classes, train 6 / val 2 per class, 32x24 px JPEGs."""
    from resnet.data import synthetic

    root = tmp_path / "src"
    synthetic.write_imagefolder(root, 3, {"train": 6, "val": 2}, size=(32, 24), seed=0)
    return root


@pytest.fixture
def tiny_imagenet_tree(tmp_path: Path):
    """A Kaggle-layout ImageNet tree with the oddities (gray, CMYK, PNG-as-JPEG, truncated)."""
    from resnet.data import synthetic

    return synthetic.write_imagenet_tree(
        tmp_path / "imagenet", num_classes=4, train_per_class=5, val_total=8,
        size=(40, 30), seed=1, oddities=True,
    )


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Tests never reach a real AWS account: no instance metadata lookups, no user profile."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
