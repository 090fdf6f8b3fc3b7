"""Decode and augment: crop boxes and flips from (seed, epoch, key), CPU and device decoding.

Randomness is a pure function of (seed, epoch, sample key), never of a worker's RNG state, so a
resumed run, or a run with another number of workers, augments every sample identically.

Two paths share the same boxes:
- decode="cpu": workers decode (torchvision.io.decode_jpeg, PIL for what it refuses), crop,
  resize with antialiasing and flip; batches hold uint8 images.
- decode="device": workers only read each JPEG's header to draw its box; `decode_on_device`
  decodes the batch in one call (nvJPEG on CUDA) and crops + resizes every image with one
  `roi_align`. It runs on CPU too.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as F

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels


class DecodeError(ValueError):
    """The bytes are not an image either decoder can read."""


@dataclass(frozen=True)
class AugmentParams:
    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    eval_crop_ratio: float = 0.875  # eval resizes the shorter side to image_size / ratio

    def __post_init__(self) -> None:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not (0 < self.eval_crop_ratio <= 1):
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {self.eval_crop_ratio}")

    @classmethod
    def from_config(cls, data) -> "AugmentParams":
        """From a `resnet.config.DataConfig`."""
        return cls(data.image_size, (data.scale_min, data.scale_max),
                   (data.ratio_min, data.ratio_max), data.hflip, data.eval_crop_ratio)


# ----------------------------------------------------------------------------- boxes (pure)


def sample_random(seed: int, epoch: int, key: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_resized_box(width: int, height: int, p: AugmentParams, rnd: random.Random) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawing from `rnd`."""
    area = width * height
    lo, hi = math.log(p.ratio[0]), math.log(p.ratio[1])
    for _ in range(10):
        target = area * rnd.uniform(*p.scale)
        aspect = math.exp(rnd.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y, x = rnd.randint(0, height - h), rnd.randint(0, width - w)
            return (x, y, x + w, y + h)
    # Fallback to a central crop, as torchvision does.
    in_ratio = width / height
    if in_ratio < p.ratio[0]:
        w, h = width, int(round(width / p.ratio[0]))
    elif in_ratio > p.ratio[1]:
        w, h = int(round(height * p.ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return (x, y, x + w, y + h)


def train_view(width: int, height: int, p: AugmentParams, seed: int, epoch: int,
               key: str) -> tuple[Box, bool]:
    rnd = sample_random(seed, epoch, key)
    box = random_resized_box(width, height, p, rnd)
    return box, rnd.random() < p.hflip


def eval_resize(p: AugmentParams) -> int:
    return int(p.image_size / p.eval_crop_ratio)


def eval_box(width: int, height: int, p: AugmentParams) -> Box:
    """The source region that resize-shorter-side + center-crop keeps (for the device path)."""
    side = p.image_size * min(width, height) / eval_resize(p)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


# ----------------------------------------------------------------------------- CPU path


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_pil(data: bytes) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad data
        raise DecodeError(f"not a readable image: {exc}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def decode(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W]. decode_jpeg is the fastest here; PIL takes PNG/CMYK/odd files."""
    try:
        return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return _decode_pil(data)


def cpu_train(img: torch.Tensor, box: Box, flip: bool, size: int) -> torch.Tensor:
    x0, y0, x1, y1 = (int(v) for v in box)
    out = F.resize(img[:, y0:y1, x0:x1], [size, size], antialias=True)
    return out.flip(-1) if flip else out


def cpu_eval(img: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    out = F.resize(img, [eval_resize(p)], antialias=True)
    return F.center_crop(out, [p.image_size, p.image_size])


# ----------------------------------------------------------------------------- device path


def header(data: bytes) -> tuple[int, int, bool]:
    """(width, height, nvjpeg_ok) from the header alone, without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, img.format == "JPEG" and img.mode in ("RGB", "L")
    except Exception as exc:
        raise DecodeError(f"not a readable image: {exc}") from None


def for_device(data: bytes) -> tuple[torch.Tensor, int, int]:
    """JPEG bytes the device decoder accepts (PNG and CMYK re-encoded on CPU; rare), and size."""
    width, height, ok = header(data)
    if ok:
        return _as_tensor(data), width, height
    return encode_jpeg(decode(data), quality=95), width, height


def decode_on_device(batch, device: torch.device | str, params: AugmentParams) -> torch.Tensor:
    """uint8 [n, 3, S, S] on `device` from a decode="device" batch (jpegs, boxes, flips).

    One batched decode, then one roi_align over a zero-padded canvas for every crop+resize;
    sampling_ratio=0 averages ceil(box/out) samples per output pixel, which antialiases.
    """
    from torchvision.ops import roi_align

    size = params.image_size
    n = len(batch.jpegs)
    if n == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    images = decode_jpeg(list(batch.jpegs), mode=ImageReadMode.RGB, device=device)
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    canvas = torch.zeros(n, 3, hmax, wmax, dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        canvas[i, :, : im.shape[1], : im.shape[2]] = im
    index = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    rois = torch.cat([index, batch.boxes.to(device=device, dtype=torch.float32)], dim=1)
    out = roi_align(canvas, rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=0, aligned=True)
    flips = batch.flips.to(device)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)
