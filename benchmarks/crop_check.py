"""Device-decoded training crops against the CPU path's, on the same samples.

    python benchmarks/crop_check.py SHARDS [--batches 4] [--batch-size 64] [--image-size 224]
        [--bound 6.0] [--device cuda]

Both paths draw the same box and flip per sample (a function of seed, epoch and key); they
resample differently (CPU: libjpeg-turbo's DCT scaling, then an antialiased resize; device:
the full-size decode, then roi_align's averaging), so the crops differ by a few uint8 levels,
not more. A wrong box, a missed flip, swapped channels or a decoder that returns garbage
differ by tens. Prints one line, `crop check: mean |device - cpu| ...`, and exits 1 when the
mean absolute difference is above --bound (uint8 levels).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from resnet.data.device import DeviceFeed
from resnet.data.stream import AugmentParams, ShardLoader


def crops(data: str, decode: str, args, device: torch.device) -> list:
    loader = ShardLoader(data, "train", rank=0, world_size=1, batch_size=args.batch_size,
                         global_batch=args.batch_size, workers=0, seed=0, train=True,
                         augment=AugmentParams(image_size=args.image_size), decode=decode)
    return [(b.keys, b.images.cpu()) for b in
            itertools.islice(DeviceFeed(loader, device), args.batches)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bound", type=float, default=6.0, help="largest mean |difference| "
                   "accepted, in uint8 levels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu, dev = crops(args.data, "cpu", args, device), crops(args.data, "device", args, device)
    diffs = []
    for (keys_a, a), (keys_b, b) in zip(cpu, dev):
        if keys_a != keys_b:
            print(f"crop check: the two loaders gave other samples ({keys_a[:2]} ...)")
            return 1
        diffs.append((a.float() - b.float()).abs().flatten(1).mean(1))
    if not diffs:
        print(f"crop check: no batch of {args.batch_size} in {args.data}")
        return 1
    per_crop = torch.cat(diffs)
    mean, worst = per_crop.mean().item(), per_crop.max().item()
    verdict = "ok" if mean <= args.bound else "FAILED"
    print(f"crop check: mean |device - cpu| {mean:.2f} uint8 levels over {len(per_crop)} "
          f"crops of {args.image_size} px on {device} (worst crop {worst:.2f}), bound "
          f"{args.bound}: {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
