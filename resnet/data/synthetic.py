"""Procedurally generated, labelled images in the three source layouts `resnet pack` reads.

Used by the tests, the benchmarks and the quickstart, so the API below is kept stable:

    class_image(label, num_classes, size=(W, H), rng) -> np.ndarray   (H, W, 3) uint8
    realistic_image(label, num_classes, size=(500, 375), rng) -> np.ndarray
    encode_jpeg(array, quality=90, mode="RGB") -> bytes
    write_imagefolder(root, num_classes, per_class, size=(W, H), seed=0, quality=90,
                      realistic=False) -> SyntheticTree
    write_imagenet_tree(root, num_classes, train_per_class, val_total, size=(W, H), seed=0,
                        oddities=False, quality=90, realistic=False) -> SyntheticTree
    write_tinyimagenet_tree(root, num_classes, train_per_class, val_per_class, size=(64, 64),
                            seed=0, oddities=False, quality=90) -> SyntheticTree

Each class is a distinct, noisy pattern: a class hue, a stripe orientation and a stripe
frequency, with random phase, scale and angle jitter and pixel noise. The whole image carries
the pattern, so RandomResizedCrop keeps the signal and a small CNN learns it in a minute or two.
Realistic images (about 500x375, about 110 KB at quality 90) add multi-scale texture so JPEG
sizes and decode costs resemble ImageNet's.

With ``oddities=True`` the ImageNet and TinyImageNet trees also hold the files that trouble real
packs (all in train, keys in ``SyntheticTree.oddities``): ``gray`` (grayscale JPEG), ``cmyk``
(CMYK JPEG), ``png`` (a PNG named .JPEG) and ``truncated`` (a JPEG cut short).
"""
from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

GOLDEN = 0.6180339887498949
ODDITIES = ("gray", "cmyk", "png", "truncated")


@dataclass
class SyntheticTree:
    """What a writer produced: enough for tests to check labels and names against the source."""

    root: Path
    classes: list[tuple[str, str]]  # (wnid or folder, name), in class-index order
    labels: dict[str, dict[str, int]]  # split -> key -> class index (the truth packing must keep)
    oddities: dict[str, str] = field(default_factory=dict)  # kind -> key (train split)

    def count(self, split: str) -> int:
        return len(self.labels.get(split, {}))


# ----------------------------------------------------------------------------- pixels


def _class_params(label: int) -> tuple[tuple[float, float, float], float, float]:
    # Golden-ratio spacing keeps hues and angles of neighbouring classes far apart.
    hue = (label * GOLDEN) % 1.0
    color = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    angle = ((label * GOLDEN * 2.0) % 1.0) * math.pi
    freq = 3.0 + (label % 4) * 2.5  # stripes per image height
    return color, angle, freq


def _stripes(label: int, w: int, h: int, rng: np.random.Generator):
    color, angle, freq = _class_params(label)
    angle += rng.uniform(-0.15, 0.15)
    freq *= rng.uniform(0.8, 1.25)  # scale jitter
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / float(min(w, h))
    phase = rng.uniform(0, 2 * math.pi)  # position jitter
    wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    base = np.asarray(color, dtype=np.float32) * 255.0
    return base[None, None, :] * (0.55 + 0.45 * wave[..., None])


def class_image(label: int, num_classes: int, size=(64, 64), rng=None) -> np.ndarray:
    """A (H, W, 3) uint8 image of class ``label``: stripes in the class hue plus noise.

    Classes are spaced by the golden ratio, so ``num_classes`` (the makers' common signature)
    does not change the image."""
    rng = rng if rng is not None else np.random.default_rng(label)
    w, h = size
    img = _stripes(label, w, h, rng)
    img += rng.normal(0.0, 14.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _coarse_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Smooth noise in [-0.5, 0.5]: a ``cells``-wide random grid upsampled bicubically."""
    rows = max(1, cells * h // w)
    small = rng.random(size=(rows, cells, 3))
    grid = Image.fromarray((small * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255 - 0.5


def realistic_image(label: int, num_classes: int, size=(500, 375), rng=None) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: class stripes under multi-scale texture and grain.

    At quality 90 a 500x375 image encodes to about 110 KB, like an average ImageNet JPEG.
    """
    rng = rng if rng is not None else np.random.default_rng(label)
    w, h = size
    img = _stripes(label, w, h, rng) * 0.7
    for cells, amp in ((4, 90.0), (16, 50.0), (64, 60.0), (160, 60.0)):
        img += amp * _coarse_noise(rng, w, h, cells)
    img += rng.normal(0.0, 19.0, size=img.shape).astype(np.float32)  # sensor grain
    return np.clip(img + 40.0, 0, 255).astype(np.uint8)


def encode_jpeg(array: np.ndarray, quality: int = 90, mode: str = "RGB") -> bytes:
    """JPEG bytes of an RGB array, stored as ``mode`` (RGB, L or CMYK)."""
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _odd_bytes(kind: str, array: np.ndarray, quality: int) -> bytes:
    if kind == "gray":
        return encode_jpeg(array, quality, "L")
    if kind == "cmyk":
        return encode_jpeg(array, quality, "CMYK")
    if kind == "png":
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()
    if kind == "truncated":
        data = encode_jpeg(array, quality)
        return data[: len(data) * 2 // 3]
    raise ValueError(f"unknown oddity {kind!r}; known: {ODDITIES}")


class _Writer:
    """Writes one image file per call, with the class pattern chosen by the generator mode."""

    def __init__(self, num_classes: int, size, seed: int, quality: int, realistic: bool):
        self.num_classes, self.size, self.quality = num_classes, tuple(size), quality
        self.rng = np.random.default_rng(seed)
        self.make = realistic_image if realistic else class_image

    def write(self, path: Path, label: int, oddity: str = "") -> None:
        array = self.make(label, self.num_classes, self.size, self.rng)
        data = _odd_bytes(oddity, array, self.quality) if oddity else encode_jpeg(
            array, self.quality)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ----------------------------------------------------------------------------- layouts


def write_imagefolder(root, num_classes: int, per_class: dict[str, int], size=(64, 64),
                      seed: int = 0, quality: int = 90, realistic: bool = False) -> SyntheticTree:
    """``root/<split>/class_NNN/<class>_<i>.jpg``; class index = sorted folder name order."""
    root = Path(root)
    writer = _Writer(num_classes, size, seed, quality, realistic)
    classes = [(f"class_{c:03d}", f"class {c}") for c in range(num_classes)]
    labels: dict[str, dict[str, int]] = {}
    for split, count in per_class.items():
        labels[split] = {}
        for c, (folder, _) in enumerate(classes):
            for i in range(count):
                key = f"{folder}_{split}_{i:05d}"
                writer.write(root / split / folder / f"{key}.jpg", c)
                labels[split][key] = c
    return SyntheticTree(root, classes, labels)


def _wnids(num_classes: int) -> list[str]:
    # Increasing numbers, so sorted order is index order, like the real synset list.
    return [f"n{1440764 + 104729 * c:08d}" for c in range(num_classes)]


def write_imagenet_tree(root, num_classes: int, train_per_class: int, val_total: int,
                        size=(64, 48), seed: int = 0, oddities: bool = False,
                        quality: int = 90, realistic: bool = False) -> SyntheticTree:
    """The Kaggle "ImageNet Object Localization Challenge" tree, ``num_classes`` classes."""
    root = Path(root)
    writer = _Writer(num_classes, size, seed, quality, realistic)
    wnids = _wnids(num_classes)
    classes = [(w, f"synthetic class {c}, thing {c}") for c, w in enumerate(wnids)]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in classes))
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    labels: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    odd_slots = _odd_slots(oddities, num_classes, train_per_class)
    found: dict[str, str] = {}
    for c, wnid in enumerate(wnids):
        for i in range(train_per_class):
            key = f"{wnid}_{i + 1}"
            kind = odd_slots.get((c, i), "")
            writer.write(data / "train" / wnid / f"{key}.JPEG", c, kind)
            labels["train"][key] = c
            if kind:
                found[kind] = key
    rows = []
    for i in range(val_total):
        key, c = f"ILSVRC2012_val_{i + 1:08d}", int(writer.rng.integers(num_classes))
        writer.write(data / "val" / f"{key}.JPEG", c)
        labels["val"][key] = c
        # The real PredictionString lists every box: "wnid x1 y1 x2 y2 wnid x1 y1 x2 y2 ".
        rows.append(f"{key},{wnids[c]} 1 2 30 40 {wnids[c]} 3 4 20 22 \n")
    writer.rng.shuffle(rows)  # the real CSV is not in file order
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    boxed = [k for k in labels["train"]][::3]
    (root / "LOC_train_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{k},{k.split('_')[0]} 1 1 9 9 \n" for k in boxed))
    for i in range(2):  # test images: no labels, never packed
        writer.write(data / "test" / f"ILSVRC2012_test_{i + 1:08d}.JPEG", 0)
    return SyntheticTree(root, classes, labels, found)


def _odd_slots(enabled: bool, num_classes: int, per_class: int) -> dict[tuple[int, int], str]:
    """Which (class, index) train images get which oddity: spread over the classes."""
    if not enabled:
        return {}
    if num_classes * per_class < len(ODDITIES):
        raise ValueError(f"oddities need at least {len(ODDITIES)} train images")
    slots = [(c, i) for i in range(per_class) for c in range(num_classes)]
    return {slots[j]: kind for j, kind in enumerate(ODDITIES)}


def write_tinyimagenet_tree(root, num_classes: int, train_per_class: int, val_per_class: int,
                            size=(64, 64), seed: int = 0, oddities: bool = False,
                            quality: int = 90) -> SyntheticTree:
    """The ``tiny-imagenet-200`` tree; ``wnids.txt`` is deliberately not sorted (as the real one)."""
    root = Path(root)
    writer = _Writer(num_classes, size, seed, quality, realistic=False)
    wnids = _wnids(num_classes)  # index order = sorted order
    classes = [(w, f"tiny thing {c}, object {c}") for c, w in enumerate(wnids)]
    root.mkdir(parents=True, exist_ok=True)
    listed = list(wnids)
    writer.rng.shuffle(listed)
    if listed == sorted(listed) and len(listed) > 1:
        listed.reverse()
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in listed))
    # words.txt covers all of WordNet in the real download: add unrelated entries.
    words = [(f"n{99000000 + k:08d}", f"unrelated {k}") for k in range(3)] + classes
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words))
    labels: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    odd_slots = _odd_slots(oddities, num_classes, train_per_class)
    found: dict[str, str] = {}
    for c, wnid in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            key = f"{wnid}_{i}"
            kind = odd_slots.get((c, i), "")
            writer.write(root / "train" / wnid / "images" / f"{key}.JPEG", c, kind)
            labels["train"][key] = c
            boxes.append(f"{key}.JPEG\t0\t0\t10\t10\n")
            if kind:
                found[kind] = key
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for i in range(val_per_class * num_classes):
        key, c = f"val_{i}", i % num_classes
        writer.write(root / "val" / "images" / f"{key}.JPEG", c)
        labels["val"][key] = c
        annotations.append(f"{key}.JPEG\t{wnids[c]}\t0\t0\t10\t10\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    writer.write(root / "test" / "images" / "test_0.JPEG", 0)
    return SyntheticTree(root, classes, labels, found)
