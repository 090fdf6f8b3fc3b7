"""The device side of a batch: what happens to a batch once it leaves the loader, the same for
training, evaluation, benchmarks and `resnet predict`.

- `normalize`: uint8 images on the device -> normalised float (mean and std copied to each
  device once per process, never per batch).
- `batch_images`: a batch's images on the device, copied (data.decode=cpu) or decoded there
  from the JPEG bytes and crop boxes the workers handed over (data.decode=device).
- `DeviceFeed`: batches on the device without a host-device sync. On CUDA a background thread
  pulls the next batches (reads them from the loader, and with data.decode=device decodes and
  crops them: nvJPEG's batched call blocks its host thread) and copies them on a side CUDA
  stream of its own while the training thread launches the current step. On a CPU it is a
  plain iterator.

The loader's state moves when a batch leaves it, and the feed takes batches before the
trainer uses them (up to two ahead on CUDA; the trainer itself fetches step k+1's
micro-batches before it acts on step k's agreed stop/save, unless it has a stop signal). A
checkpoint must record the batches the *trained* steps used, so the feed stands in for the
loader in the checkpoint: `mark()` after each optimizer step records the loader's state as of
the batches handed out so far, and `state_dict()` returns that marked state (the live one once
an epoch's batches are all out).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Optional

import torch

from resnet.data.augment import decode_on_device
from resnet.data.nvjpeg import check_deterministic

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255
STD = torch.tensor([0.229, 0.224, 0.225]) * 255

_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as [1,3,1,1] on `device`, copied there once per process (not per batch)."""
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (MEAN.to(device).view(1, 3, 1, 1), STD.to(device).view(1, 3, 1, 1))
    return _ON_DEVICE[device]


def normalize(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 [N,3,H,W] on the device -> normalised float; done on the device, not in workers.
    One float tensor, in the wanted memory format, normalised in place."""
    mean, std = _mean_std(images.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(dtype=torch.float32, memory_format=layout, copy=True)  # never the input
    return x.sub_(mean).div_(std)


def batch_images(batch, device: torch.device, params) -> tuple[torch.Tensor, list[int] | None]:
    """The batch's uint8 images on the device: copied (data.decode=cpu: workers decoded them)
    or decoded there from the JPEG bytes and crop boxes the workers handed over (=device);
    and the indices of the samples they are (None: all)."""
    if batch.images is not None:
        return batch.images.to(device, non_blocking=True), None
    images, kept = decode_on_device(batch, device, params)
    return images, (None if len(kept) == len(batch) else kept)


class DeviceFeed:
    def __init__(self, loader, device: torch.device | str,
                 lookahead: Optional[bool] = None) -> None:
        """`lookahead`: pull batches in a background thread (default: on CUDA, where the
        decode and copy then overlap the step)."""
        self.loader, self.device = loader, torch.device(device)
        check_deterministic(loader.decode, self.device)  # before any work
        cuda = self.device.type == "cuda"
        self.lookahead = cuda if lookahead is None else lookahead
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self._handed: Optional[dict] = None  # loader state after the last batch handed out
        self._marked: Optional[dict] = None  # ... as of the last mark(); None: the live state

    # -- the checkpointed state -----------------------------------------------------------
    def mark(self) -> None:
        """The batches handed out so far are trained: a checkpoint from now on records them."""
        self._marked = self._handed

    def state_dict(self) -> dict:
        return self._marked if self._marked is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._handed = self._marked = None
        self.loader.load_state_dict(state)

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        source = iter(self.loader)
        pulls = self._in_background(source) if self.lookahead else iter(
            lambda: self._pull(source), None)
        for batch, state, ready in pulls:
            self._handed = state
            yield self._use(batch, ready)
        # The epoch is out and the loader moved to the next one: checkpoints take its state.
        self._handed = self._marked = None

    def _in_background(self, source) -> Iterator:
        """`_pull` in a thread of its own, at most one finished pull waiting: the next batches
        are read, decoded and copied while the caller computes. Its errors are raised here."""
        items: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    return items.put(item, timeout=0.1)
                except queue.Full:
                    continue

        def work() -> None:
            try:
                if self.stream is not None:
                    torch.cuda.set_device(self.device)  # (a new thread starts on device 0)
                while not stop.is_set():
                    item = self._pull(source)
                    put(("item", item))
                    if item is None:
                        return
            except BaseException as exc:  # handed to the training thread, raised there
                put(("error", exc))
            finally:
                source.close()  # the loader's workers stop with the iteration

        thread = threading.Thread(target=work, name="resnet-feed", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = items.get()
                if kind == "error":
                    raise item
                if item is None:
                    return
                yield item
        finally:
            stop.set()
            thread.join()

    def _pull(self, source):
        """(batch on the device, the loader's state after it, ready event) or None at the end."""
        try:
            batch = next(source)
        except StopIteration:
            return None
        state = self.loader.state_dict()
        if self.stream is None:
            return self._to_device(batch), state, None
        if batch.images is not None and not batch.images.is_pinned():
            batch = batch.pin_memory()  # (workers=0: no DataLoader pin thread did it)
        with torch.cuda.stream(self.stream):
            moved = self._to_device(batch)
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return moved, state, ready

    def _to_device(self, batch):
        images, kept = batch_images(batch, self.device, self.loader.augment)  # epoch's size
        labels, keys, skipped = batch.labels, batch.keys, batch.skipped
        if kept is not None:  # JPEGs no decoder reads: left out and counted, as on the CPU
            labels, keys = labels[kept], [keys[i] for i in kept]
            skipped += len(batch) - len(kept)
        return dataclasses.replace(batch, images=images, keys=keys, skipped=skipped,
                                   labels=labels.to(self.device, non_blocking=True),
                                   jpegs=None, boxes=None, flips=None)

    def _use(self, batch, ready):
        if ready is not None:  # the compute stream waits for the copy, on the device
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for t in (batch.images, batch.labels):  # the allocator must not reuse them early
                t.record_stream(current)
        return batch
