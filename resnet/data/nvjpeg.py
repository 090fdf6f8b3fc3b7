"""JPEG batches decoded on the device (nvJPEG through torchvision's batched decode_jpeg),
made safe for training.

- torchvision allocates the decoded images on the caller's current stream, but nvJPEG writes
  them from a stream of its own: memory that the previous batch's crops freed can be handed
  out again while kernels queued on our stream still read it. Waiting for our stream first
  closes that window (the batched call blocks the host until its images are written anyway);
  torchcodec does the same before its decodes.
- One JPEG that nvJPEG refuses fails the whole batch. The batch is then decoded one JPEG at a
  time, the CPU decoder takes what the device refuses, and only what neither reads is left
  out, counted like the CPU path's corrupt samples (a batch one sample short, never a missing
  batch, so every rank still takes part in every step).
- Deterministic mode (torch.use_deterministic_algorithms) makes torchvision's CUDA roi_align
  fall back to a Python kernel that samples the whole canvas for every output pixel: a batch
  takes hours. That combination is refused before training starts.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)


def check_deterministic(decode: str, device: torch.device | str) -> None:
    """Refuse data.decode=device on an accelerator when deterministic algorithms are on."""
    if decode == "device" and torch.device(device).type != "cpu" and \
            torch.are_deterministic_algorithms_enabled():
        raise ValueError(
            "data.decode=device cannot run with deterministic algorithms on "
            "(torch.use_deterministic_algorithms(True), as benchmarks/deterministic_train.py "
            "sets): torchvision's deterministic CUDA roi_align samples the whole image for "
            "every output pixel (hours per batch); use data.decode=cpu for deterministic runs")


def _wait_for_queued_work(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device | str,
                 cpu_decode: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[int]]:
    """The images (uint8 [3, H, W] RGB on `device`) and the indices of the JPEGs they come
    from: all of them, unless one fails both the device and `cpu_decode` (which raises
    ValueError or RuntimeError for data it cannot read)."""
    device = torch.device(device)
    _wait_for_queued_work(device)
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device), list(range(len(jpegs)))
    except RuntimeError as exc:
        log.warning("device decode of a batch of %d JPEGs failed (%s); decoding them one by "
                    "one", len(jpegs), str(exc).splitlines()[0] if str(exc) else type(exc))
    images, kept = [], []
    for i, jpeg in enumerate(jpegs):
        image = _decode_one(jpeg, device, cpu_decode)
        if image is not None:
            images.append(image)
            kept.append(i)
    return images, kept


def _decode_one(jpeg: torch.Tensor, device: torch.device,
                cpu_decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    try:
        return decode_jpeg([jpeg], mode=ImageReadMode.RGB, device=device)[0]
    except RuntimeError:
        pass
    try:
        image = cpu_decode(jpeg)
    except (ValueError, RuntimeError) as exc:
        log.warning("a JPEG of %d bytes that neither the device nor the CPU decodes: %s; "
                    "skipped", jpeg.numel(), exc)
        return None
    log.warning("a JPEG of %d bytes that the device refuses was decoded on the CPU",
                jpeg.numel())
    return image.to(device)
