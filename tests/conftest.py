"""Shared fixtures: a real S3 API on loopback (moto's server) and small generated source trees."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
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


def _free_port_below_ephemeral() -> int:
    """A free port under Linux's ephemeral range (32768+), which client connections take their
    local ports from: one of them could hold ours while the server is stopped."""
    import random

    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return _free_port()


class MotoServer:
    """moto's S3 server on a fixed loopback port, in a thread of the test process, that can be
    stopped (connections refused) and started again on the same endpoint.

    moto keeps its buckets in this process's memory, so they outlive a stop: a started server
    serves them from its first request (a `moto_server` process would have to be refilled
    after it listens, and a client retrying in between would see its buckets missing).
    """

    def __init__(self) -> None:
        self.port = _free_port_below_ephemeral()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._connections: set[socket.socket] = set()

    def _client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"})

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        if self._server is not None:
            return
        app = DomainDispatcherApplication(create_backend_app)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:  # bound here, so a port still held is an error here, not in the thread
                self._server = make_server("127.0.0.1", self.port, app, threaded=True)
                break
            except (OSError, SystemExit):  # werkzeug exits when the port is taken
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server could not listen on {self.endpoint}")
                time.sleep(0.1)
        accept = self._server.get_request

        def get_request():  # remembered, so that stop() cuts them as a dying process would
            connection, address = accept()
            self._connections.add(connection)
            return connection, address

        self._server.get_request = get_request
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop serving, cut open connections and close the port: connections are refused
        until `start()`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        for connection in self._connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        self._connections.clear()
        self._server = None

    terminate = stop


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
        server.stop()


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


def _logger_state(logger: logging.Logger) -> tuple:
    return list(logger.handlers), logger.propagate, logger.level


# As the process found it, before any test: a module- or session-scoped fixture may run a
# command in-process too, outside any one test.
_PRISTINE_LOGGER = _logger_state(logging.getLogger("resnet"))


@pytest.fixture(autouse=True)
def _product_logger_restored():
    """A command run in-process (cli.main) configures the `resnet` logger for a terminal:
    its own handler, propagation off. caplog listens at the root, so each test starts and
    ends with the logger as the process found it."""
    logger = logging.getLogger("resnet")

    def restore() -> None:
        handlers, logger.propagate, logger.level = _PRISTINE_LOGGER
        logger.handlers[:] = handlers

    restore()
    yield
    restore()


def pytest_collection_modifyitems(config, items):
    """The multi-process tests (marked slow) first, each module's in their order: under
    pytest-xdist (pytest.ini's -n) the long runs then start at once on every worker and the
    short tests fill the gaps, instead of one long test starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
