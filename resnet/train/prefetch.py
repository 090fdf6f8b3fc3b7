"""Batches on the device without a host-device sync: the next batch's copy (and, with
data.decode=device, its decode and crops) runs on a side CUDA stream while the current step
computes. On a CPU it degrades to a plain iterator.

The loader's state moves when a batch leaves it, and this feed takes batches before the
trainer uses them (one ahead on CUDA; the trainer itself fetches step k+1's micro-batches
before it acts on step k's agreed stop/save). A checkpoint must record the batches the
*trained* steps used, so the feed stands in for the loader in the checkpoint: `mark()` after
each optimizer step records the loader's state as of the batches handed out so far, and
`state_dict()` returns that marked state (the live one once an epoch's batches are all out).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from resnet.data.nvjpeg import check_deterministic
from resnet.train.evaluate import batch_images


class DeviceFeed:
    def __init__(self, loader, device: torch.device | str,
                 lookahead: Optional[bool] = None) -> None:
        """`lookahead`: read one batch ahead (default: on CUDA, where the copy overlaps)."""
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
        ahead = self._pull(source)
        while ahead is not None:
            batch, state, ready = ahead
            if self.lookahead:
                ahead = self._pull(source)  # its copy runs while the caller computes `batch`
            self._handed = state
            yield self._use(batch, ready)
            if not self.lookahead:
                ahead = self._pull(source)
        # The epoch is out and the loader moved to the next one: checkpoints take its state.
        self._handed = self._marked = None

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
