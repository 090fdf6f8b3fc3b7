"""verify: a clean pack passes; each kind of damage is caught and named."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import replace

import pytest
from webdataset import TarWriter

from resnet.cli import main
from resnet.data import storage, synthetic
from resnet.data.format import MANIFEST_NAME, ShardInfo, load_manifest
from resnet.data.pack import PackOptions, pack
from resnet.data.verify import verify


@pytest.fixture
def packed(tiny_imagefolder, tmp_path) -> str:
    dest = str(tmp_path / "out")
    pack(str(tiny_imagefolder), dest, "imagefolder", PackOptions(samples_per_shard=5, workers=1),
         progress=False)
    return dest


def _flip_byte(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _replace_shard(dest: str, split: str, index: int, samples: list[dict]) -> None:
    """Write a new shard in place of one and fix its manifest entry, so only content differs."""
    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0) as tar:
        for s in samples:
            tar.write(s)
    _replace_shard_bytes(dest, split, index, buf.getvalue(), len(samples))


def _replace_shard_bytes(dest: str, split: str, index: int, data: bytes, samples: int) -> None:
    manifest = load_manifest(dest)
    info = manifest.split(split).shards[index]
    storage.write_bytes(storage.join(dest, info.name), data)
    shards = list(manifest.split(split).shards)
    shards[index] = ShardInfo(info.name, samples, len(data), hashlib.sha256(data).hexdigest())
    splits = dict(manifest.splits)
    splits[split] = replace(manifest.split(split), shards=tuple(shards))
    fixed = replace(manifest, splits=splits)
    storage.write_bytes(storage.join(dest, MANIFEST_NAME), fixed.to_json().encode())


def test_clean_pack_passes(packed):
    report = verify(packed, decode=True, progress=False)
    assert report.ok and report.samples == 24 and report.shards == 6


def test_corrupted_shard_is_named(packed):
    _flip_byte(os.path.join(packed, "train-000001.tar"), 3000)
    report = verify(packed, progress=False)
    assert not report.ok
    assert any("train-000001.tar" in p and "sha256" in p for p in report.problems)
    assert main(["verify", packed, "--quiet"]) == 1


def test_missing_and_short_shards(packed):
    os.remove(os.path.join(packed, "val-000000.tar"))
    path = os.path.join(packed, "train-000000.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1024])
    problems = verify(packed, progress=False).problems
    assert any(p == "val-000000.tar: missing" for p in problems)
    assert any("train-000000.tar" in p and "size" in p for p in problems)


def test_label_out_of_range_and_missing_member(packed):
    jpg = synthetic.encode_jpeg(synthetic.class_image(0, 3, (16, 16)))
    _replace_shard(packed, "train", 0, [
        {"__key__": "a", "jpg": jpg, "cls": b"7"},
        {"__key__": "b", "jpg": jpg},
    ])
    problems = verify(packed, progress=False).problems
    assert any("a.cls: label 7 is out of range 0..2" in p for p in problems)
    assert any("sample 'b' has no .cls" in p for p in problems)


def test_decode_catches_what_the_header_check_cannot(packed):
    jpg = synthetic.encode_jpeg(synthetic.class_image(0, 3, (64, 64)))
    scan = jpg.index(b"\xff\xda") + 14  # the scan's data starts after its 3-component header
    broken = jpg[:scan + 40]  # headers whole, the image data cut short
    _replace_shard(packed, "val", 0, [{"__key__": "z", "jpg": broken, "cls": b"0"}])
    assert verify(packed, progress=False).ok
    problems = verify(packed, decode=True, progress=False).problems
    assert any("z.jpg does not decode" in p for p in problems), problems


def test_png_member_is_refused(packed):
    png = synthetic._odd_bytes("png", synthetic.class_image(0, 3, (8, 8)), 90)
    _replace_shard(packed, "val", 0, [{"__key__": "p", "jpg": png, "cls": b"0"}])
    assert any("not a JPEG" in p for p in verify(packed, progress=False).problems)


def test_no_manifest_is_a_clear_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path), "--quiet"]) == 2  # bad input: not a data set
    assert "no manifest.json" in capsys.readouterr().err


def test_verify_on_s3_catches_corruption(s3_server, tiny_imagefolder):
    dest = f"s3://{s3_server.bucket}/ds"
    pack(str(tiny_imagefolder), dest, "imagefolder", PackOptions(samples_per_shard=10, workers=1),
         progress=False)
    assert verify(dest, progress=False).ok
    url = storage.join(dest, "train-000000.tar")
    data = bytearray(storage.read_bytes(url))
    data[2000] ^= 0xFF
    storage.write_bytes(url, bytes(data))
    assert any("train-000000.tar" in p for p in verify(dest, progress=False).problems)


def test_webdataset_reads_the_manifests_samples(packed):
    """The reference reader of `verify --decode` agrees with a plain webdataset.WebDataset."""
    import webdataset as wds

    from resnet.data.verify import webdataset_samples

    for info in load_manifest(packed).split("train").shards:
        path = os.path.join(packed, info.name)
        plain = [(s["__key__"], {k for k in s if not k.startswith("__")})
                 for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)]
        assert webdataset_samples(path) == plain
        assert len(plain) == info.samples and all({"jpg", "cls"} <= exts for _, exts in plain)


def test_decode_reads_each_shard_as_webdataset_does(packed):
    """Members of one sample that are not consecutive: a reader by key sees 2 complete samples,
    webdataset (and the training loader) sees 4 halves. Only the webdataset read catches it."""
    jpg = synthetic.encode_jpeg(synthetic.class_image(0, 3, (16, 16)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("a.jpg", jpg), ("b.jpg", jpg), ("a.cls", b"0"), ("b.cls", b"1")]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    _replace_shard_bytes(packed, "val", 0, buf.getvalue(), samples=2)
    assert verify(packed, progress=False).ok
    problems = verify(packed, decode=True, progress=False).problems
    assert any("val-000000.tar: webdataset reads 4 samples, manifest says 2" in p
               for p in problems), problems
    assert any("webdataset's sample #0 'a' has no .cls" in p for p in problems), problems


def test_upper_case_extension_is_reported(packed):
    jpg = synthetic.encode_jpeg(synthetic.class_image(0, 3, (16, 16)))
    _replace_shard(packed, "val", 0, [{"__key__": "u", "JPG": jpg, "cls": b"0"}])
    assert any("sample 'u' has no .jpg" in p for p in verify(packed, progress=False).problems)


def test_wrong_sample_offsets_are_named(packed):
    manifest = load_manifest(packed)
    shards = list(manifest.split("train").shards)
    assert shards[0].offsets == (0,)  # 5 samples: only sample 0 is indexed (every 8th)
    shards[0] = replace(shards[0], offsets=(1024,))
    splits = dict(manifest.splits)
    splits["train"] = replace(manifest.split("train"), shards=tuple(shards))
    storage.write_bytes(storage.join(packed, MANIFEST_NAME),
                        replace(manifest, splits=splits).to_json().encode())
    problems = verify(packed, progress=False).problems
    assert problems == [f"{shards[0].name}: the manifest's sample offsets do not match the "
                        f"tar's (a reader would start at a wrong byte): re-pack it"]
