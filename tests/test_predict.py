"""`resnet predict`: known images get their class from a run dir, a checkpoint, an exported
folder and hf-hub:; batches change nothing; unreadable files are reported and skipped."""
from __future__ import annotations

import json
import os

import pytest

import deliver_helper as dh
from deliver_helper import exported, run  # noqa: F401 (fixtures)
from resnet.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _predict(capsys, *args) -> tuple[int, list[dict], str]:
    code = main(["predict", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_known_images_get_their_class_from_every_kind_of_weights(run, exported, capsys):
    images = dh.class_images(run.parent / "images")
    names = {str(p): f"class {label}" for p, label in images}
    for weights in (run, run / "final", run / "checkpoints" / dh.CHECKPOINT, exported):
        code, lines, _ = _predict(capsys, weights, *[p for p, _ in images], "--batch-size", "4")
        assert code == 0
        assert {line["image"]: line["top"][0]["label"] for line in lines} == names, weights
        assert all(len(line["top"]) == 5 for line in lines)
        assert all(abs(sum(t["probability"] for t in line["top"])) <= 1 + 1e-6 for line in lines)


def test_batches_and_folders_give_the_same_answers(run, capsys):
    folder = run.parent / "images"
    dh.class_images(folder)
    _, one, _ = _predict(capsys, run, folder, "--batch-size", "1", "--topk", "3")
    _, many, _ = _predict(capsys, run, folder, "--batch-size", "32", "--topk", "3")
    assert len(one) == dh.CLASSES and [line["image"] for line in one] == \
        sorted(line["image"] for line in one)
    for a, b in zip(one, many):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)
    code = main(["predict", str(run), str(folder / "img2.jpg"), "--topk", "2"])
    assert code == 0 and capsys.readouterr().out.startswith(f"{folder / 'img2.jpg'}: class 2 ")


def test_unreadable_images_are_named_and_skipped(run, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    good = dh.class_images(tmp_path / "ok")[1][0]
    code, lines, err = _predict(capsys, run, tmp_path / "broken.jpg", good,
                                tmp_path / "missing.jpg")
    assert code == 0 and [line["image"] for line in lines] == [str(good)]
    assert f"cannot read {tmp_path / 'broken.jpg'}: not a readable image" in err
    assert f"cannot read {tmp_path / 'missing.jpg'}" in err and "2 image(s) skipped" in err
    code, lines, err = _predict(capsys, run, tmp_path / "broken.jpg")
    assert code == 1 and lines == []
    assert main(["predict", str(tmp_path / "nowhere"), str(good)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_hf_hub_weights_are_downloaded_then_used(run, exported, monkeypatch, capsys):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id: asked.append(repo_id) or str(exported))
    path, label = dh.class_images(run.parent / "images")[3]
    code, lines, _ = _predict(capsys, "hf-hub:me/tiny", path)
    assert code == 0 and asked == ["me/tiny"] and lines[0]["top"][0]["label"] == f"class {label}"


def test_a_run_without_final_weights_uses_its_newest_checkpoint(run, tmp_path, capsys):
    import shutil

    from resnet.deliver.source import resolve

    mid_run = tmp_path / "run"
    shutil.copytree(run, mid_run, ignore=shutil.ignore_patterns("final"))
    trained = resolve(str(mid_run))
    assert trained.weights == mid_run / "checkpoints" / dh.CHECKPOINT
    # no classes.json yet: the names come from the packed data set's manifest
    assert trained.class_names == [f"class {i}" for i in range(dh.CLASSES)]
    path, label = dh.class_images(run.parent / "images")[4]
    code, lines, _ = _predict(capsys, mid_run, path)
    assert code == 0 and lines[0]["top"][0]["label"] == f"class {label}"
