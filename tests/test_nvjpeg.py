"""Device decoding made safe (resnet/data/nvjpeg.py): the stream is waited for before nvJPEG
writes, a JPEG the device refuses falls back to the CPU decoder, one neither reads is left out
and counted, and deterministic mode is refused. CUDA is mocked: these run on a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

from resnet.data import augment as A
from resnet.data import nvjpeg
from resnet.data.device import DeviceFeed
from resnet.data.stream import Batch

AUG = A.AugmentParams(image_size=16)


def _jpeg(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, size[1], size[0]), dtype=np.uint8))
    return encode_jpeg(pixels, quality=90).numpy().tobytes()


def _batch(jpegs: list[bytes]) -> Batch:
    packed, offsets = A.pack_jpegs(jpegs)
    n = len(jpegs)
    return Batch(torch.arange(n), [f"k{i}" for i in range(n)], jpegs=packed,
                 jpeg_offsets=offsets, boxes=torch.tensor([[2.0, 3.0, 30.0, 28.0]] * n),
                 flips=torch.tensor([i % 2 == 1 for i in range(n)]))


class _Loader:
    """The feed's view of a ShardLoader: batches, a state, the augmentation, the decode mode."""

    decode, augment = "device", AUG

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}


@pytest.fixture
def device_refuses(monkeypatch):
    """A device decoder that refuses any call holding one of the `refused` JPEGs (as nvJPEG
    fails a whole batch for one CMYK or broken file) and decodes the rest on the CPU."""
    refused: list[bytes] = []
    calls: list[int] = []
    real = nvjpeg.decode_jpeg

    def fake(jpegs, mode, device):
        calls.append(len(jpegs))
        if any(j.numpy().tobytes() in refused for j in jpegs):
            raise RuntimeError("nvjpegDecodeBatched failed: status 6")
        return real(jpegs, mode=mode, device="cpu")

    monkeypatch.setattr(nvjpeg, "decode_jpeg", fake)
    return refused, calls


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(device_refuses):
    refused, calls = device_refuses
    jpegs = [_jpeg(i) for i in range(4)]
    reference, _ = A.decode_on_device(_batch(jpegs), "cpu", AUG, budget=10 ** 9)
    assert calls == [4]  # nothing refused: one batched call
    calls.clear()
    refused.append(jpegs[2])  # a valid JPEG the device cannot read (as CMYK is for nvJPEG)
    out, kept = A.decode_on_device(_batch(jpegs), "cpu", AUG, budget=10 ** 9)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then one by one
    assert kept == [0, 1, 2, 3] and torch.equal(out, reference)


def test_a_jpeg_neither_decodes_is_left_out_and_counted_by_the_feed(device_refuses):
    refused, _ = device_refuses
    good = [_jpeg(i) for i in range(3)]
    broken = good[1][:200]  # its header reads, its pixels do not: neither decoder takes it
    refused.append(broken)
    batches = [_batch([good[0], broken, good[2]]), _batch(good[:2])]
    fed = list(DeviceFeed(_Loader(batches), "cpu"))
    assert [b.keys for b in fed] == [["k0", "k2"], ["k0", "k1"]]  # every batch still comes
    assert [b.skipped for b in fed] == [1, 0]
    assert fed[0].labels.tolist() == [0, 2] and fed[0].images.shape == (2, 3, 16, 16)
    alone, _ = A.decode_on_device(_batch([good[2]]), "cpu", AUG)
    # Sample 2's box and flip (none), not those of the batch's position 1 (flipped).
    assert torch.equal(fed[0].images[1], alone[0])


def test_the_whole_batch_unreadable_gives_an_empty_batch_not_an_error(device_refuses):
    refused, _ = device_refuses
    broken = _jpeg(0)[:200]
    refused.append(broken)
    (fed,) = list(DeviceFeed(_Loader([_batch([broken, broken])]), "cpu"))
    assert fed.keys == [] and fed.skipped == 2 and fed.images.shape == (0, 3, 16, 16)


def test_the_current_stream_is_waited_for_before_nvjpeg_writes(monkeypatch):
    """torchvision allocates on our stream, nvJPEG writes from its own: queued kernels on our
    stream must be done before the call (mocked: no CUDA here)."""
    events: list[str] = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    monkeypatch.setattr(nvjpeg.torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(nvjpeg, "decode_jpeg",
                        lambda jpegs, mode, device: events.append("decode") or [])
    nvjpeg.decode_jpegs([], "cuda", A.decode)
    assert events == ["synchronize", "decode"]
    events.clear()
    nvjpeg.decode_jpegs([], "cpu", A.decode)
    assert events == ["decode"]  # nothing to wait for on a CPU


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_device_decode_in_deterministic_mode_is_refused_on_a_gpu(deterministic):
    with pytest.raises(ValueError, match="data.decode=device cannot run with deterministic"):
        DeviceFeed(_Loader([]), "cuda")
    DeviceFeed(_Loader([]), "cpu")  # CPU roi_align is deterministic as it is
    nvjpeg.check_deterministic("cpu", "cuda")  # workers decode: nothing to refuse
