"""The Gradio demo app: upload (or webcam / clipboard) an image, see the top-5 classes.

Standalone on purpose: it imports only gradio, torch, PIL, yaml and (for `main`) timm, never
the `resnet` package, because `resnet export --format hf` copies this very file into the
exported folder as `space/app.py`, where a Hugging Face Space runs it as it is. `resnet demo`
builds the same app around its own model (resnet/deliver/demo.py).

As a Space: `python app.py [MODEL]`, MODEL being `local-dir:PATH`, `hf-hub:ORG/NAME`, or by
default the exported folder above this file, else the repo id in model_id.txt beside it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

TOP_K = 5
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_card_headline(folder: Path) -> dict:
    """{"dataset": name, "metrics": {"val_top1", "val_top5"}} from a model card's front matter."""
    import yaml

    path = Path(folder) / "README.md"
    text = path.read_text() if path.is_file() else ""
    meta = yaml.safe_load(text[4:text.index("\n---", 4)]) if text.startswith("---\n") else {}
    out: dict = {"dataset": ((meta or {}).get("datasets") or [""])[0], "metrics": {}}
    for entry in (meta or {}).get("model-index") or []:
        for result in entry.get("results", []):
            out["dataset"] = result.get("dataset", {}).get("name", out["dataset"])
            for key, metric in zip(("val_top1", "val_top5"), result.get("metrics", [])):
                out["metrics"][key] = metric["value"]
    return out


def headline(arch: str, num_classes: int, card: dict) -> str:
    """One line for the page: architecture, data set, measured accuracy."""
    parts = [f"**{arch}**, {num_classes} classes"]
    if card.get("dataset"):
        parts.append(f"trained on {card['dataset']}")
    metrics = card.get("metrics") or {}
    if "val_top1" in metrics:
        parts.append(f"val top-1 {100 * metrics['val_top1']:.1f}%, "
                     f"top-5 {100 * metrics['val_top5']:.1f}%")
    return " · ".join(parts)


def examples_in(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]


def build_app(classify: Callable, title: str, description: str, examples: list[str]):
    """`classify(PIL image) -> {class name: probability}` behind an upload and a gr.Label."""
    import gradio as gr

    image = gr.Image(type="pil", label="image", sources=["upload", "webcam", "clipboard"])
    label = gr.Label(num_top_classes=TOP_K, label=f"top-{TOP_K}")
    # api_name: an Interface would otherwise name its route after the function.
    return gr.Interface(fn=classify, inputs=image, outputs=label, examples=examples or None,
                        title=title, description=description, api_name="predict",
                        flagging_mode="never", cache_examples=False)


def timm_classifier(model_id: str) -> tuple[Callable, object]:
    """classify() for a timm model (hf-hub:... or local-dir:...), preprocessed as its
    pretrained_cfg says; the Space's way to load what `resnet export` wrote."""
    import timm
    import torch

    model = timm.create_model(model_id, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    names = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]

    @torch.no_grad()
    def classify(image):
        if image is None:
            return {}
        probs = model(transform(image.convert("RGB"))[None]).softmax(-1)[0]
        top = probs.topk(min(TOP_K, len(names)))
        return {names[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}

    return classify, model


def _default_model(here: Path) -> str:
    if (here.parent / "config.json").is_file():
        return f"local-dir:{here.parent}"
    if (here / "model_id.txt").is_file():
        return "hf-hub:" + (here / "model_id.txt").read_text().strip()
    raise SystemExit("no model: pass local-dir:PATH or hf-hub:ORG/NAME (or set MODEL_ID)")


def _card_folder(model_id: str) -> Path | None:
    if model_id.startswith("local-dir:"):
        return Path(model_id[len("local-dir:"):])
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_id[len("hf-hub:"):], "README.md")).parent


def main(argv: list[str]) -> None:
    here = Path(__file__).resolve().parent
    model_id = (argv[1] if len(argv) > 1 else "") or os.environ.get("MODEL_ID") or \
        _default_model(here)
    classify, model = timm_classifier(model_id)
    card = read_card_headline(_card_folder(model_id))
    config = json.loads(json.dumps(model.pretrained_cfg, default=str))
    arch = config.get("architecture", type(model).__name__.lower())
    app = build_app(classify, f"{arch} image classifier",
                    headline(arch, model.num_classes, card), examples_in(here / "examples"))
    app.launch()


if __name__ == "__main__":
    main(sys.argv)
