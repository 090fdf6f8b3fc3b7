"""Planning at ImageNet scale: one rank's plan, a resume at 50%, an elastic re-split mid-epoch.

    python benchmarks/bench_plan.py [--ranks 64] [--workers 8] [--global-batch 2048] [--repeat 5]

ImageNet-1k's train split as packed with 1,000 samples per shard: 1,281,167 samples in 1,282
shards. For each layout (64 ranks: 32 samples each; 48 ranks: 42/43, unequal) it times, median
of --repeat runs, with tracemalloc's peak: building one rank's schedule at the epoch start;
the same after a resume at 50% of the epoch; and after an elastic re-split 64 -> 56 -> 64 (a
third of the epoch on each, then the rest). Then, over ALL ranks, it checks arithmetically that
every position of the epoch is used exactly once, and counts the bytes the workers read for
what is left of the epoch (mean JPEG 110 KB). Each worker reads each of its runs (a stretch of
one tar, resnet/data/order.py) as one stream, from S3 without the node's cache starting at the
manifest's nearest indexed sample (every INDEX_STRIDE-th, resnet/data/format.py); from local
disk or the node's cache, exactly the run (the "needed" column). For comparison: reading each
run from its shard's byte 0 (a manifest packed before the offsets came). Both S3 columns count
the remote stream's read-ahead past a run's end (1 MiB blocks).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import tracemalloc


from resnet.data import intervals as I
from resnet.data import order as O
from resnet.data import plan as P
from resnet.data.format import INDEX_STRIDE
from resnet.envinfo import cpu_model

IMAGENET_TRAIN, SHARD = 1_281_167, 1_000
MEAN_SAMPLE_BYTES = 110_000  # ImageNet's mean JPEG
READ_AHEAD = 1 << 20  # storage.open_read's buffer for a remote stream


def segment(world: int, workers: int, global_batch: int, max_micro: int) -> P.Segment:
    return P.Segment.for_training(P.MicroLayout.choose(global_batch, world, max_micro), workers)


def measured(fn, repeat: int):
    """(median seconds, peak KiB of one call, result)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**10
    tracemalloc.stop()
    return statistics.median(times), peak, result


def scenarios(order, args, world):
    """name -> a function building rank 0's schedule in that state (fresh objects per call:
    the plan caches nothing across calls)."""
    g, k, micro = args.global_batch, args.workers, args.max_micro
    steps = P.usable(order.total, g, True) // g

    def fresh():
        return P.EpochPlan(order, g, True).resume(segment(world, k, g, micro))

    def at_half():
        ep = fresh()
        return ep.advance(steps // 2 * ep.current.accumulation)

    def resplit():
        ep = fresh()
        for other in (56, world):
            ep = ep.advance(steps // 3 * ep.current.accumulation)
            ep = ep.resume(segment(other, k, g, micro))
        return ep

    def schedule_of(build):
        def run():
            ep = build()
            ep.schedule(0)  # what rank 0 computes at start: the plan, then its workers' share
            return ep
        return run

    return {name: schedule_of(build) for name, build in (
        ("epoch start", fresh), ("resume at 50%", at_half),
        (f"re-split {world} -> 56 -> {world}", resplit))}


def check_exactly_once(ep: P.EpochPlan) -> tuple[int, int]:
    """(positions consumed or scheduled, positions the epoch keeps); raises on any overlap."""
    pieces = []
    for index, (base, seg) in enumerate(zip(ep.bases, ep.segments)):
        pieces += P.consumed(ep.order, base, seg, index, True, ep.global_batch)
    for rank in range(ep.current.world_size):
        for share in ep.schedule(rank):
            pieces += share.runs
    total = I.length(pieces)
    if I.length(I.normalise(pieces)) != total:
        raise AssertionError("a position is planned twice")
    kept = P.usable(ep.order.total, ep.global_batch, True) - sum(s.dropped for s in ep.segments)
    if total != kept:
        raise AssertionError(f"{total} positions planned, the epoch keeps {kept}")
    return total, kept


def remote_read(start: int, stop: int, size: int) -> int:
    """Bytes a remote stream opened at sample `start` reads to get through sample stop - 1 of a
    shard of `size` samples: whole read-ahead blocks, up to the shard's end."""
    want = (stop - start) * MEAN_SAMPLE_BYTES
    return min((size - start) * MEAN_SAMPLE_BYTES, -(-want // READ_AHEAD) * READ_AHEAD)


def run_bytes(ep: P.EpochPlan) -> tuple[int, int, int, int]:
    """(bytes needed, read from the nearest indexed sample, read from each shard's byte 0, runs
    opened) over all workers, for what is left of the epoch. A remote stream reads ahead in
    blocks of READ_AHEAD, so a run that ends inside a shard reads up to that much past it."""
    needed = indexed = from_zero = runs = 0
    for rank in range(ep.current.world_size):
        for share in ep.schedule(rank):
            for run in share.runs:
                shard, lo, hi = ep.order.locate(run)
                size = ep.order.sizes[shard]
                needed += (hi - lo) * MEAN_SAMPLE_BYTES
                indexed += remote_read(lo // INDEX_STRIDE * INDEX_STRIDE, hi, size)
                from_zero += remote_read(0, hi, size)
                runs += 1
    return needed, indexed, from_zero, runs


def order_cost(order: O.EpochOrder, repeat: int) -> float:
    """Median seconds to draw an epoch's shard order and the interleaving of each of 512
    workers' runs (2,500 samples in 4 runs: what all workers at 64 x 8 draw per epoch)."""
    def draw():
        O.EpochOrder(order.sizes, order.seed, order.epoch).shard_order
        for worker in range(512):
            O.merge([700, 1000, 500, 300], True, order.seed, order.epoch, 0, worker)
    return measured(draw, repeat)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 48])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=2048)
    parser.add_argument("--max-micro", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = tuple(P.split_counts(IMAGENET_TRAIN, -(-IMAGENET_TRAIN // SHARD)))
    order = O.EpochOrder(sizes, seed=0, epoch=3)
    print(f"# bench_plan: {IMAGENET_TRAIN:,} samples in {len(sizes):,} shards, global batch "
          f"{args.global_batch}, {args.workers} workers per rank; {cpu_model()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, median of {args.repeat}")
    print("| layout | state | rank 0's plan | peak memory | exactly once (all ranks) | "
          "needed | read from S3, indexed | read from byte 0 (no index) | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        layout = P.MicroLayout.choose(args.global_batch, world, args.max_micro).describe()
        for name, build in scenarios(order, args, world).items():
            seconds, peak, ep = measured(build, args.repeat)
            total, kept = check_exactly_once(ep)
            needed, indexed, from_zero, runs = run_bytes(ep)
            gib = lambda n: f"{n / 2**30:.1f} GiB ({n / needed:.3f}x)"  # noqa: E731
            print(f"| {layout} | {name} | {seconds * 1e3:.1f} ms | {peak:.0f} KiB | "
                  f"yes ({total:,} of {kept:,}) | {needed / 2**30:.1f} GiB | {gib(indexed)} | "
                  f"{gib(from_zero)} | {runs:,} |")
    seconds = order_cost(order, args.repeat)
    print(f"\nOrders: the shard order and 512 workers' interleavings of 2,500 samples: "
          f"{seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
