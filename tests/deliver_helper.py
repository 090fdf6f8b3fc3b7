"""A fake run directory for the delivery tests, built in about a second without training.

resnet18 at random init, whose classifier is set to nearest-centroid over the features of one
generated image per class: each of those images then has a known top-1 (its own class, by a
wide margin). The run dir has what a real one has: config.yaml, final/ (weights + classes),
a ZeRO-0 checkpoint folder, metrics.jsonl with val_top1/val_top5, and a packed data set.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

import shards_helper
from resnet.cli import main
from resnet.config import load_config, save_config
from resnet.data import synthetic
from resnet.data.format import load_manifest
from resnet.model import build_model, forward_features, forward_head
from resnet.weights import export_final

CLASSES, SIZE, CHECKPOINT = 6, 32, "step-000000004"
VAL_TOP1, VAL_TOP5 = 0.75, 1.0


def class_images(folder: Path, size=(48, 40)) -> list[tuple[Path, int]]:
    """One generated JPEG per class, named after its index."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label in range(CLASSES):
        path = folder / f"img{label}.jpg"
        path.write_bytes(synthetic.encode_jpeg(synthetic.class_image(label, CLASSES, size)))
        out.append((path, label))
    return out


def reference_inputs(paths) -> torch.Tensor:
    """The evaluation's preprocessing written independently (PIL + torchvision transforms)."""
    prep = transforms.Compose([transforms.Resize(int(SIZE / 0.875)), transforms.CenterCrop(SIZE),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.stack([prep(Image.open(p).convert("RGB")) for p in paths])


def _nearest_centroid(model, x: torch.Tensor) -> None:
    """fc(f) = 2 f.c_k - |c_k|^2 = |f|^2 - |f - c_k|^2: image k is closest to its own centroid."""
    with torch.no_grad():
        feats = forward_head(model, forward_features(model, x), pre_logits=True)
        model.fc.weight.copy_(2 * feats)
        model.fc.bias.copy_(-(feats ** 2).sum(1))
        scale = model.fc(feats).abs().max() / 20  # logits of a trained model's size, same order
        model.fc.weight /= scale
        model.fc.bias /= scale


def fake_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = shards_helper.make_shards(root / "data", [12], num_classes=CLASSES,
                                     extra_splits={"val": [12]})
    run = root / "run"
    cfg = load_config([], ["model.arch=resnet18", f"data.image_size={SIZE}",
                           f"data.train={data}", f"data.val={data}", f"run.dir={run}"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES).eval()
    images = class_images(root / "images")
    _nearest_centroid(model, reference_inputs([p for p, _ in images]))
    export_final(model, load_manifest(str(data)), run / "final")
    checkpoint = run / "checkpoints" / CHECKPOINT
    (checkpoint / "pytorch_model").mkdir(parents=True)
    torch.save({"module": model.state_dict()},
               checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"progress": {"step": 4,
                                                                            "global_batch": 8}}))
    (run / "checkpoints" / "latest").write_text(CHECKPOINT)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 4, "loss": 1.0, "img_per_s": 20.0, "img_per_s_per_device": 10.0},
        {"step": 4, "val_loss": 0.5, "val_top1": VAL_TOP1, "val_top5": VAL_TOP5,
         "val_samples": 12}]) + "\n")
    return run


# Fixtures for the test modules (imported there by name): one fake run and its hf export each.
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return fake_run(tmp_path_factory.mktemp("deliver"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(run), str(out)]) == 0
    return out
