"""The feed's pull (read, decode, crop, copy) runs in a background thread where the copy can
overlap the step (CUDA; forced here on a CPU with lookahead=True); the JPEG bytes are not
pinned; cuDNN autotunes except in deterministic mode."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from resnet.data.device import DeviceFeed
from resnet.data.stream import Batch
from resnet.train.engine import tune_cudnn

SIZE = 4


def _batch(i: int, decoded: bool = True) -> Batch:
    images = torch.full((2, 3, SIZE, SIZE), i, dtype=torch.uint8) if decoded else None
    return Batch(torch.tensor([i, i]), [f"{i}a", f"{i}b"], images=images)


class _Loader:
    """A loader that records the thread each batch is read on; `fail_at` raises there."""

    decode, augment = "cpu", None

    def __init__(self, n: int, fail_at: int = -1):
        self.n, self.fail_at, self.read = n, fail_at, 0
        self.threads: list[str] = []
        self.closed = threading.Event()

    def __iter__(self):
        try:
            for i in range(self.n):
                self.threads.append(threading.current_thread().name)
                if i == self.fail_at:
                    raise OSError(f"shard unreadable at batch {i}")
                self.read = i + 1
                yield _batch(i)
        finally:
            self.closed.set()

    def state_dict(self):
        return {"read": self.read}


def test_batches_are_pulled_in_a_background_thread_with_the_states_of_the_handed_ones():
    loader = _Loader(5)
    feed = DeviceFeed(loader, "cpu", lookahead=True)
    seen = []
    for batch in feed:
        seen.append(batch.keys[0])
        feed.mark()
        assert feed.state_dict() == {"read": len(seen)}  # not the batches read ahead
    assert seen == ["0a", "1a", "2a", "3a", "4a"]
    assert set(loader.threads) == {"resnet-feed"}
    inline = _Loader(2)
    assert len(list(DeviceFeed(inline, "cpu"))) == 2 and inline.threads == ["MainThread"] * 2


def test_an_error_in_the_thread_is_raised_in_the_training_thread():
    feed = DeviceFeed(_Loader(5, fail_at=2), "cpu", lookahead=True)
    it = iter(feed)
    assert next(it).keys[0] == "0a"
    with pytest.raises(OSError, match="shard unreadable at batch 2"):
        list(it)


def test_stopping_early_ends_the_thread_and_closes_the_loader():
    loader = _Loader(1000)
    it = iter(DeviceFeed(loader, "cpu", lookahead=True))
    next(it)
    it.close()
    assert loader.closed.wait(30)
    deadline = time.monotonic() + 30
    while any(t.name == "resnet-feed" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the feed thread outlived its iteration"
        time.sleep(0.05)
    assert loader.read <= 4  # read ahead by a bounded number of batches, not the whole epoch


def test_jpeg_bytes_are_not_pinned(monkeypatch):
    """nvJPEG reads them on the host: pinning copies ~28 MB a batch for nothing."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, *a, **k: pinned.append(self.dtype) or self)
    batch = Batch(torch.tensor([0]), ["k"], jpegs=torch.zeros(100, dtype=torch.uint8),
                  jpeg_offsets=torch.tensor([0, 100]), boxes=torch.zeros(1, 4),
                  flips=torch.zeros(1, dtype=torch.bool))
    out = batch.pin_memory()
    assert pinned == [torch.int64]  # the labels, copied to the device
    assert out.jpegs is batch.jpegs and out.boxes is batch.boxes
    pinned.clear()
    _batch(1).pin_memory()
    assert pinned == [torch.int64, torch.uint8]  # labels and decoded images


def test_cudnn_autotunes_except_in_deterministic_mode():
    before = torch.backends.cudnn.benchmark
    try:
        tune_cudnn()
        assert torch.backends.cudnn.benchmark is True
        torch.use_deterministic_algorithms(True)
        tune_cudnn()
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = before
