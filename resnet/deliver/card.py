"""The model card: README.md with the Hub's YAML front matter, then what a reader needs to trust
and use the weights (data, recipe, measured accuracy, how to load, limits).

The front matter is the machine-readable part: the Hub shows `model-index` results as the
model's evaluation, and `resnet predict`/`demo` read the headline back from it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from resnet.deliver.source import Trained
from resnet.runfolder import WEIGHTS_FILE

CARD_FILE = "README.md"
# The Hub's data set ids for the layouts `resnet pack` knows; other data sets go by folder name.
HUB_DATASETS = {"imagenet": ("ILSVRC/imagenet-1k", "ImageNet-1k"),
                "tinyimagenet": ("zh-plus/tiny-imagenet", "Tiny ImageNet (200 classes)")}


def dataset_of(trained: Trained) -> tuple[str, str]:
    """(id, readable name) of the training data."""
    if trained.layout in HUB_DATASETS:
        return HUB_DATASETS[trained.layout]
    source = trained.cfg.data.train if trained.cfg else ""
    name = Path(source.rstrip("/")).name or "unknown"
    return name, f"{name} (packed `{trained.layout or 'imagefolder'}` layout)"


def front_matter(trained: Trained, name: str) -> dict:
    dataset_id, dataset_name = dataset_of(trained)
    meta = {"license": "mit", "library_name": "timm",
            "tags": ["image-classification", "timm", "resnet", trained.arch],
            "datasets": [dataset_id], "pipeline_tag": "image-classification"}
    val = trained.val_metrics()
    if "val_top1" in val:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": dataset_id, "name": dataset_name, "split": "validation"},
            "metrics": [{"type": "accuracy", "name": f"Top-{k} accuracy",
                         "value": round(float(val[f"val_top{k}"]), 4)} for k in (1, 5)],
        }]}]
    return meta


def _recipe(trained: Trained) -> str:
    cfg, val = trained.cfg, trained.val_metrics()
    if cfg is None:
        return "The training configuration did not travel with these weights."
    state = trained.trainer_state().get("progress", {})
    step = state.get("step", val.get("step", "?"))
    batch = cfg.train.global_batch_size or state.get("global_batch") or \
        f"{cfg.train.batch_size} x processes"
    hardware = (f"{val['processes']} {'GPU' if val.get('gpu') else 'CPU'} process(es)"
                if "processes" in val else "not recorded")
    return "\n".join([
        f"- architecture: `{cfg.model.arch}` (ResNet v1.5), "
        f"{cfg.data.eval_image_size or cfg.data.image_size} px input",
        f"- epochs: {cfg.train.epochs} configured; weights from optimizer step {step}",
        f"- global batch: {batch} (per device {cfg.train.batch_size}), precision "
        f"{cfg.train.precision}, engine {cfg.deepspeed.engine}",
        f"- optimizer: SGD momentum {cfg.optim.momentum}, lr {cfg.optim.lr} per 256 images, "
        f"{cfg.optim.schedule} schedule, weight decay {cfg.optim.weight_decay}, "
        f"label smoothing {cfg.train.label_smoothing}",
        f"- hardware: {hardware}",
        "- the full resolved configuration is the run's `config.yaml`",
    ])


def _accuracy(trained: Trained) -> str:
    val = trained.val_metrics()
    if "val_top1" not in val:
        return "Not measured: the run never evaluated (no `val_top1` in its metrics.jsonl)."
    samples = f" on {val['val_samples']} validation images" if "val_samples" in val else ""
    return (f"Top-1 {100 * val['val_top1']:.2f}%, top-5 {100 * val['val_top5']:.2f}%{samples} "
            f"(step {val.get('step', '?')}), center crop as in `config.json`'s `pretrained_cfg`.")


def _usage(name: str, trained: Trained) -> str:
    arch, n = trained.arch, trained.num_classes
    return f"""timm:

```python
import timm, torch
from PIL import Image
model = timm.create_model("hf-hub:{name}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
probs = model(transform(Image.open("cat.jpg").convert("RGB"))[None]).softmax(-1)
print(model.pretrained_cfg["label_names"][probs.argmax()])
```

transformers (through its timm wrapper; needs `timm` installed):

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification
processor = AutoImageProcessor.from_pretrained("{name}")
model = AutoModelForImageClassification.from_pretrained("{name}")
```

torchvision (the same state dict, key for key):

```python
import torchvision, safetensors.torch
from huggingface_hub import hf_hub_download
model = torchvision.models.{arch}(num_classes={n})
model.load_state_dict(safetensors.torch.load_file(hf_hub_download("{name}", "{WEIGHTS_FILE}")))
```

This repository's own tools: `resnet predict hf-hub:{name} image.jpg`, `resnet demo hf-hub:{name}`.
"""


def write_card(trained: Trained, out: Path, name: str) -> Path:
    """README.md for the folder `out`; `name` is the Hub repo id (or a placeholder)."""
    _, dataset_name = dataset_of(trained)
    meta = yaml.safe_dump(front_matter(trained, name), sort_keys=False)
    text = f"""---
{meta}---

# {name}

A `{trained.arch}` image classifier ({trained.num_classes} classes) trained from scratch with
the `resnet` training framework, in timm's Hub format.

## Data

{dataset_name}; {trained.num_classes} classes, named in `config.json`'s `label_names`.

## Training recipe

{_recipe(trained)}

## Accuracy

{_accuracy(trained)}

## How to load

{_usage(name if "/" in name else "ORG/NAME", trained)}
## Limits

- Measured only on the validation split named above; accuracy on other images (other cameras,
  crops, domains) will be lower and is unknown.
- The classes are exactly those of the training data: every image gets one of them, however
  unrelated it is.
- Images must be prepared as `pretrained_cfg` says (resize the shorter side to
  input_size / crop_pct, center crop, ImageNet mean/std); other preprocessing costs accuracy.
- Weights trained on ImageNet inherit ImageNet's terms of access (non-commercial research).
"""
    path = out / CARD_FILE
    path.write_text(text)
    return path
