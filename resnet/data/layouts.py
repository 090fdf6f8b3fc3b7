"""Source layouts: a downloaded tree -> classes and, per split, a list of (key, path, label).

Three layouts are read (see `LAYOUTS`):

- ``imagenet``: Kaggle's "ImageNet Object Localization Challenge" download. Class index = line
  order of ``LOC_synset_mapping.txt`` (sorted wnids, torchvision's order); train labels come
  from the folder; val labels from ``LOC_val_solution.csv`` (first wnid of PredictionString).
  ``LOC_train_solution.csv`` lists only the boxed images, so it is not used. ``test/`` has no
  labels and is never listed.
- ``tinyimagenet``: ``tiny-imagenet-200``. Class index = sorted wnid order (``wnids.txt`` is not
  sorted); names from ``words.txt``; val labels from ``val/val_annotations.txt``.
- ``imagefolder``: ``SRC/<split>/<class>/<file>``; class index = sorted class folder names over
  all splits, so indices do not depend on which splits are packed.

Every problem is a `LayoutError` naming the missing or wrong file, raised while listing, before
any shard is written. Listing only reads directories and label files; images are not opened.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from resnet.data.format import ClassInfo

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


class LayoutError(ValueError):
    """The source tree does not match the layout; the message names what is missing or wrong."""


@dataclass(frozen=True)
class Sample:
    key: str  # unique within its split; the source file's stem
    path: str  # absolute path of the source file
    label: int


@dataclass
class Listing:
    layout: str
    root: str
    classes: tuple[ClassInfo, ...]
    splits: dict[str, list[Sample]]  # split -> samples, in a stable (sorted by key) order
    labelled: dict[str, bool]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise LayoutError(f"{what} not found: {path}")
    return path


def _files(directory: Path) -> list[Path]:
    """Regular, non-hidden files of a directory, sorted (listing order varies by filesystem)."""
    with os.scandir(directory) as entries:
        return sorted(
            Path(e.path) for e in entries if e.is_file() and not e.name.startswith(".")
        )


def _key(path: Path) -> str:
    # WebDataset splits member names at the first dot, so keys must not contain one.
    return _KEY_UNSAFE.sub("_", path.name.split(".")[0])


def _check_unique(split: str, samples: list[Sample]) -> None:
    seen: dict[str, str] = {}
    for s in samples:
        if s.key in seen:
            raise LayoutError(
                f"split {split!r}: two files give the sample key {s.key!r}: {seen[s.key]} and "
                f"{s.path}; keys are file stems and must be unique within a split"
            )
        seen[s.key] = s.path


def _finish(layout, root, classes, splits, labelled) -> Listing:
    for split, samples in splits.items():
        if not samples:
            raise LayoutError(f"split {split!r} of {root} has no image files")
        samples.sort(key=lambda s: s.key)
        _check_unique(split, samples)
    return Listing(layout, str(root), tuple(classes), splits, labelled)


# ----------------------------------------------------------------------------- imagenet


def _read_synsets(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not re.fullmatch(r"n\d{8}", wnid):
            raise LayoutError(f"{path}:{n}: expected '<wnid> <names>', got {line!r}")
        pairs.append((wnid, name.strip()))
    if not pairs:
        raise LayoutError(f"{path} lists no classes")
    return pairs


def _imagenet_val_labels(path: Path, index: dict[str, int]) -> dict[str, int]:
    labels = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or {"ImageId", "PredictionString"} - set(reader.fieldnames):
            raise LayoutError(f"{path}: expected the columns ImageId,PredictionString")
        for row in reader:
            words = (row["PredictionString"] or "").split()
            if not words or words[0] not in index:
                raise LayoutError(
                    f"{path}: row {row['ImageId']!r} names no known wnid: {words[:1]}"
                )
            labels[row["ImageId"]] = index[words[0]]
    return labels


def list_imagenet(root: Path, splits: list[str]) -> Listing:
    synsets = _read_synsets(_require(root / "LOC_synset_mapping.txt", "class list"))
    classes = [ClassInfo(i, w, n) for i, (w, n) in enumerate(synsets)]
    index = {c.id: c.index for c in classes}
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    out: dict[str, list[Sample]] = {}
    for split in splits:
        if split == "train":
            out[split] = _imagenet_train(_require(data / "train", "train folder"), index)
        elif split == "val":
            labels = _imagenet_val_labels(
                _require(root / "LOC_val_solution.csv", "val labels"), index)
            out[split] = _labelled_by_stem(
                _require(data / "val", "val folder"), labels, root / "LOC_val_solution.csv")
        else:
            raise LayoutError(f"layout 'imagenet' has splits train and val, not {split!r}"
                              + (" (test has no labels)" if split == "test" else ""))
    return _finish("imagenet", root, classes, out, {s: True for s in out})


def _imagenet_train(train: Path, index: dict[str, int]) -> list[Sample]:
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise LayoutError(f"{train} has folders not in LOC_synset_mapping.txt: {unknown[:5]}")
    missing = sorted(set(index) - set(folders))
    if missing:
        raise LayoutError(
            f"{train} has no folder for {len(missing)} classes of LOC_synset_mapping.txt, "
            f"e.g. {missing[:5]}"
        )
    return [Sample(_key(p), str(p), index[wnid]) for wnid in folders for p in _files(train / wnid)]


def _labelled_by_stem(folder: Path, labels: dict[str, int], label_file: Path) -> list[Sample]:
    samples, unlabelled = [], []
    for p in _files(folder):
        stem = p.name.split(".")[0]
        if stem in labels:
            samples.append(Sample(_key(p), str(p), labels[stem]))
        else:
            unlabelled.append(p.name)
    if unlabelled:
        raise LayoutError(f"{label_file} has no label for {len(unlabelled)} files of {folder}, "
                          f"e.g. {unlabelled[:3]}")
    if len(samples) < len(labels):
        listed = set(labels) - {s.key for s in samples}
        raise LayoutError(f"{label_file} labels {len(listed)} files missing from {folder}, "
                          f"e.g. {sorted(listed)[:3]}")
    return samples


# ----------------------------------------------------------------------------- tinyimagenet


def list_tinyimagenet(root: Path, splits: list[str]) -> Listing:
    wnid_file = _require(root / "wnids.txt", "class list")
    wnids = sorted({w.strip() for w in wnid_file.read_text().split() if w.strip()})
    if not wnids:
        raise LayoutError(f"{wnid_file} lists no classes")
    names = {}
    for line in _require(root / "words.txt", "class names").read_text().splitlines():
        wnid, _, name = line.partition("\t")
        names[wnid.strip()] = name.strip()
    missing = [w for w in wnids if w not in names]
    if missing:
        raise LayoutError(f"{root / 'words.txt'} has no name for {missing[:5]}")
    classes = [ClassInfo(i, w, names[w]) for i, w in enumerate(wnids)]
    index = {c.id: c.index for c in classes}
    out: dict[str, list[Sample]] = {}
    for split in splits:
        if split == "train":
            train = _require(root / "train", "train folder")
            out[split] = []
            for wnid in wnids:
                images = _require(train / wnid / "images", f"train images of {wnid}")
                out[split] += [Sample(_key(p), str(p), index[wnid]) for p in _files(images)]
        elif split == "val":
            ann = _require(root / "val" / "val_annotations.txt", "val labels")
            labels = {}
            for n, line in enumerate(ann.read_text().splitlines(), 1):
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in index:
                    raise LayoutError(f"{ann}:{n}: expected '<file>\\t<wnid>...', got {line!r}")
                labels[fields[0].split(".")[0]] = index[fields[1]]
            out[split] = _labelled_by_stem(
                _require(root / "val" / "images", "val images"), labels, ann)
        else:
            raise LayoutError(f"layout 'tinyimagenet' has splits train and val, not {split!r}")
    return _finish("tinyimagenet", root, classes, out, {s: True for s in out})


# ----------------------------------------------------------------------------- imagefolder


def list_imagefolder(root: Path, splits: list[str]) -> Listing:
    split_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for split in splits:
        _require(root / split, f"split folder {split!r}")
    folders = sorted({c.name for s in split_dirs for c in (root / s).iterdir()
                      if c.is_dir() and not c.name.startswith(".")})
    if not folders:
        raise LayoutError(f"{root} has no class folders (expected {root}/<split>/<class>/<file>)")
    classes = [ClassInfo(i, f, f) for i, f in enumerate(folders)]
    index = {c.id: c.index for c in classes}
    out: dict[str, list[Sample]] = {}
    for split in splits:
        samples = [Sample(_key(p), str(p), index[c.name])
                   for c in sorted((root / split).iterdir()) if c.is_dir() and c.name in index
                   for p in _files(c)]
        if len({s.key for s in samples}) < len(samples):
            # Stems repeat across classes (0001.jpg in every folder): qualify by the folder.
            samples = [Sample(f"{_KEY_UNSAFE.sub('_', classes[s.label].id)}/{s.key}", s.path,
                              s.label) for s in samples]
        out[split] = samples
    return _finish("imagefolder", root, classes, out, {s: True for s in out})


# ----------------------------------------------------------------------------- entry point

LAYOUTS = {"imagenet": list_imagenet, "tinyimagenet": list_tinyimagenet,
           "imagefolder": list_imagefolder}
DEFAULT_SPLITS = {"imagenet": ["train", "val"], "tinyimagenet": ["train", "val"]}


def list_source(src: str | os.PathLike, layout: str, splits: list[str] | None = None) -> Listing:
    """List ``src`` as ``layout``; ``splits`` defaults to train+val (imagefolder: every folder)."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    root = Path(src).expanduser().absolute()
    if not root.is_dir():
        raise LayoutError(f"source folder not found: {root}")
    if not any(root.iterdir()):
        raise LayoutError(f"source folder is empty: {root}")
    if not splits:
        splits = DEFAULT_SPLITS.get(layout) or sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(set(splits)) != len(splits):
        raise LayoutError(f"splits repeat: {splits}")
    return LAYOUTS[layout](root, list(splits))
