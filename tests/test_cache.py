"""The node-local shard cache over a real S3 API on loopback (moto): filled once per node,
verified at every opening, least recently used evicted, a full disk streams instead."""
from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess

import pytest
import torch

from resnet.config import ConfigError, load_config
from resnet.data import format as fmt
from resnet.data import iostats
from resnet.data.cache import GB, ShardCache
from resnet.data.stream import AugmentParams, ShardLoader
from resnet.train.engine import SetupError
from resnet.train.preflight import preflight
from shards_helper import make_shards

AUG = AugmentParams(image_size=16)
SIZES = [9, 6, 11, 4, 7]


def upload(s3, local, prefix="ds"):
    client = s3.client()
    for path in sorted(local.iterdir()):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"{s3.url}/{prefix}"


@pytest.fixture
def dataset(tmp_path):
    return make_shards(tmp_path / "local", SIZES)


def shards(root):
    return fmt.load_manifest(str(root)).split("train").shards


def loader(source, cache=None, workers=2, rank=0, world=1):
    return ShardLoader(source, "train", rank=rank, world_size=world, batch_size=3,
                       global_batch=3 * world, workers=workers, seed=5, train=True,
                       augment=AUG, cache=cache)


def epoch(ld):
    """(keys, labels, images) of one epoch, and what it read."""
    batches = list(ld)
    got = ([k for b in batches for k in b.keys], torch.cat([b.labels for b in batches]),
           torch.cat([b.images for b in batches]))
    return got, ld.io_finished


def same(a, b):
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_each_shard_crosses_the_network_once_then_never(s3_server, dataset, tmp_path):
    url = upload(s3_server, dataset)
    total = sum(s.bytes for s in shards(dataset))
    reference, _ = epoch(loader(str(dataset)))
    cache = ShardCache(str(tmp_path / "cache"))
    ld = loader(url, cache)  # production defaults: 2 workers from the forkserver
    first, io1 = epoch(ld)
    second, io2 = epoch(ld)
    same(first, reference)
    # Both workers start on shards the other needs too: one download each, never two.
    assert io1.s3_bytes == total and io1.cache_fills == len(SIZES)
    assert (io2.s3_bytes, io2.s3_requests, io2.cache_fills) == (0, 0, 0)
    assert io2.cache_hits >= len(SIZES) and io2.cache_bytes > 0
    # A restarted job (a new loader, new worker processes) on the node starts warm.
    again = loader(url, ShardCache(str(tmp_path / "cache")), workers=0)
    _, io3 = epoch(again)
    assert io3.s3_bytes == 0 and io3.s3_requests == 0


def test_without_cache_s3_reads_are_counted(s3_server, dataset):
    url = upload(s3_server, dataset)
    _, io = epoch(loader(url))
    total = sum(s.bytes for s in shards(dataset))
    assert io.s3_bytes >= 0.5 * total and io.s3_requests >= 1  # partial reads: not all of it
    assert (io.cache_bytes, io.cache_hits, io.cache_fills) == (0, 0, 0)


def _open_in_process(args):
    directory, url, info, aws = args
    # The fork server may predate this test's S3 settings (it keeps the environment it
    # started with): take the test's endpoint and credentials.
    os.environ.update(aws)
    before = iostats.snapshot()
    with ShardCache(directory).open(url, info) as f:
        data = f.read()
    return len(data), (iostats.snapshot() - before).s3_bytes


def test_ranks_of_a_node_share_one_download(s3_server, dataset, tmp_path):
    url = upload(s3_server, dataset)
    info = max(shards(dataset), key=lambda s: s.bytes)
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    args = (str(tmp_path / "cache"), f"{url}/{info.name}", info,
            {**aws, "AWS_ENDPOINT_URL": s3_server.endpoint})
    with multiprocessing.get_context("forkserver").Pool(4) as pool:
        results = pool.map(_open_in_process, [args] * 4)
    assert [n for n, _ in results] == [info.bytes] * 4
    assert sum(b for _, b in results) == info.bytes  # one process downloaded, three waited


def test_corrupt_and_foreign_files_are_replaced_never_read(s3_server, dataset, tmp_path, caplog):
    url = upload(s3_server, dataset)
    cache = ShardCache(str(tmp_path / "cache"))
    infos = shards(dataset)
    reference, _ = epoch(loader(str(dataset), workers=0))
    epoch(loader(url, cache, workers=0))  # fill
    damaged = cache.path(infos[0])
    with open(damaged, "r+b") as f:  # one flipped byte inside a JPEG, same size
        f.seek(infos[0].bytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(cache.path(infos[1]), "wb") as f:  # another shard's bytes under this name
        f.write(open(cache.path(infos[2]), "rb").read())
    with open(cache.path(infos[3]), "r+b") as f:  # cut short
        f.truncate(100)
    caplog.set_level(logging.WARNING, logger="resnet.data.cache")
    got, io = epoch(loader(url, cache, workers=0))
    same(got, reference)
    assert io.s3_bytes == infos[0].bytes + infos[1].bytes + infos[3].bytes
    assert io.cache_fills == 3
    assert sum("is not shard" in r.message for r in caplog.records) == 3


def test_least_recently_used_shards_are_evicted_at_the_limit(s3_server, dataset, tmp_path):
    url = upload(s3_server, dataset)
    a, b, c, d = shards(dataset)[:4]
    limit = a.bytes + b.bytes + max(c.bytes, d.bytes) + 1
    cache = ShardCache(str(tmp_path / "cache"), limit_gb=limit / GB)

    def read(info):
        with cache.open(f"{url}/{info.name}", info) as f:
            f.read()

    for info in (a, b, c):
        read(info)
    read(a)  # a is used again: b is now the least recently used
    read(d)
    cached = {name for name in os.listdir(cache.directory) if name.endswith(".tar")}
    assert cached == {f"{x.sha256}.tar" for x in (a, c, d)}
    assert sum(os.path.getsize(os.path.join(cache.directory, n)) for n in cached) <= limit


@pytest.fixture
def tiny_disk(tmp_path):
    """A 128 KiB tmpfs: less than the data set, so the cache fills it; skipped without root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_evicts_or_streams_and_training_goes_on(s3_server, tmp_path, tiny_disk,
                                                          caplog):
    big = make_shards(tmp_path / "big", [4, 40, 6], size=(160, 120))  # one shard > the disk
    url = upload(s3_server, big, prefix="big")
    infos = shards(big)
    assert max(s.bytes for s in infos) > 128 * 1024 > min(s.bytes for s in infos)
    reference, _ = epoch(loader(str(big), workers=0))
    caplog.set_level(logging.WARNING, logger="resnet.data.cache")
    got, io = epoch(loader(url, ShardCache(str(tiny_disk)), workers=0))
    same(got, reference)
    assert any("streaming it from the source" in r.message for r in caplog.records)
    assert io.cache_fills >= 1 and io.cache_hits >= 1


def _config(tmp_path, data, *more):
    return load_config((), [f"data.train={data}", f"run.dir={tmp_path / 'run'}",
                           "train.batch_size=4", *more])


def test_bad_cache_settings_are_config_errors(tmp_path, dataset):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(SetupError, match=r"data\.cache_dir=.*not a writable directory"):
        preflight(_config(tmp_path, dataset, f"data.cache_dir={a_file}/cache"), world_size=1)
    largest = max(s.bytes for s in shards(dataset))
    with pytest.raises(SetupError, match=rf"data\.cache_limit_gb=.*{largest:,} bytes"):
        preflight(_config(tmp_path, dataset, f"data.cache_dir={tmp_path / 'c'}",
                          f"data.cache_limit_gb={largest / 2 / GB}"), world_size=1)
    with pytest.raises(ConfigError, match=r"data\.cache_limit_gb=-1 is negative"):
        preflight(_config(tmp_path, dataset, f"data.cache_dir={tmp_path / 'c'}",
                          "data.cache_limit_gb=-1"), world_size=1)
    preflight(_config(tmp_path, dataset, f"data.cache_dir={tmp_path / 'c'}",
                      f"data.cache_limit_gb={largest / GB}"), world_size=1)
