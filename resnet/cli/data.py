"""The data commands: `resnet pack`, `resnet verify`, `resnet bench data`."""
from __future__ import annotations

import argparse
import sys

from resnet.cli.command import Command


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the downloaded source tree")
    p.add_argument("dest", help="output: a local directory or s3://bucket/prefix")
    p.add_argument("--layout", required=True, choices=["imagenet", "tinyimagenet", "imagefolder"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale so the longer side is at most N px (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-to-shard order")
    p.add_argument("--splits", default="", help="comma-separated, e.g. train,val "
                   "(default: train,val; imagefolder: every folder)")
    p.add_argument("--strict", action="store_true", help="fail if any source file is skipped")
    p.add_argument("--fresh", action="store_true",
                   help="rewrite every shard, ignoring those an earlier run completed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _pack(args: argparse.Namespace) -> int:
    from resnet.data.pack import PackOptions, pack

    splits = tuple(s for s in (args.splits or "").split(",") if s)
    opts = PackOptions(samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                       quality=args.quality, workers=args.workers, seed=args.seed,
                       splits=splits, strict=args.strict, fresh=args.fresh)
    result = pack(args.src, args.dest, args.layout, opts, progress=not args.quiet)
    m = result.manifest
    for s in m.skipped:
        print(f"skipped {s['split']}/{s['path']}: {s['reason']}", file=sys.stderr)
    rate = result.files / max(result.seconds, 1e-9)
    mbps = result.in_bytes / 1e6 / max(result.seconds, 1e-9)
    counts = ", ".join(f"{n} {info.samples} samples in {len(info.shards)} shards"
                       for n, info in m.splits.items())
    print(f"packed {args.dest}: {counts}; {len(m.skipped)} skipped; "
          f"{result.shards_written} shards written, {result.shards_kept} kept; "
          f"{rate:.0f} img/s, {mbps:.1f} MB/s; fingerprint {m.fingerprint[:16]}")
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="a packed data set: local directory, s3:// or http(s)://")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--workers", type=int, default=4, help="shards checked in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _verify(args: argparse.Namespace) -> int:
    from resnet.data.verify import verify

    report = verify(args.dest, decode=args.decode, workers=args.workers,
                    progress=not args.quiet)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    print(f"verify {args.dest}: {report.shards} shards, {report.samples} samples: {verdict}")
    return 0 if report.ok else 1


def _bench_data_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("shards", metavar="SHARDS", help="a packed data set (local, s3://, http(s)://)")
    d.add_argument("--split", default="train")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=40, help="timed batches")
    d.add_argument("--warmup", type=int, default=4, help="batches before timing starts")
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--no-baseline", action="store_true", help="time the shard loader only")
    d.add_argument("--repeats", type=int, default=1,
                   help="run every pipeline this many times in turn; report medians")
    d.add_argument("--compare-decode-jpeg", action="store_true",
                   help="also time the loader decoding with torchvision.io.decode_jpeg only")
    d.add_argument("--resume-cost", action="store_true",
                   help="time to the first batch: fresh vs resumed at 50%% of the epoch")
    d.add_argument("--cache-dir", default="", help="a node-local shard cache for a remote "
                   "SHARDS (data.cache_dir); the S3 bytes and requests are printed either way")


def _bench_data(args: argparse.Namespace) -> int:
    from resnet.data.bench import run

    return run(args)


PACK = Command("pack", "pack an image data set into WebDataset shards + manifest",
               _pack_arguments, _pack)
VERIFY = Command("verify", "check every shard of a packed data set against its manifest",
                 _verify_arguments, _verify)
BENCH_DATA = Command("data", "shard loader img/s vs ImageFolder + PIL, or resume cost",
                     _bench_data_arguments, _bench_data)
