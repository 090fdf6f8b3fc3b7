"""layouts: labels and class names match the generated source; clear errors for bad trees."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from resnet.data import synthetic
from resnet.data.layouts import LayoutError, list_source


def _labels(listing, split):
    return {s.key: s.label for s in listing.splits[split]}


def test_imagenet_labels_and_names(tiny_imagenet_tree):
    tree = tiny_imagenet_tree
    listing = list_source(tree.root, "imagenet")
    assert [(c.id, c.name) for c in listing.classes] == tree.classes
    assert [c.index for c in listing.classes] == list(range(len(tree.classes)))
    assert _labels(listing, "train") == tree.labels["train"]
    assert _labels(listing, "val") == tree.labels["val"]  # from LOC_val_solution.csv
    assert listing.labelled == {"train": True, "val": True}
    assert all(os.path.isfile(s.path) for s in listing.splits["train"])


def test_tinyimagenet_sorted_wnids_not_file_order(tmp_path):
    tree = synthetic.write_tinyimagenet_tree(tmp_path / "tiny", 5, 3, 2, size=(16, 16), seed=3)
    listed = (tree.root / "wnids.txt").read_text().split()
    assert listed != sorted(listed)  # the trap: index must follow sorted order
    listing = list_source(tree.root, "tinyimagenet")
    assert [(c.id, c.name) for c in listing.classes] == tree.classes
    assert _labels(listing, "train") == tree.labels["train"]
    assert _labels(listing, "val") == tree.labels["val"]


def test_imagefolder_and_split_choice(tiny_imagefolder):
    listing = list_source(tiny_imagefolder, "imagefolder")
    assert sorted(listing.splits) == ["train", "val"]
    assert [c.id for c in listing.classes] == ["class_000", "class_001", "class_002"]
    assert len(listing.splits["train"]) == 18
    for s in listing.splits["val"]:
        assert Path(s.path).parent.name == listing.classes[s.label].id
    only_val = list_source(tiny_imagefolder, "imagefolder", ["val"])
    assert list(only_val.splits) == ["val"]


def test_imagefolder_repeated_stems_are_qualified(tmp_path):
    for cls in ("cat", "dog"):
        d = tmp_path / "train" / cls
        d.mkdir(parents=True)
        (d / "0001.jpg").write_bytes(b"x")
    keys = sorted(s.key for s in list_source(tmp_path, "imagefolder").splits["train"])
    assert keys == ["cat/0001", "dog/0001"]


@pytest.mark.parametrize("victim, message", [
    ("LOC_synset_mapping.txt", "class list not found"),
    ("LOC_val_solution.csv", "val labels not found"),
    ("ILSVRC/Data/CLS-LOC/train", "train folder not found"),
])
def test_imagenet_missing_files_are_named(tiny_imagenet_tree, victim, message):
    import shutil

    target = tiny_imagenet_tree.root / victim
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(LayoutError, match=message) as info:
        list_source(tiny_imagenet_tree.root, "imagenet")
    assert victim.split("/")[-1] in str(info.value)


def test_imagenet_val_file_without_label(tiny_imagenet_tree):
    val = tiny_imagenet_tree.root / "ILSVRC/Data/CLS-LOC/val"
    (val / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"x")
    with pytest.raises(LayoutError, match="no label for 1 files"):
        list_source(tiny_imagenet_tree.root, "imagenet")


def test_tinyimagenet_missing_words(tmp_path):
    tree = synthetic.write_tinyimagenet_tree(tmp_path / "tiny", 2, 1, 1, size=(8, 8))
    (tree.root / "words.txt").unlink()
    with pytest.raises(LayoutError, match="class names not found.*words.txt"):
        list_source(tree.root, "tinyimagenet")


def test_unknown_layout_and_empty_source(tmp_path):
    with pytest.raises(LayoutError, match="unknown layout 'coco'"):
        list_source(tmp_path, "coco")
    with pytest.raises(LayoutError, match="empty"):
        list_source(tmp_path, "imagefolder")
    with pytest.raises(LayoutError, match="not found"):
        list_source(tmp_path / "nope", "imagenet")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(LayoutError, match="split 'train'.*no image files"):
        list_source(tmp_path, "imagefolder")


def test_test_split_is_refused(tiny_imagenet_tree):
    with pytest.raises(LayoutError, match="test has no labels"):
        list_source(tiny_imagenet_tree.root, "imagenet", ["test"])
