"""`resnet bench data`: the shard loader's throughput against the original pipeline, and the
cost of resuming mid-epoch.

Throughput: the pipelines run on the same images (the shards' JPEGs, written out once as an
ImageFolder tree for the baseline), the same batch size and worker count, and are timed over
the same number of batches after a warm-up (worker start and the first prefetch excluded).
The baseline is the original project's: torchvision ImageFolder + PIL RandomResizedCrop + flip
+ ToTensor + Normalize in a shuffled DataLoader. Ours hands out uint8 and normalises on the
device, so the comparison is between what each feeds the training step. `--repeats N` runs
each pipeline N times in turn and reports medians (ratios taken within each repeat);
`--compare-decode-jpeg` adds the shard loader with torchvision.io.decode_jpeg at full scale
(the CPU path before simplejpeg and DCT scaling).

Resume cost: time from building a loader (manifest read included) to its first batch, fresh
versus with a state halfway through the epoch; the median of a few alternating runs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from resnet.data import augment
from resnet.data import format as fmt
from resnet.data import storage
from resnet.data.cache import ShardCache
from resnet.data.iostats import IOCounts
from resnet.data.shardio import read_samples
from resnet.data.stream import AugmentParams, ShardLoader


@dataclass
class Rate:
    images: int
    seconds: float
    io: Optional[IOCounts] = None  # what the timed batches read (the shard loader's runs)

    @property
    def per_s(self) -> float:
        return self.images / self.seconds


def _timed(batches, warmup: int, steps: int, count, read=lambda: None) -> Rate:
    """Skip `warmup` batches, then time `steps` batches; `count(batch)` gives its images,
    `read()` the I/O counts so far (the Rate gets those of the timed batches)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, images, before = time.perf_counter(), 0, read()
    for _ in range(steps):
        images += count(next(it))
    seconds, after = time.perf_counter() - start, read()
    return Rate(images, seconds, after - before if after is not None else None)


def _endless(loader: ShardLoader):
    for _ in range(1000):  # bounded: far more epochs than any benchmark needs
        yield from loader


def loader_rate(source: str, split: str, workers: int, batch_size: int, steps: int,
                warmup: int, image_size: int, cache_dir: str = "") -> Rate:
    loader = ShardLoader(source, split, rank=0, world_size=1, batch_size=batch_size,
                         global_batch=batch_size, workers=workers, seed=0, train=True,
                         augment=AugmentParams(image_size=image_size),
                         cache=ShardCache(cache_dir) if cache_dir else None)
    return _timed(_endless(loader), warmup, steps, lambda b: len(b), lambda: loader.io_total)


def describe_reads(rate: Rate, source: str, split: str) -> str:
    """The timed batches' reads, per image and against the data set's bytes per image."""
    info = fmt.load_manifest(source).split(split)
    per_image = info.bytes / max(1, info.samples)
    io = rate.io
    return (f"read {io.s3_bytes / 1e6:,.1f} MB in {io.s3_requests} requests from S3 "
            f"({io.s3_bytes / rate.images / per_image:.2f}x the data set's bytes per image), "
            f"{io.cache_bytes / 1e6:,.1f} MB from the shard cache ({io.cache_hits} openings, "
            f"{io.cache_fills} filled)")


def extract_imagefolder(source: str, split: str, dest: str) -> int:
    """Write the split's JPEGs as dest/<label>/<key>.jpg (the baseline's input); returns count."""
    manifest = fmt.load_manifest(source)
    n = 0
    for shard in manifest.split(split).shards:
        url = storage.join(source, shard.name)
        for _, key, files in read_samples(url, set(range(shard.samples)),
                                          shard_bytes=shard.bytes):
            label = files.get(fmt.LABEL_EXT, b"0").decode().strip()
            folder = os.path.join(dest, f"{int(label):05d}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, key.replace("/", "_") + ".jpg"), "wb") as f:
                f.write(files[fmt.IMAGE_EXT])
            n += 1
    return n


def baseline_rate(folder: str, workers: int, batch_size: int, steps: int, warmup: int,
                  image_size: int) -> Rate:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    data = datasets.ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)

    def endless():
        for _ in range(1000):
            yield from loader

    return _timed(endless(), warmup, steps, lambda b: len(b[1]))


def first_batch_seconds(source: str, split: str, workers: int, batch_size: int,
                        state: dict | None) -> float:
    start = time.perf_counter()
    loader = ShardLoader(source, split, rank=0, world_size=1, batch_size=batch_size,
                         global_batch=batch_size, workers=workers, seed=0, train=True)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    next(it)
    seconds = time.perf_counter() - start
    it.close()
    return seconds


def half_epoch_state(source: str, split: str, workers: int, batch_size: int) -> dict:
    """The state a run at this topology saves halfway through epoch 0."""
    loader = ShardLoader(source, split, rank=0, world_size=1, batch_size=batch_size,
                         global_batch=batch_size, workers=workers, seed=0, train=True)
    state = loader.state_dict()
    state["segments"] = [{"world_size": 1, "workers": max(1, workers),
                          "batch_size": batch_size, "batches": loader.batches_per_epoch // 2,
                          "dropped": 0}]
    return state


def resume_cost(source: str, split: str, workers: int, batch_size: int, repeats: int = 3):
    state = half_epoch_state(source, split, workers, batch_size)
    fresh, resumed = [], []
    for _ in range(repeats):  # alternate so machine load drifts hit both alike
        fresh.append(first_batch_seconds(source, split, workers, batch_size, None))
        resumed.append(first_batch_seconds(source, split, workers, batch_size, state))
    return statistics.median(fresh), statistics.median(resumed)


def run(args) -> int:
    """The CLI entry: prints one line per measurement."""
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; source {args.shards} "
          f"split {args.split}; workers {args.workers}, batch {args.batch_size}, "
          f"{args.steps} timed batches after {args.warmup}")
    if args.resume_cost:
        fresh, resumed = resume_cost(args.shards, args.split, args.workers, args.batch_size)
        n = fmt.load_manifest(args.shards).split(args.split).samples
        print(f"resume cost ({n} samples, resumed at 50%): first batch fresh {fresh:.2f} s, "
              f"resumed {resumed:.2f} s, ratio {resumed / fresh:.2f}")
        return 0
    runs = _throughput(args)
    for name, rates in runs.items():
        per_s = [r.per_s for r in rates]
        med = statistics.median(per_s)
        each = f" (runs: {', '.join(f'{x:.0f}' for x in per_s)})" if len(per_s) > 1 else ""
        print(f"{name}: {med:.0f} img/s ({med / max(1, args.workers):.0f} per worker){each}")
        if storage.is_remote(args.shards) and rates[-1].io is not None:
            print(f"  {name}, last run: {describe_reads(rates[-1], args.shards, args.split)}")
    base = runs.get(BASELINE)
    for name, rates in runs.items():
        if base and name != BASELINE:  # ratio within each repeat, then the median of those
            ratios = [o.per_s / b.per_s for o, b in zip(rates, base)]
            print(f"ratio {name} / {BASELINE}: {statistics.median(ratios):.2f}"
                  + (f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1
                     else ""))
    return 0


BASELINE = "ImageFolder + PIL"


@contextlib.contextmanager
def _decode_jpeg_only():
    """The CPU path as before simplejpeg: torchvision.io.decode_jpeg at full scale (workers
    fork, so they inherit the switch)."""
    saved, augment.simplejpeg = augment.simplejpeg, None
    try:
        yield
    finally:
        augment.simplejpeg = saved


def _throughput(args) -> dict[str, list[Rate]]:
    """Each pipeline once per repeat, in turn, so load drifts on a shared machine hit all."""
    tmp = None if args.no_baseline else tempfile.mkdtemp(prefix="resnet-bench-")
    runs: dict[str, list[Rate]] = {}
    timing = (args.workers, args.batch_size, args.steps, args.warmup, args.image_size)
    cache_dir = getattr(args, "cache_dir", "")
    try:
        if tmp:
            extract_imagefolder(args.shards, args.split, tmp)
        for _ in range(max(1, args.repeats)):
            runs.setdefault("shard loader", []).append(
                loader_rate(args.shards, args.split, *timing, cache_dir))
            if args.compare_decode_jpeg:
                with _decode_jpeg_only():
                    runs.setdefault("shard loader, decode_jpeg only", []).append(
                        loader_rate(args.shards, args.split, *timing))
            if tmp:
                runs.setdefault(BASELINE, []).append(baseline_rate(tmp, *timing))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return runs
