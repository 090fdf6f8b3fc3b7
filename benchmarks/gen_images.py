"""An ImageNet-like imagefolder tree of photo-like JPEGs, generated on every core.

    python benchmarks/gen_images.py ROOT [--images 5000] [--classes 100] [--val-frac 0.1]
        [--size 500x375] [--workers N] [--plain]

`resnet.data.synthetic.write_imagefolder(..., realistic=True)` makes about 20-35 images/s on
one core (500x375, about 100 KB, like ImageNet's average), so 5,000 take minutes in one
process. Here each worker writes a part of every class with its own seed into its own tree,
and the parts are moved into ROOT/<split>/class_NNN/ with a part prefix on the file stem
(stems are sample keys and must be unique within a split). The same arguments always give the
same files. `--plain` writes the cheap stripe images instead (for tiny CPU checks).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _write_part(root: str, part: int, classes: int, per_class: dict, size, plain: bool) -> int:
    from resnet.data import synthetic

    part_root = Path(root) / f".part{part:03d}"
    synthetic.write_imagefolder(part_root, classes, per_class, size=size, seed=1000 + part,
                                realistic=not plain)
    moved = 0
    for path in sorted(part_root.rglob("*.jpg")):
        rel = path.relative_to(part_root)  # <split>/class_NNN/<stem>.jpg
        dest = Path(root) / rel.parent / f"p{part:03d}_{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        moved += 1
    shutil.rmtree(part_root)
    return moved


def generate(root: Path, images: int, classes: int, val_frac: float, size, workers: int,
             plain: bool = False) -> int:
    per_class = max(1, images // classes)
    val = int(round(per_class * val_frac))
    totals = {"train": per_class - val, "val": val}
    workers = max(1, min(workers, per_class))
    trains = _split_counts(totals["train"], workers)
    vals = _split_counts(totals["val"], workers)
    parts = [{k: v for k, v in (("train", t), ("val", v)) if v} for t, v in zip(trains, vals)]
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"gen_images: {root} is not empty; remove it or pick another ROOT")
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_write_part, str(root), i, classes, p, size, plain)
                   for i, p in enumerate(parts) if p]
        return sum(f.result() for f in futures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--images", type=int, default=5000, help="train + val images in all")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--size", default="500x375", help="WxH")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--plain", action="store_true", help="cheap stripe images, not photo-like")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
    n = generate(Path(args.root), args.images, args.classes, args.val_frac, (w, h),
                 args.workers, args.plain)
    seconds = time.perf_counter() - start
    total = sum(f.stat().st_size for f in Path(args.root).rglob("*.jpg"))
    print(f"gen_images: {n} JPEGs {w}x{h} in {args.root}, mean {total / max(n, 1) / 1e3:.0f} "
          f"KB, {seconds:.0f} s on {args.workers} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
