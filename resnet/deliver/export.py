"""`resnet export WEIGHTS OUT --format hf|torchvision|onnx`.

- hf: timm's Hub format (resnet/deliver/hub.py) + model card + examples/ + space/.
- torchvision: what a run's final/ holds (model.safetensors + classes.json), from any WEIGHTS.
- onnx: a dynamic batch dimension, checked against PyTorch with onnxruntime before returning.
"""
from __future__ import annotations

from pathlib import Path

import torch

from resnet.data.format import ClassInfo, Manifest
from resnet.deliver import card, hub
from resnet.deliver.source import Trained
from resnet.weights import export_final

FORMATS = ("hf", "torchvision", "onnx")
ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4


def export_torchvision(trained: Trained, out: Path) -> Path:
    """model.safetensors + classes.json through the same function the trainer uses."""
    classes = tuple(ClassInfo(i, cid, name) for i, (cid, name)
                    in enumerate(zip(trained.class_ids or trained.class_names,
                                     trained.class_names)))
    return export_final(trained.model(), Manifest(trained.layout or "imagefolder", classes, {}),
                        out)


def export_hf(trained: Trained, out: Path, repo_id: str = "") -> Path:
    """The folder `timm.create_model("local-dir:OUT")` and transformers load; the card names
    `repo_id` (or the folder's name) as the model."""
    export_torchvision(trained, out)
    hub.write_config(trained, out)
    card.write_card(trained, out, repo_id or out.resolve().name)
    hub.write_examples(trained, out)
    hub.write_space(out, repo_id)
    return out


def export_onnx(trained: Trained, out: Path, log=print) -> Path:
    """model.onnx: input `pixel_values` [batch, 3, S, S] normalised, output `logits`."""
    import onnxruntime

    out.mkdir(parents=True, exist_ok=True)
    model, size = trained.model(), trained.augment.image_size
    # Batch 2 when tracing: a batch of 1 could be specialised away by the exporter.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = out / ONNX_FILE
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["pixel_values"],
                      output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                      external_data=False)
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
    with torch.no_grad():
        want = model(check).numpy()
    diff, scale = float(abs(got - want).max()), float(abs(want).max())
    log(f"onnxruntime vs PyTorch on a batch of 3: max abs difference {diff:.2e} "
        f"(logits up to {scale:.3g})")
    # float32 rounding grows with the logits' size: the bound is relative beyond magnitude 1.
    if diff > ONNX_TOLERANCE * max(1.0, scale):
        raise RuntimeError(f"the ONNX model differs from PyTorch by {diff:.2e} "
                           f"(> {ONNX_TOLERANCE} x {max(1.0, scale):.3g}); {path} is not "
                           f"trustworthy")
    return path


def export(trained: Trained, out: Path, fmt: str = "hf", repo_id: str = "",
           log=print) -> Path:
    if fmt == "hf":
        return export_hf(trained, out, repo_id)
    if fmt == "torchvision":
        return export_torchvision(trained, out)
    if fmt == "onnx":
        return export_onnx(trained, out, log)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
