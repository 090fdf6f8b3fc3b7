"""The shard loader end to end on local shards: exactly once, resume, elastic, faults, decode."""
from __future__ import annotations

import io
import os
import json
import logging

import pytest
import torch

from resnet.data import augment as A
from resnet.data import shardio
from resnet.data.stream import AugmentParams, ShardError, ShardLoader, eval_loader
from shards_helper import make_shards

AUG = AugmentParams(image_size=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return str(make_shards(root, [9, 6, 11], extra_splits={"val": [5, 4]}))


def loader(root, rank=0, world=1, b=2, g=None, k=0, seed=0, train=True, **kw):
    return ShardLoader(root, "train" if train else "val", rank=rank, world_size=world,
                       batch_size=b, global_batch=g or world * b, workers=k, seed=seed,
                       train=train, augment=AUG, **kw)


def epoch_keys(loaders):
    """One epoch of every rank: {rank: [batch keys]} (ranks run one after the other)."""
    return {i: [tuple(b.keys) for b in ld] for i, ld in enumerate(loaders)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world,k,b,gmul", [(1, 0, 4, 1), (2, 2, 2, 2), (3, 3, 1, 1), (4, 1, 3, 1)])
def test_every_sample_once_and_equal_counts(shards, world, k, b, gmul):
    g = world * b * gmul
    loaders = [loader(shards, r, world, b, g, k) for r in range(world)]
    got = epoch_keys(loaders)
    assert len({len(v) for v in got.values()}) == 1
    assert all(len(v) == loaders[0].batches_per_epoch for v in got.values())
    keys = [key for v in got.values() for batch in v for key in batch]
    assert len(keys) == len(set(keys)) == 26 // g * g
    assert all(ld.epoch == 1 for ld in loaders)


def test_epochs_differ_and_repeat_with_the_seed(shards):
    a, b = loader(shards, k=1), loader(shards, k=1)
    first = [x.keys for x in a]
    assert [x.keys for x in a] != first
    assert [x.keys for x in b] == first


@pytest.mark.parametrize("k,stop", [(0, 3), (2, 5)])
def test_resume_same_topology_is_identical(shards, k, stop):
    world, b = 2, 2
    full = [list(loader(shards, r, world, b, 8, k)) for r in range(world)]
    for r in range(world):
        ld = loader(shards, r, world, b, 8, k)
        it = iter(ld)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(ld.state_dict()))
        it.close()
        resumed = loader(shards, r, world, b, 8, k)
        resumed.load_state_dict(state)
        assert resumed.batches_remaining == len(full[r]) - stop
        rest = list(resumed)
        assert [x.keys for x in rest] == [x.keys for x in full[r][stop:]]
        for x, y in zip(rest, full[r][stop:]):
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert resumed.epoch == 1


@pytest.mark.parametrize("before,after", [((2, 2, 2), (1, 0, 4)), ((1, 1, 4), (4, 2, 1))])
def test_elastic_resume_uses_each_sample_once(shards, before, after):
    (w1, k1, b1), (w2, k2, b2), g = before, after, 8
    steps = 1
    first = [loader(shards, r, w1, b1, g, k1) for r in range(w1)]
    used, state = [], None
    for ld in first:
        it = iter(ld)
        for _ in range(steps * g // (w1 * b1)):
            used += next(it).keys
        state = ld.state_dict()
        it.close()
    assert state["samples_consumed"] == steps * g
    second = [loader(shards, r, w2, b2, g, k2) for r in range(w2)]
    for ld in second:
        ld.load_state_dict(state)
    got = epoch_keys(second)
    assert len({len(v) for v in got.values()}) == 1
    used += [key for v in got.values() for batch in v for key in batch]
    assert len(used) == len(set(used)) == 24
    nxt = second[0].state_dict()
    assert nxt["epoch"] == 1 and nxt["segments"] == []


def test_refuses_another_data_set_or_seed(shards, tmp_path):
    other = str(make_shards(tmp_path / "other", [9, 6, 11], seed=1))
    state = loader(shards).state_dict()
    with pytest.raises(ValueError, match="another data set"):
        loader(other).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(shards, seed=1).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_global_batch_splits_unequally_and_resumes_on_another_world_size(shards):
    """G = 8 over 3 ranks: micro-batches of 3, 3 and 2, every step exactly 8 samples. Saved
    after 1 step, the rest of the epoch continues on 2 ranks (4 + 4): each sample once."""
    three = [loader(shards, r, 3, 3, 8, k=2) for r in range(3)]
    assert three[0].layout.describe() == "world 3: micro-batch 2/3 x 1 accumulation = 8"
    got = epoch_keys(three)
    assert [len(b) for r in range(3) for b in got[r]] == [3, 3, 3] * 2 + [2, 2, 2]
    keys = [k for v in got.values() for batch in v for k in batch]
    assert len(keys) == len(set(keys)) == 24

    first = [loader(shards, r, 3, 3, 8, k=2) for r in range(3)]
    used = []
    for ld in first:
        batches = iter(ld)
        used += next(batches).keys
        del batches
    state = first[0].state_dict()
    rest = [loader(shards, r, 2, 4, 8, k=1) for r in range(2)]
    for ld in rest:
        ld.load_state_dict(state)
    used += [k for v in epoch_keys(rest).values() for batch in v for k in batch]
    assert len(used) == len(set(used)) == 24


def test_refuses_more_ranks_than_a_global_batch_has_samples(shards):
    with pytest.raises(ValueError, match="fewer samples than the 3 processes"):
        loader(shards, world=3, b=3, g=2)


def test_corrupt_samples_skipped_with_equal_counts(tmp_path, caplog):
    bad = {1: "jpeg", 4: "nojpg", 7: "nocls", 8: "badcls", 12: "range"}
    root = str(make_shards(tmp_path / "bad", [6, 5, 4], corrupt=bad))
    loaders = [loader(root, r, 2, 2, 4, k=1) for r in range(2)]
    with caplog.at_level(logging.WARNING):
        got = [list(ld) for ld in loaders]
    assert len(got[0]) == len(got[1]) == 3
    keys = [k for batches in got for b in batches for k in b.keys]
    skipped = sum(b.skipped for batches in got for b in batches)
    assert len(keys) + skipped == 12 and len(set(keys)) == len(keys)
    assert sum(ld.skipped for ld in loaders) == skipped
    assert all(len(b.keys) + b.skipped == 2 for bs in got for b in bs)


def test_eval_every_sample_once_across_ranks(shards):
    for world in (1, 2, 3):
        got = [list(eval_loader(shards, batch_size=2, workers=r % 2, rank=r, world_size=world,
                                augment=AUG))
               for r in range(world)]
        keys = [k for bs in got for b in bs for k in b.keys]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 9
        assert all(b.images.shape[1:] == (3, 16, 16) for bs in got for b in bs)


def test_missing_shard_names_its_url(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "m", [4, 4])
    (root / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(loader(str(root), b=4))


class _Flaky(io.RawIOBase):
    """A file that raises a connection reset after `limit` bytes (once per open)."""

    def __init__(self, path, offset, limit):
        self.f = open(path, "rb")
        self.f.seek(offset)
        self.left = limit

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left is not None and n > self.left:
            raise ConnectionResetError("connection reset by peer (test)")
        if self.left is not None:
            self.left -= n
        return self.f.read(n)

    def close(self):
        self.f.close()
        super().close()


def test_transient_error_reopens_at_the_member(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "f", [8])
    url = str(root / "train-000000.tar")
    opened = []

    def flaky(path, offset=0):
        opened.append(offset)
        return _Flaky(path, offset, 3000 if len(opened) < 3 else None)

    clean = list(shardio.read_samples(url, set(range(8))))
    got = list(shardio.read_samples(url, set(range(8)), opener=flaky))
    assert got == clean
    assert len(opened) == 3 and opened[1] > 0 and opened[1] % 512 == 0


def test_a_failed_reopen_past_a_gap_is_retried_like_any_interruption(tmp_path, monkeypatch):
    """Remote reads skip large gaps with a new request; when that request fails, the shard is
    reopened at the current member with the usual retries, not abandoned with a raw error."""
    root = make_shards(tmp_path / "g", [8])
    url = str(root / "train-000000.tar")
    data = (root / "train-000000.tar").read_bytes()
    monkeypatch.setattr(shardio, "REOPEN_GAP", 0)  # every skip is a new request
    calls = []

    class Body(io.RawIOBase):  # not seekable, like an S3 response body
        def __init__(self, payload: bytes):
            self.inner = io.BytesIO(payload)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self.inner.readinto(buffer)

    def opener(path, offset=0):  # the 2nd request (the first gap) fails
        calls.append(offset)
        if len(calls) == 2:
            raise ConnectionResetError("connection reset by peer")
        return io.BufferedReader(Body(data[offset:]))

    clean = list(shardio.read_samples(url, {0, 6}))
    assert list(shardio.read_samples(url, {0, 6}, opener=opener)) == clean
    assert len(calls) > 2


def test_a_truncated_stream_is_retried_then_reported(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "t", [6])
    url = str(root / "train-000000.tar")
    data = (root / "train-000000.tar").read_bytes()
    monkeypatch.setenv("RESNET_IO_TIMEOUT_S", "1")
    with pytest.raises(ShardError, match="train-000000.tar"):
        list(shardio.read_samples(url, {5}, opener=lambda u, o=0: io.BytesIO(data[o:2000])))


def test_reading_stops_after_the_last_needed_sample(tmp_path):
    root = make_shards(tmp_path / "s", [10])
    url = str(root / "train-000000.tar")
    reads = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            out = super().read(n)
            reads.append(len(out))
            return out

    def opener(path, offset=0):
        f = Counting(path)
        f.seek(offset)
        return f

    got = list(shardio.read_samples(url, {0, 2}, opener=opener))
    assert [i for i, _, _ in got] == [0, 2]
    assert sum(reads) < (root / "train-000000.tar").stat().st_size / 2


def test_device_decode_matches_cpu_shapes_and_content(shards):
    cpu = next(iter(loader(shards, b=4, train=False)))
    dev = next(iter(loader(shards, b=4, train=False, decode="device", k=2)))
    # One byte buffer per batch (one shared-memory handle), not one tensor per sample.
    assert dev.images is None and dev.jpegs.dtype == torch.uint8 and dev.jpegs.dim() == 1
    assert dev.jpeg_offsets.tolist()[0] == 0 and len(dev.jpeg_offsets) == 5
    assert dev.jpeg_offsets[-1] == len(dev.jpegs) and dev.boxes.shape == (4, 4)
    out, _ = A.decode_on_device(dev, "cpu", AUG)
    assert out.dtype == torch.uint8 and out.shape == cpu.images.shape
    assert (out.float() - cpu.images.float()).abs().mean() < 3
    train = next(iter(loader(shards, b=4, decode="device")))
    assert A.decode_on_device(train, "cpu", AUG)[0].shape == (4, 3, 16, 16)


def _device_batch(datas, p, train):
    """A decode="device" batch of `datas` as the workers build it, and the CPU path's output."""
    from types import SimpleNamespace

    jpegs, boxes, flips, cpu = [], [], [], []
    for k, data in enumerate(datas):
        jpeg, w, h = A.for_device(data)
        box, flip = A.train_view(w, h, p, 0, 0, str(k)) if train else (A.eval_box(w, h, p), False)
        jpegs.append(jpeg), boxes.append(box), flips.append(flip)
        img = A.decode(data)
        cpu.append(A.cpu_train(img, box, flip, p.image_size) if train else A.cpu_eval(img, p))
    buffer, offsets = A.pack_jpegs(jpegs)
    return SimpleNamespace(jpegs=buffer, jpeg_offsets=offsets, boxes=torch.tensor(boxes),
                           flips=torch.tensor(flips)), torch.stack(cpu)


def _photos(sizes, seed=0):
    import numpy as np

    from resnet.data import synthetic

    rng = np.random.default_rng(seed)
    out = [synthetic.encode_jpeg(synthetic.realistic_image(i, 10, size=s, rng=rng))
           for i, s in enumerate(sizes)]
    gray = synthetic.realistic_image(3, 10, size=(400, 300), rng=rng)[..., 0]
    return out + [synthetic.encode_jpeg(gray, mode="L")]  # grayscale JPEG: expanded to RGB


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_matches_the_cpu_path_at_realistic_sizes(train):
    p = AugmentParams(image_size=224)
    batch, cpu = _device_batch(_photos([(500, 375), (375, 500), (1200, 900), (64, 48)]), p,
                               train)
    out, _ = A.decode_on_device(batch, "cpu", p)
    assert out.shape == cpu.shape == (5, 3, 224, 224) and out.dtype == torch.uint8
    per_image = (out.float() - cpu.float()).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 2.0, per_image  # same boxes, flips; antialiased either way
    # The flip is applied: unflipping a flipped image makes it much worse.
    if train and batch.flips.any():
        i = int(batch.flips.nonzero()[0])
        assert (out[i].flip(-1).float() - cpu[i].float()).abs().mean() > 4 * per_image[i]


def test_device_decode_memory_is_bounded_by_the_output_not_the_largest_image(monkeypatch):
    """Old: one float canvas n x 3 x max_h x max_w. Now every float tensor roi_align reads is
    at most the output batch's size, whatever the largest image, and the result is the same."""
    import numpy as np
    import torchvision.ops

    from resnet.data import synthetic

    real, seen = torchvision.ops.roi_align, []

    def recording(canvas, *args, **kwargs):
        seen.append(canvas.numel())
        return real(canvas, *args, **kwargs)

    p = AugmentParams(image_size=224, scale=(0.9, 1.0))  # large crops of the large photo
    budget = 4 * 3 * 224 * 224
    monkeypatch.setattr(torchvision.ops, "roi_align", recording)
    peaks = []
    for big in [(2000, 1500), (4000, 3000)]:
        rng = np.random.default_rng(1)
        arr = (rng.random((big[1] // 50, big[0] // 50, 3)) * 255).astype(np.uint8)
        arr = np.kron(arr, np.ones((50, 50, 1), dtype=np.uint8))  # blocky: fast to encode
        datas = _photos([(500, 375), (300, 200)]) + [synthetic.encode_jpeg(arr)]
        batch, cpu = _device_batch(datas, p, True)
        seen.clear()
        out, _ = A.decode_on_device(batch, "cpu", p)
        assert max(seen) <= budget and len(seen) > 2  # the big crop went in bands
        peaks.append(max(seen))
        assert (out.float() - cpu.float()).abs().mean() < 2.0
        whole, _ = A.decode_on_device(batch, "cpu", p, budget=10 ** 9)  # one canvas for all
        assert (whole.float() - out.float()).abs().max() <= 1
    assert 4 * 3 * 3000 * 4000 > 100 * budget  # what the old canvas would have asked for


def test_crop_parameters_are_a_function_of_seed_epoch_key():
    p = AugmentParams()
    a = A.train_view(500, 375, p, 0, 3, "n01/abc")
    assert a == A.train_view(500, 375, p, 0, 3, "n01/abc")
    assert a != A.train_view(500, 375, p, 0, 4, "n01/abc")
    for key in range(50):
        (x0, y0, x1, y1), _ = A.train_view(50, 40, p, 1, 0, str(key))
        assert 0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 40


def test_a_shard_shorter_than_its_manifest_skips_only_the_missing_samples(tmp_path,
                                                                         monkeypatch):
    from resnet.data import stream

    root = str(make_shards(tmp_path / "short", [8]))
    real = stream.read_samples

    def short(url, needed, **kw):  # the tar lost samples 3 and 7; its manifest counts them
        return ((i, k, f) for i, k, f in real(url, needed, **kw) if i not in (3, 7))

    monkeypatch.setattr(stream, "read_samples", short)
    batches = list(loader(root, b=8, k=0))
    assert sum(b.skipped for b in batches) == 2
    assert len({k for b in batches for k in b.keys}) == 6


def test_cpu_decode_scales_the_dct_only_where_the_crop_is_twice_the_output(monkeypatch):
    """simplejpeg decodes at 1/k (k = 2, 4, 8) only where the crop still spans k x the output;
    the box stays the same region of the photo, so the view matches a full-scale decode."""
    import simplejpeg

    real, shapes = simplejpeg.decode_jpeg, []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    photos = [_marked_photo(500, 375), _marked_photo(1200, 900)]
    for size, small_output in [(224, False), (96, True)]:
        p = AugmentParams(image_size=size, scale=(0.9, 1.0))
        for data in photos:
            img = A.decode(data)  # torchvision.io.decode_jpeg at full scale: the reference
            for key in ("a", "b", "c"):
                shapes.clear()
                box, flip = A.train_view(img.shape[2], img.shape[1], p, 0, 1, key)
                got = A.train_image(data, p, 0, 1, key)
                want = A.cpu_train(img, box, flip, size)
                k = round(img.shape[1] / shapes[0][0])  # libjpeg rounds the size up
                crop = min(box[2] - box[0], box[3] - box[1])
                assert k == max(kk for kk in (1, 2, 4, 8) if crop >= kk * size or kk == 1)
                if k == 1:  # the same libjpeg-turbo decode: the same pixels
                    assert (got.int() - want.int()).abs().max() <= 1
                else:  # the same region: a bright patch lands on the same output pixels
                    assert _centroid_shift(got, want) <= 0.5 + 0.1  # box rounded at 1/k
            if data is photos[0]:  # 500x375: crops of 340-375 px scale for 96, not for 224
                assert k == (2 if small_output else 1)
        ev = A.eval_image(photos[1], p)
        assert (ev.float() - A.cpu_eval(A.decode(photos[1]), p).float()).abs().mean() < 8


def _marked_photo(width, height):
    """A dark JPEG with bright, smooth blobs: where they land locates the crop box."""
    import numpy as np

    from resnet.data import synthetic

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.zeros((height, width), np.float32)
    for fx, fy in ((0.3, 0.4), (0.6, 0.55), (0.45, 0.7)):
        r = 0.06 * width
        arr += 220 * np.exp(-(((xx - fx * width) ** 2 + (yy - fy * height) ** 2) / r ** 2))
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return synthetic.encode_jpeg(np.stack([arr, arr // 2, arr], axis=-1), quality=95)


def _centroid_shift(a, b):
    """How far (output pixels) the brightness centroid of image a lies from b's."""
    def centroid(img):
        w = img.float().mean(0)
        ys, xs = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]),
                                indexing="ij")
        return torch.stack([(w * ys).sum(), (w * xs).sum()]) / w.sum()

    return float((centroid(a) - centroid(b)).abs().max())


@pytest.mark.parametrize("oddity", ["gray", "cmyk", "png"])
def test_cpu_decode_falls_back_for_what_simplejpeg_refuses(oddity, monkeypatch):
    import numpy as np

    from resnet.data import synthetic

    p = AugmentParams(image_size=32)
    arr = synthetic.realistic_image(2, 10, size=(120, 90), rng=np.random.default_rng(0))
    data = synthetic._odd_bytes(oddity, arr, 90)
    got = A.train_image(data, p, 0, 0, "k")
    monkeypatch.setattr(A, "simplejpeg", None)  # not installed: torchvision / PIL do it all
    assert (A.train_image(data, p, 0, 0, "k").int() - got.int()).abs().max() <= 1
    assert got.shape == (3, 32, 32) and got.dtype == torch.uint8
def _tar_with_pax(payload: bytes, size: int | None = None) -> bytes:
    """A pax extended header carrying `payload` (its size field says `size`), then a member."""
    import tarfile

    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(payload) if size is None else size
    member = tarfile.TarInfo("a.cls")
    member.size = 1
    pad = lambda b: b + bytes(-len(b) % 512)  # noqa: E731
    return (pax.tobuf(tarfile.USTAR_FORMAT) + pad(payload) + member.tobuf(tarfile.USTAR_FORMAT)
            + pad(b"0") + bytes(1024))


@pytest.mark.parametrize("payload, size", [
    (b"0 path=a.cls\n", None),  # length 0: the record never advances
    (b"x3 path=a.cls\n", None),  # not a number
    (b"99 path=a.cls\n", None),  # past the header's end
    (b"13 path=a.cls\n", 1 << 32),  # a size that would allocate 4 GiB
], ids=["zero", "not-a-number", "too-long", "huge"])
def test_a_crafted_pax_header_is_a_corrupt_shard_named_by_url(tmp_path, payload, size):
    import signal

    url = tmp_path / "train-000000.tar"
    url.write_bytes(_tar_with_pax(payload, size))

    def hung(signum, frame):
        raise TimeoutError("read_samples did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(ShardError, match=r"shard .*train-000000\.tar is corrupt at byte 0"):
            list(shardio.read_samples(str(url), {0}))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_well_formed_pax_path_is_read(tmp_path):
    url = tmp_path / "train-000000.tar"
    url.write_bytes(_tar_with_pax(b"21 path=long-key.cls\n"))
    assert list(shardio.read_samples(str(url), {0})) == [(0, "long-key", {"cls": b"0"})]


def test_a_mid_epoch_state_from_the_earlier_order_is_refused_an_epoch_boundary_is_not(shards):
    ld = loader(shards, 0, 1, 2, 2)
    it = iter(ld)
    next(it)
    state = json.loads(json.dumps(ld.state_dict()))
    it.close()
    del state["order"]  # as saved before orders came from Philox's raw output
    with pytest.raises(ValueError, match="saved mid-epoch with the sample order 'numpy "
                                         "Generator.permutation' of an earlier resnet"):
        loader(shards, 0, 1, 2, 2).load_state_dict(state)
    boundary = json.loads(json.dumps(loader(shards, 0, 1, 2, 2).state_dict()))
    del boundary["order"]
    loader(shards, 0, 1, 2, 2).load_state_dict(boundary)  # no segments: nothing to continue


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_are_not_forked_from_the_training_process(shards, monkeypatch):
    """A fork copies the parent's memory (and the locks its threads hold): a function patched
    in this process after import would run in forked workers. Started by a server process,
    they import the modules afresh."""
    from resnet.data import stream

    def inherited(*args, **kwargs):
        raise AssertionError("a worker ran code from the parent's memory: it was forked")

    expected = [b.keys for b in loader(shards, b=2, k=2)]
    monkeypatch.setattr(stream, "read_samples", inherited)
    assert [b.keys for b in loader(shards, b=2, k=2)] == expected


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_stuck_worker_is_named_within_the_timeout(shards, tmp_path):
    import time

    from resnet.data.order import EpochOrder
    from resnet.data.workers import WorkerStuck

    root = make_shards(tmp_path / "stuck", [4, 4])
    os.unlink(root / "train-000001.tar")
    os.mkfifo(root / "train-000001.tar")  # opening it blocks: no writer ever comes
    # Two workers, each a contiguous half of the epoch's order: one shard each.
    stuck = EpochOrder((4, 4), 0, 0).shard_order.index(1)
    list(loader(shards, b=2, k=2))  # the worker server has started: only the read can stall
    ld = loader(str(root), b=2, k=2, worker_timeout_s=10)
    start = time.monotonic()
    with pytest.raises(WorkerStuck, match=rf"DataLoader worker {stuck} \(rank 0, epoch 0, its "
                                          rf"batch {stuck} of this pass\) produced nothing in "
                                          rf"10 s"):
        list(ld)
    assert time.monotonic() - start < 40


def test_workers_end_when_the_trainer_is_killed(shards, tmp_path):
    """A SIGKILLed trainer's workers (and the fork server they hold open) must not outlive it:
    their parent is the server, so torch's own watchdog never sees the trainer go."""
    import signal
    import subprocess
    import sys
    import time

    import trainutil as tu

    script = ("import sys, time\n"
              "from resnet.data.stream import ShardLoader\n"
              f"ld = ShardLoader({shards!r}, 'train', rank=0, world_size=1, batch_size=2, "
              "global_batch=2, workers=2, seed=0, train=True)\n"
              "batches = iter(ld); next(batches)\n"
              "print('first batch in', flush=True); time.sleep(120)\n")
    launch = tu.Launch([sys.executable, "-c", script], tmp_path / "log.txt")
    try:
        tu.wait_for(lambda: "\nfirst batch in\n" in launch.output(), 120, "the first batch",
                    [launch])
        helpers = [pid for pid in _tagged(launch.tag) if pid != launch.proc.pid]
        assert len(helpers) >= 3, helpers  # the fork server and two workers
        os.kill(launch.proc.pid, signal.SIGKILL)
        launch.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(_running, helpers)):
            time.sleep(0.2)
        assert not [pid for pid in helpers if _running(pid)], \
            subprocess.run(["ps", "-o", "pid,ppid,cmd", "-p", ",".join(map(str, helpers))],
                           capture_output=True, text=True).stdout
    finally:
        launch.stop()


def _tagged(tag: str) -> list[int]:
    needle = f"RESNET_TEST_TAG={tag}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and needle in \
                    open(f"/proc/{entry.name}/environ", "rb").read().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has ended; only its exit status waits)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_starts_reading_at_the_manifests_nearest_offset(tmp_path, monkeypatch):
    """With the manifest's offsets, a worker whose run begins inside a shard opens the shard
    there (from S3: no bytes before it); the batches are the same as without them."""
    from resnet.data import storage, synthetic
    from resnet.data.format import MANIFEST_NAME
    from resnet.data.pack import PackOptions, pack

    synthetic.write_imagefolder(tmp_path / "src", 3, {"train": 10}, size=(16, 16))
    indexed, plain = tmp_path / "indexed", tmp_path / "plain"
    pack(str(tmp_path / "src"), str(indexed), "imagefolder",
         PackOptions(samples_per_shard=20, workers=1), progress=False)
    doc = json.loads((indexed / MANIFEST_NAME).read_text())
    for shard in doc["splits"]["train"]["shards"]:
        del shard["offsets"]  # as packed before offsets came: the same data set
    plain.mkdir()
    for f in indexed.iterdir():
        if f.suffix == ".tar":
            os.symlink(f, plain / f.name)
    (plain / MANIFEST_NAME).write_text(json.dumps(doc))
    real, opened = storage.open_read, []

    def recording(url, offset=0):
        opened.append(offset)
        return real(url, offset)

    monkeypatch.setattr(storage, "open_read", recording)
    keys = {}
    for root in (plain, indexed):
        opened.clear()
        keys[root] = [[tuple(b.keys) for b in loader(str(root), rank=r, world=3, b=2, k=0,
                                                     train=True, seed=1)] for r in range(3)]
        if root == plain:
            assert set(opened) == {0}
        else:
            assert max(opened) > 0  # 3 ranks of 10 over shards of 20 and 10
    assert keys[plain] == keys[indexed]


def test_other_children_of_the_fork_server_keep_the_default_stop_signals(tmp_path):
    """Python has one fork server per process: a Pool started after the loader's server gets
    its processes from it, and its terminate() (SIGTERM, then wait) must still end them."""
    import subprocess
    import sys

    script = ("import time\n"
              "from resnet.data import workers\n"
              "context = workers.worker_context()\n"
              "never_set = context.Event()\n"
              "process = context.Process(target=never_set.wait)\n"
              "process.start(); time.sleep(5)\n"  # (past its fork: it is running)
              "process.terminate(); process.join(60)\n"
              "print('alive' if process.is_alive() else f'ended {process.exitcode}')\n"
              "process.kill()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "ended -15", result.stdout + result.stderr
