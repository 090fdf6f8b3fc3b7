"""The shard loader over a real S3 API on loopback (moto_server), with faults mid-epoch."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from resnet.data import remote, shardio, storage
from resnet.data.stream import AugmentParams, ShardLoader
from shards_helper import make_shards

AUG = AugmentParams(image_size=16)
SIZES = [9, 6, 11, 4]


def upload(s3, local, prefix="ds"):
    client = s3.client()
    for path in sorted(local.iterdir()):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"{s3.url}/{prefix}"


def keys_of(source, k=0, b=2, world=1, rank=0):
    ld = ShardLoader(source, "train", rank=rank, world_size=world, batch_size=b,
                     global_batch=world * b, workers=k, seed=3, train=True, augment=AUG)
    return [tuple(x.keys) for x in ld]


@pytest.fixture
def dataset(tmp_path):
    return make_shards(tmp_path / "local", SIZES)


def test_s3_reads_the_same_epoch_as_local(s3_server, dataset):
    url = upload(s3_server, dataset)
    local = keys_of(str(dataset), k=2)
    assert keys_of(url, k=2) == local
    assert keys_of(url, k=0, world=2, rank=1) == keys_of(str(dataset), k=0, world=2, rank=1)


def test_server_stopped_and_restarted_mid_epoch(s3_server, dataset):
    url = upload(s3_server, dataset)
    expected = keys_of(str(dataset), b=4)
    ld = ShardLoader(url, "train", rank=0, world_size=1, batch_size=4, global_batch=4,
                     workers=0, seed=3, train=True, augment=AUG)
    it = iter(ld)
    got = [tuple(next(it).keys)]
    s3_server.stop()  # the next shard's open now fails: connection refused
    restart = threading.Timer(1.5, s3_server.start)
    restart.start()
    try:
        got += [tuple(b.keys) for b in it]
    finally:
        restart.join(timeout=60)
    assert got == expected


class DroppingProxy:
    """A loopback TCP proxy that cuts the first `drops` connections after `limit` bytes back."""

    def __init__(self, upstream_port: int, limit: int = 5000, drops: int = 3):
        self.upstream, self.limit, self.drops = upstream_port, limit, drops
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.dropped, self.stopping = 0, False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            cut = self.dropped < self.drops
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            limit = self.limit if cut else None
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    def _pump(self, src, dst, limit):
        sent = 0
        try:
            for _ in range(100_000):  # bounded: far more chunks than any test moves
                data = src.recv(1024)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    self.dropped += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


def test_connections_dropped_mid_shard(s3_server, dataset, monkeypatch):
    url = upload(s3_server, make_shards(dataset.parent / "big", [40, 30], size=(96, 80)))
    expected = keys_of(str(dataset.parent / "big"), b=5)
    proxy = DroppingProxy(s3_server.server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    storage.reset_clients()
    try:
        assert keys_of(url, b=5) == expected
        assert proxy.dropped >= 1
    finally:
        proxy.close()


def test_missing_shard_on_s3_names_its_url(s3_server, dataset, monkeypatch):
    url = upload(s3_server, dataset)
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="ds/train-000002.tar")
    start = time.monotonic()
    with pytest.raises(shardio.ShardError, match=r"s3://.*/ds/train-000002\.tar"):
        keys_of(url, b=2)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("endpoint", ["refusing", "silent"])
def test_a_dead_endpoint_surfaces_within_the_deadline_naming_url_and_cause(
        s3_server, dataset, monkeypatch, endpoint):
    """One retry layer under data.io_timeout_s (3 s here): a port that refuses connections, or
    one that accepts and never answers (read timeout 1 s), fails the shard read with its URL
    and the last cause, said once (no retry layer wraps another) by a client that makes one
    attempt per call (botocore stacks none underneath). The clock is only a hang guard."""
    url = upload(s3_server, dataset)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if endpoint == "silent":
        listener.listen(64)  # accepts (the kernel does), never answers
    port = listener.getsockname()[1]
    if endpoint == "refusing":
        listener.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RESNET_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("RESNET_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("RESNET_IO_TIMEOUT_S", "3")
    storage.reset_clients()
    start = time.monotonic()
    try:
        with pytest.raises(shardio.ShardError, match=r"s3://.*/ds/train-000000\.tar.*still "
                                                     r"failing after .*data.io_timeout_s=3.*"
                                                     r"last cause: \w+") as caught:
            list(shardio.read_samples(f"{url}/train-000000.tar", {0}))
    finally:
        listener.close()
    assert str(caught.value).count("still failing after") == 1, caught.value
    assert remote.s3_client().meta.config.retries["total_max_attempts"] == 1
    assert time.monotonic() - start < 30  # data.io_timeout_s=3, not 120 s or forever
