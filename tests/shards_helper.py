"""Tiny packed data sets written directly (tar + manifest), with corrupt samples on demand.

`resnet pack` refuses corrupt files, so the loader's handling of them needs shards written by
hand; the format and manifest come from `resnet.data.format` all the same.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from resnet.data import format as fmt
from resnet.data import synthetic

BAD = {
    "jpeg": lambda jpg, cls: {"jpg": b"\xff\xd8 not a jpeg at all", "cls": cls},
    "nojpg": lambda jpg, cls: {"cls": cls},
    "nocls": lambda jpg, cls: {"jpg": jpg},
    "badcls": lambda jpg, cls: {"jpg": jpg, "cls": b"x7"},
    "range": lambda jpg, cls: {"jpg": jpg, "cls": b"999"},
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_shards(root, sizes, *, split="train", num_classes=3, size=(32, 24), corrupt=None,
                seed=0, extra_splits=None) -> Path:
    """Shards of `sizes` samples; keys s{split}{n:05d}; corrupt: {sample number: BAD kind}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, sz in {split: sizes, **(extra_splits or {})}.items():
        splits[name] = fmt.SplitInfo(tuple(_write_split(root, name, sz, num_classes, size,
                                                         corrupt or {}, seed)))
    classes = tuple(fmt.ClassInfo(i, f"c{i}", f"class {i}") for i in range(num_classes))
    manifest = fmt.Manifest("imagefolder", classes, splits)
    (root / fmt.MANIFEST_NAME).write_text(manifest.to_json())
    return root


def _write_split(root, split, sizes, num_classes, size, corrupt, seed):
    rng = np.random.default_rng(seed)
    n = 0
    for index, count in enumerate(sizes):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                label = n % num_classes
                jpg = synthetic.encode_jpeg(synthetic.class_image(label, num_classes, size, rng))
                files = {"jpg": jpg, "cls": str(label).encode()}
                if n in corrupt:
                    files = BAD[corrupt[n]](jpg, files["cls"])
                for ext, data in files.items():
                    _add(tar, f"{split}{n:05d}.{ext}", data)
                n += 1
        data = buf.getvalue()
        name = fmt.shard_name(split, index)
        (root / name).write_bytes(data)
        yield fmt.ShardInfo(name, count, len(data), hashlib.sha256(data).hexdigest())
