"""What reading shards from S3 costs, on moto over loopback: bytes, requests and img/s per epoch.

    python benchmarks/bench_s3.py [--data PACKED | --keep-data DIR] [--epochs 3] [--ranks 2]
        [--workers 2] [--images 1200] [--per-shard 100] [--size 200x150] [--image-size 64]
        [--batch 16] [--repeats 2]

Three sources in turn, the same packed data set, --repeats times: local disk, S3 without a
cache, and S3 with a node-local shard cache (a fresh directory each time, so epoch 1 fills
it). Each source is read for --epochs epochs by --ranks processes (the ranks of one node),
each a ShardLoader with --workers DataLoader workers from the forkserver, as training reads
it (rank r of world --ranks, global batch ranks x batch). Per epoch it prints, summed over the ranks: the bytes and GET requests
that reached S3, the bytes served by the cache, and the loader's img/s (all ranks' images over
the slowest rank's epoch time) in each repeat, and its ratio to local disk's in the same
repeat and epoch (the median over repeats): on a shared machine only same-run ratios mean
anything. S3 is moto's server in this process, on 127.0.0.1: it measures the protocol's
cost (requests, bytes, moto's own CPU), not a real network.

Without --data it packs --images generated photo-like JPEGs (synthetic.realistic_image, about
1/10 of ImageNet's pixels at the default size) into shards of --per-shard samples first.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from resnet.data import format as fmt
from resnet.data import storage
from resnet.data.cache import ShardCache
from resnet.data.iostats import IOCounts
from resnet.data.stream import AugmentParams, ShardLoader
from resnet.data.workers import worker_context
from resnet.envinfo import cpu_model

BUCKET = "bench"


def make_data(root: Path, images: int, per_shard: int, size: tuple[int, int]) -> Path:
    from resnet.data import synthetic
    from resnet.data.pack import PackOptions, pack

    classes = 10
    synthetic.write_imagefolder(root / "src", classes, {"train": images // classes}, size=size,
                                realistic=True)
    pack(str(root / "src"), str(root / "data"), "imagefolder",
         PackOptions(samples_per_shard=per_shard, workers=1, splits=("train",)),
         progress=False, log=lambda *a, **k: None)
    return root / "data"


def start_s3(data: Path) -> tuple[object, str]:
    """moto's S3 server on a free loopback port, with the data set uploaded."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.reset_clients()
    storage.s3_client().create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in data.iterdir() if p.is_file()):
        storage.upload_file(str(path), f"s3://{BUCKET}/data/{path.name}")
    return server, f"s3://{BUCKET}/data"


def rank_epochs(source: str, rank: int, opts, cache_dir: str, barrier, results) -> None:
    """One rank, in its own process: puts (rank, [(seconds, images, IOCounts list)] per epoch)."""
    loader = ShardLoader(source, "train", rank=rank, world_size=opts.ranks,
                         batch_size=opts.batch, global_batch=opts.ranks * opts.batch,
                         workers=opts.workers, seed=0, train=True,
                         augment=AugmentParams(image_size=opts.image_size),
                         cache=ShardCache(cache_dir) if cache_dir else None)
    start_forkserver()
    barrier.wait()
    out = []
    for _ in range(opts.epochs):
        start = time.perf_counter()
        images = sum(len(b) for b in loader)
        out.append((time.perf_counter() - start, images, loader.io_finished.as_list()))
    results.put((rank, out))


def start_forkserver() -> None:
    """Start the loader's worker server (it imports torch once per rank) before the timing:
    epoch 1 then shows what reading costs, not that start-up."""
    process = worker_context().Process(target=os.getpid)
    process.start()
    process.join()


def run_source(source: str, opts, cache_dir: str = "") -> list[tuple[float, IOCounts]]:
    """Per epoch: (img/s of all ranks, their summed I/O). Ranks are processes, not a pool's
    daemons: a rank starts DataLoader workers of its own."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(opts.ranks), context.Queue()
    procs = [context.Process(target=rank_epochs,
                             args=(source, r, opts, cache_dir, barrier, results))
             for r in range(opts.ranks)]
    for p in procs:
        p.start()
    try:
        ranks = dict(results.get(timeout=3600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    out = []
    for epoch in zip(*(ranks[r] for r in sorted(ranks))):
        seconds = max(s for s, _, _ in epoch)
        images = sum(n for _, n, _ in epoch)
        io = sum((IOCounts.from_list(c) for _, _, c in epoch), IOCounts())
        out.append((images / seconds, io))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="", help="a packed data set on local disk")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--size", default="200x150")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the three sources, "
                        "in turn; ratios are taken within each run, then the median")
    parser.add_argument("--keep-data", default="", help="pack the generated data set here "
                        "(reuse it with --data)")
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        data = Path(opts.data) if opts.data else make_data(
            Path(opts.keep_data) if opts.keep_data else tmp, opts.images, opts.per_shard,
            tuple(map(int, opts.size.split("x"))))
        split = fmt.load_manifest(str(data)).split("train")
        server, url = start_s3(data)
        print(f"# bench_s3: {split.samples} samples, {len(split.shards)} shards, "
              f"{split.bytes / 1e6:.1f} MB; {opts.ranks} ranks x {opts.workers} workers, batch "
              f"{opts.batch}, {opts.image_size} px; {cpu_model()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; S3: moto on loopback")
        runs: dict[str, list] = {}
        for repeat in range(opts.repeats):  # in turn, so load drifts on a shared VM hit all
            cache = tmp / f"cache-{repeat}"  # empty at each repeat: epoch 1 fills it
            for name, source, cache_dir in (("local disk", str(data), ""),
                                            ("S3, no cache", url, ""),
                                            ("S3, shard cache", url, str(cache))):
                runs.setdefault(name, []).append(run_source(source, opts, cache_dir))
        server.stop()
        report(runs, split.bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(runs: dict[str, list], data_bytes: int) -> None:
    """Per source and epoch: the I/O of the last repeat (the same in each), img/s of each
    repeat, and img/s as a ratio of local disk's in the same repeat and epoch."""
    print("| source | epoch | S3 bytes / data set | S3 requests | cache MB | img/s (each run) "
          "| / local disk |")
    print("|---|---|---|---|---|---|---|")
    for name, repeats in runs.items():
        for e in range(len(repeats[0])):
            io = repeats[-1][e][1]
            rates = [r[e][0] for r in repeats]
            ratios = [r[e][0] / local[e][0] for r, local in zip(repeats, runs["local disk"])]
            print(f"| {name} | {e + 1} | {io.s3_bytes / data_bytes:.3f}x "
                  f"({io.s3_bytes / 1e6:.1f} MB) | {io.s3_requests} | "
                  f"{io.cache_bytes / 1e6:.1f} | {', '.join(f'{x:.0f}' for x in rates)} | "
                  f"{statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
