"""`resnet predict`: image files -> top-k class names with probabilities.

Images are prepared exactly as the run's evaluation prepared them (resnet.data.augment's decode
and cpu_eval, resnet.data.device's normalize), in batches.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from resnet.data.augment import DecodeError, cpu_eval, eval_image
from resnet.data.device import normalize
from resnet.deliver.source import Trained

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first

    def as_json(self) -> str:
        return json.dumps({"image": self.path,
                           "top": [{"label": n, "probability": p} for n, p in self.top]})

    def as_text(self) -> str:
        return f"{self.path}: " + ", ".join(f"{n} {p:.3f}" for n, p in self.top)


class Predictor:
    def __init__(self, trained: Trained, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = trained.model().to(self.device)
        self.names = trained.class_names
        self.augment = trained.augment

    def prepare(self, data: bytes) -> torch.Tensor:
        """Image bytes -> uint8 [3, S, S]: the evaluation's resize + center crop, decoded as
        evaluation decodes (at a reduced DCT scale where the image is large enough)."""
        return eval_image(data, self.augment)

    def prepare_pil(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"))
        return cpu_eval(torch.from_numpy(array.copy()).permute(2, 0, 1), self.augment)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> softmax [N, classes] on the CPU."""
        logits = self.model(normalize(images.to(self.device), channels_last=False))
        return logits.float().softmax(-1).cpu()

    def top(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        values, indices = probs.topk(min(k, probs.numel()))
        return [(self.names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def classify_pil(self, image, k: int = 5) -> dict[str, float]:
        """The demo's function: a PIL image -> {class name: probability} for the top k."""
        if image is None:
            return {}
        return dict(self.top(self.probabilities(self.prepare_pil(image)[None])[0], k))

    def predict_files(self, paths: Iterable[Path], k: int = 5, batch_size: int = 32,
                      on_error=None) -> Iterator[Prediction]:
        """Predictions in input order; an unreadable file goes to `on_error(path, reason)`."""
        batch: list[tuple[str, torch.Tensor]] = []
        for path in paths:
            try:
                batch.append((str(path), self.prepare(Path(path).read_bytes())))
            except (DecodeError, OSError) as exc:
                if on_error is not None:  # PIL's own message names a BytesIO, not the file
                    on_error(str(path), "not a readable image" if isinstance(exc, DecodeError)
                             else exc.strerror or str(exc))
                continue
            if len(batch) == batch_size:
                yield from self._run(batch, k)
                batch = []
        if batch:
            yield from self._run(batch, k)

    def _run(self, batch: list[tuple[str, torch.Tensor]], k: int) -> Iterator[Prediction]:
        probs = self.probabilities(torch.stack([image for _, image in batch]))
        for (path, _), row in zip(batch, probs):
            yield Prediction(path, self.top(row, k))


def expand(inputs: Iterable[str]) -> list[Path]:
    """Files as given; folders become their image files (recursively, sorted)."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*")
                              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(path)
    return out


def run_predict(weights: str, inputs: list[str], *, topk: int = 5, as_json: bool = False,
                batch_size: int = 32, device: str = "cpu") -> int:
    """Print one line per image; exit code 1 if no image could be read, else 0."""
    from resnet.deliver.source import resolve

    predictor = Predictor(resolve(weights), device)
    errors = []

    def report(path: str, reason: str) -> None:
        errors.append(path)
        print(f"resnet predict: cannot read {path}: {reason}", file=sys.stderr)

    done = 0
    for prediction in predictor.predict_files(expand(inputs), topk, batch_size, report):
        print(prediction.as_json() if as_json else prediction.as_text(), flush=True)
        done += 1
    if errors:
        print(f"resnet predict: {len(errors)} image(s) skipped", file=sys.stderr)
    return 0 if done else 1
