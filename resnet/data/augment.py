"""Decode and augment: crop boxes and flips from (seed, epoch, key), CPU and device decoding.

Randomness is a pure function of (seed, epoch, sample key), never of a worker's RNG state, so a
resumed run, or a run with another number of workers, augments every sample identically.

Two paths share the same boxes:
- decode="cpu": workers decode (simplejpeg's libjpeg-turbo at the smallest power-of-two DCT
  scale that keeps the crop at least the output size; torchvision.io.decode_jpeg, then PIL,
  for what it refuses or where simplejpeg is not installed), crop, resize with antialiasing
  and flip; batches hold uint8 images.
- decode="device": workers only read each JPEG's header to draw its box and hand the batch's
  JPEGs over as one byte buffer; `decode_on_device` decodes the batch in one call (nvJPEG on
  CUDA; resnet/data/nvjpeg.py makes it safe and falls back per JPEG) and crops + resizes each box straight into the output with `roi_align`, in memory
  bounded by the output batch plus the decoded images. It runs on CPU too.
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

from resnet.data.nvjpeg import decode_jpegs

try:  # libjpeg-turbo with DCT scaling, in a small wheel; without it decode_jpeg does all
    import simplejpeg
except ImportError:  # pragma: no cover - the package is in install_requires
    simplejpeg = None

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
    def from_config(cls, data, image_size: int = 0) -> "AugmentParams":
        """From a `resnet.config.DataConfig` (at data.image_size unless given)."""
        return cls(image_size or data.image_size, (data.scale_min, data.scale_max),
                   (data.ratio_min, data.ratio_max), data.hflip, data.eval_crop_ratio)

    @classmethod
    def for_epoch(cls, data, epoch: int) -> "AugmentParams":
        """Training augmentation of `epoch`: at the progressive-resizing size."""
        return cls.from_config(data, train_image_size(data, epoch))

    @classmethod
    def for_eval(cls, data) -> "AugmentParams":
        """Evaluation (and prediction, export): at data.eval_image_size, else image_size."""
        return cls.from_config(data, data.eval_image_size or data.image_size)


def ramp_size(min_size: int, max_size: int, start: int, end: int, epoch: int) -> int:
    """FFCV's progressive resizing: linear from min_size at epoch `start` to max_size at `end`,
    rounded to a multiple of 32; a pure function of the epoch (resume needs nothing saved)."""
    if epoch >= end:
        size = max_size
    elif epoch <= start:
        size = min_size
    else:
        size = min_size + (max_size - min_size) * (epoch - start) / (end - start)
    return max(32, int(round(size / 32)) * 32)


def train_image_size(data, epoch: int) -> int:
    """The training size of `epoch` under a `resnet.config.DataConfig`."""
    if not data.min_image_size:
        return data.image_size
    return ramp_size(data.min_image_size, data.image_size, data.resize_start_epoch,
                     data.resize_end_epoch, epoch)


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
    """The source region that `cpu_eval` keeps: torchvision's resize of the shorter side to
    eval_resize (the longer side rounded down) then its center crop (offsets rounded)."""
    short, long_ = sorted((width, height))
    new_short, new_long = eval_resize(p), int(eval_resize(p) * long_ / short)
    rw, rh = (new_short, new_long) if width <= height else (new_long, new_short)
    left = int(round((rw - p.image_size) / 2.0))
    top = int(round((rh - p.image_size) / 2.0))
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + p.image_size) * sx, (top + p.image_size) * sy)


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


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg decodes to RGB exactly (YCbCr, RGB, gray), from
    its header alone; None for anything else (CMYK, PNG, ...) or without simplejpeg."""
    if simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in ("YCbCr", "RGB", "Gray") else None


def decode_scaled(data: bytes, width: int, height: int, box: Box,
                  size: int) -> tuple[torch.Tensor, Box] | None:
    """uint8 [3, h, w] decoded at the smallest DCT scale 1/k (k = 1, 2, 4, 8) at which `box`
    (source pixels) still spans at least `size` pixels each way, and the box in its pixels.
    The IDCT, upsampling and colour conversion then work on 1/k^2 of the pixels; the box is
    the same region of the photo. Needs `jpeg_size(data)` to be (width, height); None where
    libjpeg-turbo refuses the data (the caller falls back to `decode`)."""
    x0, y0, x1, y1 = box
    k = next(k for k in (8, 4, 2, 1) if k == 1 or min(x1 - x0, y1 - y0) >= k * size)
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True,
                                     min_height=-(-height // k), min_width=-(-width // k))
    except ValueError:
        return None
    sx, sy = arr.shape[1] / width, arr.shape[0] / height
    img = torch.from_numpy(arr).permute(2, 0, 1)  # a view: no HWC -> CHW copy
    return img, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def cpu_train(img: torch.Tensor, box: Box, flip: bool, size: int) -> torch.Tensor:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out = F.resize(img[:, y0:y1, x0:x1], [size, size], antialias=True)
    return out.flip(-1) if flip else out


def cpu_eval(img: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    out = F.resize(img, [eval_resize(p)], antialias=True)
    return F.center_crop(out, [p.image_size, p.image_size])


def train_image(data: bytes, p: AugmentParams, seed: int, epoch: int, key: str) -> torch.Tensor:
    """The training view of one sample: uint8 [3, S, S]; its box and flip from train_view."""
    size = jpeg_size(data)
    if size is not None:
        box, flip = train_view(*size, p, seed, epoch, key)
        scaled = decode_scaled(data, *size, box, p.image_size)
        if scaled is not None:
            return cpu_train(*scaled, flip, p.image_size)
    img = decode(data)
    box, flip = train_view(img.shape[2], img.shape[1], p, seed, epoch, key)
    return cpu_train(img, box, flip, p.image_size)


def eval_image(data: bytes, p: AugmentParams) -> torch.Tensor:
    """The evaluation view: resize the shorter side to eval_resize, center crop S (decoded at a
    reduced DCT scale where the shorter side is at least twice eval_resize)."""
    size = jpeg_size(data)
    scaled = decode_scaled(data, *size, (0, 0, *size), eval_resize(p)) if size else None
    return cpu_eval(scaled[0] if scaled else decode(data), p)


# ----------------------------------------------------------------------------- device path


def header(data: bytes) -> tuple[int, int, bool]:
    """(width, height, nvjpeg_ok) from the header alone, without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, img.format == "JPEG" and img.mode in ("RGB", "L")
    except Exception as exc:
        raise DecodeError(f"not a readable image: {exc}") from None


def for_device(data: bytes) -> tuple[bytes, int, int]:
    """JPEG bytes the device decoder accepts (PNG and CMYK re-encoded on CPU; rare), and size."""
    width, height, ok = header(data)
    if ok:
        return data, width, height
    return encode_jpeg(decode(data), quality=95).numpy().tobytes(), width, height


def pack_jpegs(jpegs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """One contiguous uint8 buffer and int64 offsets [n + 1]: a batch crosses from a worker in
    two tensors (two shared-memory handles), not one per sample."""
    offsets = torch.zeros(len(jpegs) + 1, dtype=torch.int64)
    if jpegs:
        offsets[1:] = torch.tensor([len(j) for j in jpegs], dtype=torch.int64).cumsum(0)
    return torch.frombuffer(bytearray().join(jpegs) or bytearray(1), dtype=torch.uint8)[
        : int(offsets[-1])], offsets


def unpack_jpegs(buffer: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """Views of each JPEG in the buffer (no copies)."""
    bounds = offsets.numpy().tolist()  # host metadata: numpy() refuses a device tensor (no sync)
    return [buffer[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class _Piece:
    """Output rows [r0, r1) of image `i`: the source rows/columns they sample, and the box in
    the coordinates of that region."""

    i: int
    r0: int
    r1: int
    region: tuple[int, int, int, int]  # x0, y0, x1, y1 (integers, clipped to the image)
    box: Box


def _pieces(i: int, box: Box, width: int, height: int, size: int,
            budget: int) -> list[_Piece]:
    """Split image i's crop into bands of output rows whose float source region (3 channels,
    one replicated row and column added) holds at most `budget` elements; one band when the
    whole crop fits, and at least one output row per band."""
    x0, y0, x1, y1 = box
    rx0, rx1 = max(0, math.floor(x0) - 2), min(width, math.ceil(x1) + 2)
    row_h = (y1 - y0) / size  # source rows per output row
    per_row = 3 * (rx1 - rx0 + 1)  # elements per source row
    rows = max(1, min(size, int((budget / per_row - 6) / max(row_h, 1e-9))))  # + 4 + 1 + 1
    out = []
    for r0 in range(0, size, rows):
        r1 = min(size, r0 + rows)
        ya, yb = y0 + r0 * row_h, y0 + r1 * row_h
        ry0, ry1 = max(0, math.floor(ya) - 2), min(height, math.ceil(yb) + 2)
        out.append(_Piece(i, r0, r1, (rx0, ry0, rx1, ry1),
                          (x0 - rx0, ya - ry0, x1 - rx0, yb - ry0)))
    return out


def _fill(canvas: torch.Tensor, image: torch.Tensor, piece: _Piece) -> None:
    """Copy the piece's source region into `canvas` [3, H, W] (converting to float on the way)
    and repeat its last row and column once, so that samples in the image's last half pixel
    interpolate the edge rather than the zero padding."""
    rx0, ry0, rx1, ry1 = piece.region
    h, w = ry1 - ry0, rx1 - rx0
    canvas[:, :h, :w] = image[:, ry0:ry1, rx0:rx1]
    canvas[:, h, :w] = canvas[:, h - 1, :w]
    canvas[:, : h + 1, w] = canvas[:, : h + 1, w - 1]


def _to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small host-built tensor on `device` without a blocking copy (pinned, then async)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def decode_on_device(batch, device: torch.device | str, params: AugmentParams,
                     budget: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """uint8 [n, 3, S, S] on `device` from a decode="device" batch (jpegs + jpeg_offsets,
    boxes, flips), in memory bounded by the output batch plus the decoded images, and the
    indices of the batch's samples they are (all but those no decoder reads: nvjpeg.py).

    One batched decode (nvJPEG on CUDA, grayscale expanded to RGB), then each image's box is
    cropped and resized straight into the output by `roi_align` (sampling_ratio=0 averages
    ceil(box/out) samples per output pixel, which antialiases). Crops are gathered into float
    canvases of at most `budget` elements (default: the output batch's, n x 3 x S x S), one
    roi_align per canvas; a crop larger than the budget is resampled in bands of output rows,
    so no float tensor is larger than the output batch (or, for a crop so tall that one output
    row samples more than the budget, one such row band).
    """
    from torchvision.ops import roi_align

    size = params.image_size
    images, kept = decode_jpegs(unpack_jpegs(batch.jpegs, batch.jpeg_offsets), device,
                                lambda jpeg: decode(jpeg.numpy().tobytes()))
    n = len(images)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    if n == 0:
        return out, kept
    budget = budget or n * 3 * size * size
    boxes = batch.boxes[kept].numpy().tolist()  # host metadata from the workers: no sync
    flips = batch.flips[kept].numpy().tolist()
    pieces = [p for i, im in enumerate(images)
              for p in _pieces(i, tuple(boxes[i]), im.shape[2], im.shape[1], size, budget)]
    whole = [p for p in pieces if p.r1 - p.r0 == size]
    bands = [p for p in pieces if p.r1 - p.r0 < size]

    def place(group: list[_Piece], result: torch.Tensor) -> None:
        """Flip and store a canvas's results: one indexed copy for whole crops."""
        result = result.round_().clamp_(0, 255).to(torch.uint8)
        flip = _to_device([flips[p.i] for p in group], torch.bool, device)
        result = torch.where(flip[:, None, None, None], result.flip(-1), result)
        if group[0].r1 - group[0].r0 == size:
            out[_to_device([p.i for p in group], torch.int64, device)] = result
            return
        for k, p in enumerate(group):  # a band of output rows
            out[p.i, :, p.r0:p.r1] = result[k]

    def run(group: list[_Piece], rows: int) -> None:
        h = max(p.region[3] - p.region[1] for p in group) + 1
        w = max(p.region[2] - p.region[0] for p in group) + 1
        canvas = torch.zeros(len(group), 3, h, w, dtype=torch.float32, device=device)
        for k, p in enumerate(group):
            _fill(canvas[k], images[p.i], p)
        rois = _to_device([[k, *p.box] for k, p in enumerate(group)], torch.float32, device)
        place(group, roi_align(canvas, rois, output_size=(rows, size), spatial_scale=1.0,
                               sampling_ratio=0, aligned=True))

    # Whole crops, smallest first, into canvases that stay within the budget.
    whole.sort(key=lambda p: (p.region[3] - p.region[1], p.region[2] - p.region[0]))
    group: list[_Piece] = []
    h = w = 0
    for p in whole:
        ph, pw = p.region[3] - p.region[1] + 1, p.region[2] - p.region[0] + 1
        if group and (len(group) + 1) * 3 * max(h, ph) * max(w, pw) > budget:
            run(group, size)
            group, h, w = [], 0, 0
        group.append(p)
        h, w = max(h, ph), max(w, pw)
    if group:
        run(group, size)
    for p in bands:  # crops larger than the budget, one band of output rows at a time
        run([p], p.r1 - p.r0)
    return out, kept
