"""A model's weights as files: writing a run's final weights (torchvision-compatible
safetensors + the class list beside them), reading weights back from any place a run leaves
them, and the configuration of the run they came from.

Training writes with `export_final`; `resnet eval`, `resnet export`, `resnet predict` and the
demo read with `load_weights`, so the format has one owner and deliver/ needs no training code.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from resnet.config import Config, load_saved_config
from resnet.data.format import Manifest
from resnet.runfolder import CLASSES_FILE, CONFIG_FILE, WEIGHTS_FILE, run_dir_of

# What accelerate's save_state names a DDP model's weights in a checkpoint (its names, not ours).
ACCELERATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
DEEPSPEED_MODEL_FILE = Path("pytorch_model") / "mp_rank_00_model_states.pt"


def export_final(model: nn.Module, manifest: Manifest, out_dir: Path) -> Path:
    """torchvision-compatible weights + the class list next to them."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
             else v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "arch_hint": "torchvision"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    classes = [{"index": c.index, "id": c.id, "name": c.name} for c in manifest.classes]
    (out_dir / CLASSES_FILE).write_text(json.dumps(classes, indent=1))
    return out_dir / WEIGHTS_FILE


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Final weights (a .safetensors file or its folder) or a training checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        path = path / WEIGHTS_FILE
    if path.is_file() and path.suffix == ".safetensors":
        return load_file(str(path))
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return _load_tensors_only(path / DEEPSPEED_MODEL_FILE)["module"]
    for name in ACCELERATE_MODEL_FILES:
        if (path / name).is_file():
            return load_weights(path / name) if name.endswith("safetensors") else \
                _load_tensors_only(path / name)
    raise FileNotFoundError(f"no weights at {path}: expected a .safetensors file, a run's "
                            f"final/ folder or a checkpoint folder")


def _load_tensors_only(path: Path) -> dict:
    """torch.load with weights_only=True: tensors, containers and plain values, never code.
    (Resuming training from a checkpoint is different: DeepSpeed unpickles its files in full,
    so a checkpoint folder or mirror must be as trusted as the code; docs/operations.md.)"""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {path}: it holds more than tensors and plain "
                         f"values, and unpickling it could run code "
                         f"({str(exc).splitlines()[-1] if str(exc) else type(exc).__name__})"
                         ) from None


def run_config(weights: Path) -> Config | None:
    """The configuration of the run whose folder holds `weights` (None: no run folder above
    them): how the model was built and how its images were prepared."""
    folder = run_dir_of(weights)
    return load_saved_config(folder / CONFIG_FILE) if folder else None
