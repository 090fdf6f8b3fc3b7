"""The packed data set format: shard names, the manifest schema and its fingerprint.

`resnet pack` writes it and every reader relies on it, so this module is the single
definition of both sides. A packed data set is a directory (local or ``s3://``) holding

    {split}-{NNNNNN}.tar   WebDataset shards: <key>.jpg, <key>.cls (ASCII class index),
                           optionally <key>.json
    manifest.json          written last; its presence means the pack is complete

Manifest (format version 1)::

    {
      "format_version": 1,
      "layout": "imagenet",
      "classes": [{"index": 0, "id": "n01440764", "name": "tench"}, ...],
      "splits": {
        "train": {"samples": 1281167, "bytes": ..., "labelled": true,
                  "shards": [{"name": "train-000000.tar", "samples": 1000,
                              "bytes": 112345678, "sha256": "...",
                              "offsets": [0, 881152, ...]}, ...]},
        "val": {...}
      },
      "options": {"samples_per_shard": 1000, "seed": 0, "max_side": 0, "quality": 95},
      "skipped": [{"split": "train", "path": "...", "reason": "..."}],
      "fingerprint": "<sha256 of classes and shard contents>"
    }

A shard's `offsets` (optional: packs before it, and shards an earlier pack run kept, lack it)
are the byte offsets of the first tar header of samples 0, INDEX_STRIDE, 2 x INDEX_STRIDE, ...:
a reader that needs samples from i on starts at offsets[i // INDEX_STRIDE] instead of walking
the tar's headers from byte 0 (from S3, that walk reads every byte before i). They follow from
the shard's bytes, so the fingerprint leaves them out.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
META_EXT = "json"
INDEX_STRIDE = 8  # samples between indexed offsets: at most 7 samples read ahead of a start


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent."""


SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")  # shard_name's


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split of a member name: the key ends at the first dot of the
    basename. The extension keeps its case (readers lower it; `resnet verify` reports it)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    offsets: tuple[int, ...] = ()  # byte offset of every INDEX_STRIDE-th sample; () unknown

    @classmethod
    def from_dict(cls, doc: dict) -> "ShardInfo":
        return cls(**{**doc, "offsets": tuple(doc.get("offsets", ()))})

    def start(self, sample: int) -> tuple[int, int]:
        """(byte offset, sample index) of the nearest indexed sample at or before `sample`."""
        slot = min(sample // INDEX_STRIDE, len(self.offsets) - 1)
        return (self.offsets[slot], slot * INDEX_STRIDE) if slot >= 0 else (0, 0)


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]
    labelled: bool = True

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass(frozen=True)
class ClassInfo:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Manifest:
    layout: str
    classes: tuple[ClassInfo, ...]
    splits: dict[str, SplitInfo]
    options: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[dict[str, str], ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """Identifies the packed content: classes and every shard's name, count and checksum.

        Options and skipped files are left out on purpose: two packs with the same bytes in the
        same shards are the same data set, whatever command produced them.
        """
        content = {
            "classes": [[c.index, c.id] for c in self.classes],
            "splits": {
                split: [[s.name, s.samples, s.sha256] for s in info.shards]
                for split, info in sorted(self.splits.items())
            },
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"the packed data set has no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]

    def to_json(self) -> str:
        doc = {
            "format_version": self.format_version,
            "layout": self.layout,
            "classes": [asdict(c) for c in self.classes],
            "splits": {
                name: {
                    "samples": info.samples,
                    "bytes": info.bytes,
                    "labelled": info.labelled,
                    "shards": [asdict(s) for s in info.shards],
                }
                for name, info in self.splits.items()
            },
            "options": self.options,
            "skipped": list(self.skipped),
            "fingerprint": self.fingerprint,
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source} is not valid JSON: {exc}") from None
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{source} has format_version {version!r}; this resnet reads {FORMAT_VERSION}"
            )
        try:
            manifest = cls(
                layout=doc["layout"],
                classes=tuple(ClassInfo(**c) for c in doc["classes"]),
                splits={
                    name: SplitInfo(
                        shards=tuple(ShardInfo.from_dict(s) for s in info["shards"]),
                        labelled=info.get("labelled", True),
                    )
                    for name, info in doc["splits"].items()
                },
                options=doc.get("options", {}),
                skipped=tuple(doc.get("skipped", ())),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{source} is missing or has a malformed field: {exc}") from None
        stored = doc.get("fingerprint")
        if stored is not None and stored != manifest.fingerprint:
            raise ManifestError(f"{source}: stored fingerprint does not match its content")
        return manifest


def load_manifest(root: str) -> Manifest:
    """Read ``root/manifest.json`` (local path, s3:// or http(s)://)."""
    from resnet.data import storage

    url = storage.join(root, MANIFEST_NAME)
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError:
        raise ManifestError(
            f"no {MANIFEST_NAME} at {root}: not a packed data set, or its pack did not finish "
            f"(run `resnet pack` to create or complete it)"
        ) from None
    return Manifest.from_json(text, source=url)
