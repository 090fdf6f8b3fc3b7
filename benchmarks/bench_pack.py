"""Packing throughput: copy mode and --max-side mode on a generated tree of realistic JPEGs.

    python benchmarks/bench_pack.py [--images 2000] [--workers N] [--max-side 256]

Generates an imagefolder tree of photo-like JPEGs (about 500x375, about 110 KB, like ImageNet's
average) in a temporary directory, then times only `resnet.data.pack.pack` (not the generation)
to a local directory, and prints img/s and MB/s (source bytes read per second). The source files
were just written, so they sit in the page cache: the figures are the packer's CPU cost, an
upper bound for a cold EBS volume.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

from resnet.data import synthetic
from resnet.data.pack import PackOptions, pack


def machine() -> str:
    import PIL

    from resnet.envinfo import cpu_model

    return (f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu_model()}; "
            f"Python {platform.python_version()}, Pillow {PIL.__version__}")


def run(src: str, out: str, opts: PackOptions) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = pack(src, out, "imagefolder", opts, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return result.files / seconds, result.in_bytes / 1e6 / seconds, result.files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--size", default="500x375", help="WxH of the generated images")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    print(f"# bench_pack: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        t = time.perf_counter()
        per_class = max(1, args.images // args.classes)
        synthetic.write_imagefolder(src, args.classes, {"train": per_class}, size=(w, h),
                                    seed=0, quality=90, realistic=True)
        n = per_class * args.classes
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
        print(f"# generated {n} JPEGs {w}x{h}, mean {total / n / 1e3:.0f} KB, "
              f"in {time.perf_counter() - t:.0f} s (not timed)")
        base = dict(samples_per_shard=args.samples_per_shard, workers=args.workers)
        for label, opts in (("copy", PackOptions(**base)),
                            (f"max-side {args.max_side}",
                             PackOptions(**base, max_side=args.max_side, quality=90))):
            rate, mbps, files = run(src, out, opts)
            print(f"{label:<14} workers={args.workers}  {files} images  "
                  f"{rate:8.0f} img/s  {mbps:7.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
