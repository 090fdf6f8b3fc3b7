"""`resnet demo`: the Gradio app (resnet/deliver/app.py) around a model from any WEIGHTS."""
from __future__ import annotations

import tempfile
from pathlib import Path

from resnet.deliver import app
from resnet.deliver.hub import EXAMPLES, write_examples
from resnet.deliver.predict import Predictor
from resnet.deliver.source import Trained, resolve


def _examples(trained: Trained) -> list[str]:
    """An exported folder's examples/, else a few validation images from the run's data."""
    folder = trained.weights if trained.weights.is_dir() else trained.weights.parent
    found = app.examples_in(folder / EXAMPLES)
    if found or trained.cfg is None:
        return found
    scratch = Path(tempfile.mkdtemp(prefix="resnet-demo-"))
    return [str(p) for p in write_examples(trained, scratch)]


def build_demo(trained: Trained, device: str = "cpu"):
    predictor = Predictor(trained, device)
    card = trained.card or {"metrics": trained.val_metrics()}
    if not card.get("dataset") and trained.cfg is not None:
        from resnet.deliver.card import dataset_of

        card = {**card, "dataset": dataset_of(trained)[1]}
    description = app.headline(trained.arch, trained.num_classes, card)
    return app.build_app(predictor.classify_pil, f"{trained.arch} image classifier",
                         description, _examples(trained))


def launch(weights: str, *, port: int = 7860, share: bool = False, device: str = "cpu",
           host: str = "127.0.0.1", block: bool = True):
    """Serve the demo; with block=False return (app, url) while it serves (tests)."""
    demo = build_demo(resolve(weights), device)
    demo.launch(server_name=host, server_port=port or None, share=share,
                prevent_thread_lock=not block)
    return demo, demo.local_url
