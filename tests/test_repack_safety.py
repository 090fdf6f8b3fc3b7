"""An interrupted partial re-pack never leaves a manifest that lies (issue 20, item 6)."""
from __future__ import annotations

import pytest

from resnet.data import pack as packmod
from resnet.data import synthetic
from resnet.data.format import load_manifest
from resnet.data.pack import PackError, PackOptions, pack
from resnet.data.verify import verify


def test_a_split_left_half_re_packed_is_never_kept(tiny_imagefolder, tmp_path, monkeypatch):
    """pack train+val; `--splits val` from a new source, killed after one shard (val-000000
    rewritten, val-000003.. removed as stale); then `--splits train` must refuse, naming val,
    not keep val from the earlier manifest. Packing val again finishes it, and the manifest
    then matches every shard."""
    dest = tmp_path / "out"
    one = PackOptions(samples_per_shard=1, workers=1)
    pack(str(tiny_imagefolder), str(dest), "imagefolder", one, progress=False)
    assert len(load_manifest(str(dest)).splits["val"].shards) == 6
    newer = tmp_path / "newer"
    synthetic.write_imagefolder(newer, 3, {"train": 6, "val": 1}, size=(32, 24), seed=7)
    val_only = PackOptions(samples_per_shard=1, workers=1, splits=("val",))
    real, calls = packmod.write_shard, []

    def killed_after_one(*args):
        calls.append(args[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after val-000000 was written
        return real(*args)

    monkeypatch.setattr(packmod, "write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pack(str(newer), str(dest), "imagefolder", val_only, progress=False)
    monkeypatch.setattr(packmod, "write_shard", real)
    assert not (dest / "val-000003.tar").exists()

    train_only = PackOptions(samples_per_shard=1, workers=1, splits=("train",))
    lines = []
    with pytest.raises(PackError, match=r"split\(s\) val of .* were being re-packed when an "
                                        r"earlier run stopped.*--splits train,val"):
        pack(str(newer), str(dest), "imagefolder", train_only, progress=False, log=lines.append)
    assert not any("kept split(s) val" in line for line in lines)
    assert not (dest / "manifest.json").exists()

    pack(str(newer), str(dest), "imagefolder", val_only, progress=False)
    manifest = load_manifest(str(dest))
    assert len(manifest.splits["val"].shards) == 3
    assert verify(str(dest), progress=False).ok  # every listed shard there, every sha256 right
    pack(str(newer), str(dest), "imagefolder", train_only, progress=False)  # now it may keep val
    assert verify(str(dest), progress=False).ok
