"""pack: shards from generated trees, round trip through webdataset, odd files, resume, S3."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import decode_jpeg

from resnet.cli import main
from resnet.data import pack as packmod
from resnet.data import storage, synthetic
from resnet.data.format import load_manifest
from resnet.data.layouts import LayoutError
from resnet.data.pack import PackError, PackOptions, pack, prepare_image
from resnet.data.verify import verify


def _read_all(dest: str, split: str) -> dict[str, dict]:
    manifest = load_manifest(dest)
    urls = [storage.join(dest, s.name) for s in manifest.split(split).shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = sample
    return samples


def test_imagenet_pack_round_trip(tiny_imagenet_tree, tmp_path):
    tree, dest = tiny_imagenet_tree, str(tmp_path / "shards")
    result = pack(str(tree.root), dest, "imagenet", PackOptions(samples_per_shard=6, workers=1),
                  progress=False)
    m = result.manifest
    assert [(c.id, c.name) for c in m.classes] == tree.classes
    assert [s["key"] for s in m.skipped] == [tree.oddities["truncated"]]
    assert "truncated" in m.skipped[0]["reason"]
    assert m.split("train").samples == tree.count("train") - 1
    assert m.split("val").samples == tree.count("val")
    assert all(s.samples <= 6 for s in m.split("train").shards)
    assert load_manifest(dest).fingerprint == m.fingerprint
    for split in ("train", "val"):
        samples = _read_all(dest, split)
        expected = {k: v for k, v in tree.labels[split].items() if k != tree.oddities["truncated"]}
        assert {k: int(s["cls"]) for k, s in samples.items()} == expected
        for s in samples.values():  # every image takes both decoders the pipelines use
            assert Image.open(io.BytesIO(s["jpg"])).convert("RGB").size == (40, 30)
            decode_jpeg(torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8))
    train = _read_all(dest, "train")
    gray = tree.root / f"ILSVRC/Data/CLS-LOC/train/{tree.oddities['gray'][:9]}"
    assert train[tree.oddities["gray"]]["jpg"] == (gray / f"{tree.oddities['gray']}.JPEG"
                                                   ).read_bytes()  # copied, not re-encoded
    for kind in ("cmyk", "png"):
        sample = train[tree.oddities[kind]]
        assert Image.open(io.BytesIO(sample["jpg"])).mode == "RGB"
        assert "re-encoded" in json.loads(sample["json"])["note"]
    assert verify(dest, decode=True, progress=False).ok


def test_same_seed_same_shards_and_classes_mix(tmp_path):
    synthetic.write_imagefolder(tmp_path / "src", 4, {"train": 10}, size=(16, 16))
    fingerprints = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = pack(str(tmp_path / "src"), str(tmp_path / name), "imagefolder",
                 PackOptions(samples_per_shard=10, seed=seed, workers=1), progress=False)
        fingerprints.append(r.manifest.fingerprint)
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    first = _read_all(str(tmp_path / "a"), "train")
    keys = list(first)[:10]  # the first shard, in member order
    assert len({int(first[k]["cls"]) for k in keys}) >= 3


def test_shards_index_every_stride_th_sample_and_reading_can_start_there(tmp_path):
    """The manifest's offsets point at the first header of samples 0, 8, 16, ...: a reader
    started at one gets exactly what a walk from byte 0 gets, reading only from there on."""
    from resnet.data.format import INDEX_STRIDE
    from resnet.data.shardio import read_samples

    synthetic.write_imagefolder(tmp_path / "src", 3, {"train": 20}, size=(16, 16))
    dest = str(tmp_path / "out")
    shard = pack(str(tmp_path / "src"), dest, "imagefolder",
                 PackOptions(samples_per_shard=20, workers=1), progress=False
                 ).manifest.split("train").shards[0]
    assert INDEX_STRIDE == 8 and len(shard.offsets) == 3 and shard.offsets[0] == 0
    assert load_manifest(dest).split("train").shards[0] == shard  # kept through the JSON
    assert verify(dest, progress=False).ok  # which checks them against the tar's headers
    url = storage.join(dest, shard.name)
    whole = list(read_samples(url, set(range(20))))
    assert [i for i, _, _ in whole] == list(range(20))
    opened = []

    def opener(path, offset=0):
        opened.append(offset)
        return storage.open_read(path, offset)

    for lo in (0, 7, 8, 13, 19):
        start = shard.start(lo)
        assert start == (shard.offsets[lo // 8], lo // 8 * 8)
        got = list(read_samples(url, set(range(lo, 20)), start=start, opener=opener))
        assert got == whole[lo:]
        assert opened[-1] == start[0]
    with pytest.raises(ValueError, match="sample 3 lies before the start, sample 8"):
        list(read_samples(url, {3}, start=shard.start(9)))


def test_max_side_resizes(tmp_path):
    synthetic.write_imagefolder(tmp_path / "src", 2, {"train": 2}, size=(120, 80))
    dest = str(tmp_path / "out")
    pack(str(tmp_path / "src"), dest, "imagefolder", PackOptions(max_side=60, quality=80,
                                                                 workers=1), progress=False)
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in _read_all(dest, "train").values()}
    assert sizes == {(60, 40)}


def test_prepare_image_copies_and_converts():
    rgb = synthetic.encode_jpeg(synthetic.class_image(0, 2, (20, 10)))
    assert prepare_image(rgb) == (rgb, "")
    cmyk = synthetic._odd_bytes("cmyk", synthetic.class_image(0, 2, (20, 10)), 90)
    data, note = prepare_image(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "RGB" and "CMYK" in note
    with pytest.raises(packmod.BadImage, match="(?i)truncated"):
        prepare_image(rgb[: len(rgb) // 2])
    with pytest.raises(packmod.BadImage, match="not an image"):
        prepare_image(b"hello")


def test_strict_fails_and_leaves_no_manifest(tiny_imagenet_tree, tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(PackError, match=f"--strict.*{tiny_imagenet_tree.oddities['truncated']}"):
        pack(str(tiny_imagenet_tree.root), str(dest), "imagenet",
             PackOptions(samples_per_shard=4, workers=1, strict=True), progress=False)
    assert not (dest / "manifest.json").exists()


def test_layout_error_before_any_shard(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "junk.txt").write_text("x")
    with pytest.raises(LayoutError, match="LOC_synset_mapping.txt"):
        pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagenet", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_pack_resumes(tiny_imagefolder, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    opts = PackOptions(samples_per_shard=4, workers=1)
    real, calls = packmod.write_shard, []

    def crash_on_third(*args):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(*args)

    monkeypatch.setattr(packmod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        pack(str(tiny_imagefolder), str(dest), "imagefolder", opts, progress=False)
    assert not (dest / "manifest.json").exists()
    (dest / ".train-000004.tar.partial").write_bytes(b"half a shard")  # a killed writer's leftover
    (dest / "train-000099.tar").write_bytes(b"stale")  # a shard from an older, bigger plan
    monkeypatch.setattr(packmod, "write_shard", real)
    result = pack(str(tiny_imagefolder), str(dest), "imagefolder", opts, progress=False)
    assert result.shards_kept == 2 and result.shards_written == len(
        [s for sp in result.manifest.splits.values() for s in sp.shards]) - 2
    assert sorted(n for n in os.listdir(dest) if n.endswith((".partial", "099.tar"))) == []
    clean = pack(str(tiny_imagefolder), str(tmp_path / "clean"), "imagefolder", opts,
                 progress=False)
    assert result.manifest.fingerprint == clean.manifest.fingerprint
    assert verify(str(dest), progress=False).ok


def test_pack_to_s3_with_workers(s3_server, tiny_imagenet_tree, tmp_path):
    dest = f"s3://{s3_server.bucket}/imagenet"
    result = pack(str(tiny_imagenet_tree.root), dest, "imagenet",
                  PackOptions(samples_per_shard=5, workers=2), progress=False)
    names = storage.listdir(dest)
    assert "manifest.json" in names
    assert all(s.name in names for sp in result.manifest.splits.values() for s in sp.shards)
    report = verify(dest, progress=False)
    assert report.ok, report.problems
    local = tmp_path / "copy"  # webdataset has no s3://: read a downloaded copy
    storage.download_dir(dest, str(local))
    labels = {k: int(s["cls"]) for k, s in _read_all(str(local), "val").items()}
    assert labels == tiny_imagenet_tree.labels["val"]


def test_s3_missing_bucket_is_named(s3_server, tiny_imagefolder):
    with pytest.raises(storage.StorageError, match="does not exist"):
        pack(str(tiny_imagefolder), "s3://no-such-bucket/x", "imagefolder", progress=False)


def test_cli_pack_and_verify(tiny_imagenet_tree, tmp_path, capsys):
    dest = str(tmp_path / "out")
    rc = main(["pack", str(tiny_imagenet_tree.root), dest, "--layout", "imagenet",
               "--samples-per-shard", "8", "--workers", "1", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and tiny_imagenet_tree.oddities["truncated"] in captured.err
    assert "train 19 samples in 3 shards" in captured.out
    assert main(["verify", dest, "--quiet"]) == 0
    assert main(["pack", str(tiny_imagenet_tree.root), dest, "--layout", "imagenet",
                 "--strict", "--quiet", "--workers", "1"]) == 1
    # a source tree not of the layout is bad input (README.md, "Exit status")
    assert main(["pack", str(tmp_path), dest, "--layout", "tinyimagenet", "--quiet"]) == 2
    assert "wnids.txt" in capsys.readouterr().err


def test_a_partial_repack_keeps_the_other_splits_unchanged(tiny_imagefolder, tmp_path,
                                                           monkeypatch, capsys):
    dest = tmp_path / "out"
    opts = PackOptions(samples_per_shard=4, workers=1)
    full = pack(str(tiny_imagefolder), str(dest), "imagefolder", opts, progress=False).manifest
    assert sorted(full.splits) == ["train", "val"]
    val_opts = PackOptions(samples_per_shard=2, workers=1, splits=("val",))
    real = packmod.write_shard

    def crash(*args):
        raise KeyboardInterrupt  # the partial re-pack is killed after removing the manifest

    monkeypatch.setattr(packmod, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        pack(str(tiny_imagefolder), str(dest), "imagefolder", val_opts, progress=False)
    assert not (dest / "manifest.json").exists()
    monkeypatch.setattr(packmod, "write_shard", real)
    lines = []
    again = pack(str(tiny_imagefolder), str(dest), "imagefolder", val_opts, progress=False,
                 log=lines.append).manifest
    assert again.splits["train"] == full.splits["train"]  # unchanged, shard for shard
    assert len(again.splits["val"].shards) == 3 and again.splits["val"].samples == 6
    assert load_manifest(str(dest)).fingerprint == again.fingerprint
    assert any("kept split(s) train" in line for line in lines), lines
    assert not (dest / ".pack-state" / "manifest-before-repack.json").exists()
    assert verify(str(dest), progress=False).ok


def test_a_partial_repack_with_other_classes_is_refused(tiny_imagefolder, tmp_path):
    dest = tmp_path / "out"
    pack(str(tiny_imagefolder), str(dest), "imagefolder",
         PackOptions(samples_per_shard=4, workers=1), progress=False)
    other = tmp_path / "other"
    synthetic.write_imagefolder(other, 2, {"val": 2}, size=(32, 24), seed=1)
    with pytest.raises(PackError, match="holds split.s. train packed with other classes"):
        pack(str(other), str(dest), "imagefolder", PackOptions(workers=1, splits=("val",)),
             progress=False)
    assert load_manifest(str(dest)).splits.keys() == {"train", "val"}  # nothing removed
